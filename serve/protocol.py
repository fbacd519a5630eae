"""The HTTP API's requests: their published schema, and the validation that turns them into unime inputs.

Validation is written out by hand rather than left to pydantic, so that every refusal names the field and the
item index as a client would write them (`input[3].image`, `documents[0].text`); the pydantic models below
only describe the API in the OpenAPI schema.

A text input is always a text here: unlike `unime.inputs` (where a string ending in `.jpg` is a local file), the
server never reads local files and takes images only through the `image` field of an item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from unime.errors import InvalidInputError
from unime.inputs import EmbedInput, parse_input
from unime.serve.errors import RequestError
from unime.serve.images import ImagePolicy, decode_image

# --------------------------------------------------------------------------------------------------------
# Published schema (OpenAPI)
# --------------------------------------------------------------------------------------------------------


class InputItem(BaseModel):
    """One multimodal input: a text, an image, or both."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="The text of the input.")
    image: str | None = Field(
        None,
        description="A data URL (data:image/png;base64,...) or bare base64; an http(s) URL only where the "
        "operator allows remote images. Local paths are never read.",
    )


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, OpenAI-compatible, with multimodal items and an input type."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str | InputItem] = Field(description="One text, or a list of texts and items: one vector each.")
    model: str | None = Field(None, description="The served model name (see /v1/models).")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first dims (matryoshka), renormalised.")
    input_type: Literal["query", "document"] | None = Field(
        None, description="Applies the model's query or document instruction."
    )
    instruction: str | None = Field(None, description="An explicit instruction; wins over input_type.")
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; unused.")


class RerankRequest(BaseModel):
    """`POST /v1/rerank`, in the Cohere/Jina shape, with multimodal queries and documents."""

    model_config = ConfigDict(extra="forbid")
    query: str | InputItem
    documents: list[str | InputItem]
    model: str | None = None
    top_n: int | None = Field(None, ge=0, description="Keep the best n results (0 or absent: all).")
    return_documents: bool = Field(False, description="Echo each document in its result.")
    instruction: str | None = Field(None, description="What relevance means (default: the model's instruction).")


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-request limits set by the operator."""

    max_items: int
    max_text_chars: int
    images: ImagePolicy


@dataclass
class EmbeddingCall:
    """A validated `/v1/embeddings` request."""

    items: list[EmbedInput]
    model: str | None
    encoding_format: Literal["float", "base64"]
    dimensions: int | None
    input_type: Literal["query", "document"] | None
    instruction: str | None


@dataclass
class RerankCall:
    """A validated `/v1/rerank` request."""

    query: EmbedInput
    documents: list[EmbedInput]
    raw_documents: list[Any]
    model: str | None
    top_n: int | None
    return_documents: bool
    instruction: str | None


_EMBEDDING_KEYS = frozenset(EmbeddingRequest.model_fields)
_RERANK_KEYS = frozenset(RerankRequest.model_fields)


def _check_object(body: Any, known: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(body)}", param="body")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; known fields: {sorted(known)}", param=unknown[0])
    return body


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"expected a string, got {_json_type(value)}", param=key)
    return value


def _choice(body: dict[str, Any], key: str, choices: tuple, default: Any) -> Any:
    value = body.get(key, default)
    if value not in choices:
        raise RequestError(f"expected one of {[c for c in choices if c is not None]}, got {value!r}", param=key)
    return value


def _optional_int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"expected an integer, got {_json_type(value)}", param=key)
    if value < minimum:
        raise RequestError(f"must be >= {minimum}, got {value}", param=key)
    return value


def parse_item(value: Any, limits: Limits, *, param: str, index: int | None) -> EmbedInput:
    """A string (always a text) or a `{"text", "image"}` object, checked against the limits."""
    if isinstance(value, str):
        text, image = value, None
    elif isinstance(value, dict):
        unknown = sorted(set(value) - {"text", "image"})
        if unknown:
            raise RequestError(f"unknown key(s) {unknown}; an item has 'text' and/or 'image'", param=param, index=index)
        text, image = value.get("text"), value.get("image")
        if text is None and image is None:
            raise RequestError("the item has neither 'text' nor 'image'", param=param, index=index)
        if text is not None and not isinstance(text, str):
            raise RequestError(f"'text' must be a string, got {_json_type(text)}", param=f"{param}.text", index=index)
    else:
        raise RequestError(
            f"expected a string or an object with 'text' and/or 'image', got {_json_type(value)}",
            param=param,
            index=index,
        )
    text_param = param if isinstance(value, str) else f"{param}.text"
    if text is not None and len(text) > limits.max_text_chars:
        raise RequestError(
            f"the text is {len(text)} characters; this server accepts at most {limits.max_text_chars}",
            param=text_param,
            index=index,
            status=413,
        )
    decoded = None
    if image is not None:
        decoded = decode_image(image, limits.images, param=f"{param}.image", index=index)
    try:
        # unime's own parser applies its rules (non-empty text, an image with pixels) to what passed the policy.
        return parse_input(index if index is not None else 0, {"text": text, "image": decoded})
    except InvalidInputError as err:
        raise RequestError(
            str(err).split(": ", 1)[-1], param=text_param if text is not None else param, index=index
        ) from err


def parse_embedding_request(body: Any, limits: Limits) -> EmbeddingCall:
    body = _check_object(body, _EMBEDDING_KEYS)
    if "input" not in body:
        raise RequestError("missing: give a string or a list of strings and items", param="input")
    raw = body["input"]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise RequestError(f"expected a string or a list, got {_json_type(raw)}", param="input")
    if not raw:
        raise RequestError("the list is empty; give at least one input", param="input")
    if len(raw) > limits.max_items:
        raise RequestError(
            f"{len(raw)} inputs; this server accepts at most {limits.max_items} per request", param="input", status=413
        )
    items = [parse_item(value, limits, param=f"input[{i}]", index=i) for i, value in enumerate(raw)]
    return EmbeddingCall(
        items=items,
        model=_optional_str(body, "model"),
        encoding_format=_choice(body, "encoding_format", ("float", "base64"), "float"),
        dimensions=_optional_int(body, "dimensions", 1),
        input_type=_choice(body, "input_type", (None, "query", "document"), None),
        instruction=_optional_str(body, "instruction"),
    )


def parse_rerank_request(body: Any, limits: Limits) -> RerankCall:
    body = _check_object(body, _RERANK_KEYS)
    for key in ("query", "documents"):
        if key not in body:
            raise RequestError("missing", param=key)
    query = parse_item(body["query"], limits, param="query", index=None)
    raw = body["documents"]
    if not isinstance(raw, list):
        raise RequestError(f"expected a list, got {_json_type(raw)}", param="documents")
    if not raw:
        raise RequestError("the list is empty; give at least one document", param="documents")
    if len(raw) > limits.max_items:
        raise RequestError(
            f"{len(raw)} documents; this server accepts at most {limits.max_items} per request",
            param="documents",
            status=413,
        )
    documents = [parse_item(value, limits, param=f"documents[{i}]", index=i) for i, value in enumerate(raw)]
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise RequestError(f"expected a boolean, got {_json_type(return_documents)}", param="return_documents")
    return RerankCall(
        query=query,
        documents=documents,
        raw_documents=raw,
        model=_optional_str(body, "model"),
        top_n=_optional_int(body, "top_n", 0) or None,
        return_documents=return_documents,
        instruction=_optional_str(body, "instruction"),
    )


def echo_document(raw: Any) -> dict[str, Any]:
    """A document as results echo it: `{"text": ...}` for a string, the item as sent otherwise."""
    return {"text": raw} if isinstance(raw, str) else dict(raw)
