"""The HTTP API's requests: their published schema, and the validation that turns them into unime inputs.

Validation is written out by hand rather than left to pydantic, so that every refusal names the field and the
item index as a client would write them (`input[3].image`, `documents[0].text`); the pydantic models below
only describe the API in the OpenAPI schema.

A text input is always a text here: unlike `unime.inputs` (where a string ending in `.jpg` is a local file), the
server never reads local files and takes images only through the `image` field of an item.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from unime.backbones import get_backbone
from unime.config import UnimeConfig
from unime.errors import InvalidInputError
from unime.inputs import Input, parse_input
from unime.loading import load_processor
from unime.prompts import PromptRenderer, apply_embedding_template, reranker_chat_template, set_chat_template
from unime.serve.config import ServeConfig
from unime.serve.errors import RequestError
from unime.serve.images import ImagePolicy, decode_image
from unime.serve.micro_batching import PIXELS_PER_TOKEN

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
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian bytes of `dtype` (a token matrix row after row)."
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Number type of base64 output; float16 halves it (needs encoding_format base64)."
    )
    output: Literal["single_vector", "multi_vector"] = Field(
        "single_vector",
        description="multi_vector: each item's token vectors from the model's multi-vector head, a [num_tokens, "
        "dim] matrix (see /v1/models' multi_vector_dimensions), with num_tokens beside it.",
    )
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
    """Per-request limits set by the operator (`ServeConfig`'s fields of the same names)."""

    max_items: int
    max_text_chars: int
    images: ImagePolicy
    max_request_pixels: int = ServeConfig.max_request_pixels
    max_image_aspect_ratio: float = ServeConfig.max_image_aspect_ratio

    @classmethod
    def of(cls, config: ServeConfig) -> Limits:
        return cls(
            max_items=config.max_items,
            max_text_chars=config.max_text_chars,
            images=ImagePolicy(
                max_pixels=config.max_image_pixels,
                allow_remote=config.allow_remote_images,
                timeout_s=config.remote_image_timeout_s,
            ),
            max_request_pixels=config.max_request_pixels,
            max_image_aspect_ratio=config.max_image_aspect_ratio,
        )


class RequestImages:
    """The images of one request as they are read: each within what is left of `max_request_pixels` (checked from
    its header, before its pixels are decoded) and of a shape a vision encoder takes (`max_image_aspect_ratio`)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.used = 0

    def decode(self, value: Any, *, param: str, index: int | None) -> Any:
        """Decode one image, refused (413) before its pixels are decoded when it does not fit what is left."""
        left = self.limits.max_request_pixels - self.used
        policy = self.limits.images
        if left < policy.max_pixels:  # the header check refuses it before decoding when it does not fit
            policy = dataclasses.replace(policy, max_pixels=max(left, 0))
        try:
            image = decode_image(value, policy, param=param, index=index)
        except RequestError as err:
            if err.status != 413 or policy is self.limits.images:
                raise
            raise RequestError(
                f"the request's images may hold {self.limits.max_request_pixels} pixels in all (max_request_pixels) "
                f"and the images before this one hold {self.used}: {err.message}",
                param=param,
                index=index,
                status=413,
            ) from err
        self.used += image.width * image.height
        self._check_aspect_ratio(image.width, image.height, param, index)
        return image

    def _check_aspect_ratio(self, width: int, height: int, param: str, index: int | None) -> None:
        ratio = max(width, height) / max(min(width, height), 1)
        if ratio > self.limits.max_image_aspect_ratio:
            raise RequestError(
                f"the image is {width}x{height}, an aspect ratio of {ratio:.0f}; this server accepts at most "
                f"{self.limits.max_image_aspect_ratio:g}",
                param=param,
                index=index,
            )


@dataclass
class EmbeddingCall:
    """A validated `/v1/embeddings` request."""

    items: list[Input]
    model: str | None
    encoding_format: Literal["float", "base64"]
    dtype: Literal["float32", "float16"]
    output: Literal["single_vector", "multi_vector"]
    dimensions: int | None
    input_type: Literal["query", "document"] | None
    instruction: str | None


@dataclass
class RerankCall:
    """A validated `/v1/rerank` request."""

    query: Input
    documents: list[Input]
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


class LongNumber:
    """A JSON integer with more digits than Python converts (`sys.get_int_max_str_digits`), kept as its digits so
    that the field holding it is named in the 400 instead of the JSON decoder failing on the whole body."""

    def __init__(self, digits: str):
        self.digits = digits


def _parse_int(digits: str) -> int | LongNumber:
    limit = sys.get_int_max_str_digits()
    return LongNumber(digits) if limit and len(digits.lstrip("-")) > limit else int(digits)


def load_json(raw: bytes) -> Any:
    """The body as JSON; malformed or too deeply nested JSON is a 400 naming the body."""
    try:
        return json.loads(raw, parse_int=_parse_int)
    except RecursionError as err:
        raise RequestError("the JSON is nested too deeply", param="body") from err
    except UnicodeDecodeError as err:
        raise RequestError(f"the body is not UTF-8 ({err.reason} at byte {err.start})", param="body") from err
    except ValueError as err:  # json.JSONDecodeError, and a number the decoder cannot convert
        raise RequestError(f"the body is not valid JSON ({err})", param="body") from err


def _json_type(value: Any) -> str:
    if isinstance(value, LongNumber):
        return f"a number of {len(value.digits)} digits"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def check_text(text: str, limits: Limits, *, param: str, index: int | None) -> str:
    """A text field within the character limit and encodable as UTF-8 (no lone UTF-16 surrogate)."""
    if len(text) > limits.max_text_chars:
        raise RequestError(
            f"the text is {len(text)} characters; this server accepts at most {limits.max_text_chars}",
            param=param,
            index=index,
            status=413,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800": a string no tokenizer can take
        raise RequestError(
            f"the text holds a lone UTF-16 surrogate ({text[err.start]!r} at character {err.start}), which is "
            "not a Unicode character",
            param=param,
            index=index,
        ) from err
    return text


def _optional_str(body: dict[str, Any], key: str, limits: Limits) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"expected a string, got {_json_type(value)}", param=key)
    return None if value is None else check_text(value, limits, param=key, index=None)


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


def parse_item(value: Any, limits: Limits, pixels: RequestImages, *, param: str, index: int | None) -> Input:
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
    if text is not None:
        check_text(text, limits, param=text_param, index=index)
    decoded = None
    if image is not None:
        decoded = pixels.decode(image, param=f"{param}.image", index=index)
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
    pixels = RequestImages(limits)
    items = [parse_item(value, limits, pixels, param=f"input[{i}]", index=i) for i, value in enumerate(raw)]
    encoding_format = _choice(body, "encoding_format", ("float", "base64"), "float")
    dtype = _choice(body, "dtype", ("float32", "float16"), "float32")
    if dtype == "float16" and encoding_format != "base64":
        # JSON floats carry no number type: float16 values would print longer, not shorter.
        raise RequestError('"float16" needs "encoding_format": "base64"', param="dtype")
    output = _choice(body, "output", ("single_vector", "multi_vector"), "single_vector")
    dimensions = _optional_int(body, "dimensions", 1)
    if output == "multi_vector" and dimensions is not None:
        raise RequestError(
            'token vectors are not truncated: "dimensions" applies to "single_vector" output only', param="dimensions"
        )
    return EmbeddingCall(
        items=items,
        model=_optional_str(body, "model", limits),
        encoding_format=encoding_format,
        dtype=dtype,
        output=output,
        dimensions=dimensions,
        input_type=_choice(body, "input_type", (None, "query", "document"), None),
        instruction=_optional_str(body, "instruction", limits),
    )


def parse_rerank_request(body: Any, limits: Limits) -> RerankCall:
    body = _check_object(body, _RERANK_KEYS)
    for key in ("query", "documents"):
        if key not in body:
            raise RequestError("missing", param=key)
    pixels = RequestImages(limits)
    query = parse_item(body["query"], limits, pixels, param="query", index=None)
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
    documents = [parse_item(value, limits, pixels, param=f"documents[{i}]", index=i) for i, value in enumerate(raw)]
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise RequestError(f"expected a boolean, got {_json_type(return_documents)}", param="return_documents")
    return RerankCall(
        query=query,
        documents=documents,
        raw_documents=raw,
        model=_optional_str(body, "model", limits),
        top_n=_optional_int(body, "top_n", 0) or None,
        return_documents=return_documents,
        instruction=_optional_str(body, "instruction", limits),
    )


# --------------------------------------------------------------------------------------------------------
# Tokens after templating
# --------------------------------------------------------------------------------------------------------
class PromptTokens:
    """Counts the tokens of each input's prompt as the model sees it, to enforce `max_input_tokens` and to cost
    batches, before a request is queued (in whichever process parses it: HTTP workers load no model).

    It loads only the model directory's processor and renders prompts with the model's own template and
    renderer (as `Embedder.tokenize` / `Reranker.tokenize` do), so the instruction and the template's text count.
    An image counts as one token per 28x28 pixels (the vision encoder's share of the prompt), from its size.
    """

    def __init__(self, model_dir: str, kind: str):
        config = UnimeConfig.load(model_dir)
        spec = get_backbone(config.backbone)
        processor = load_processor(spec, model_dir, False, None, {})
        if kind == "reranker":
            set_chat_template(processor, reranker_chat_template(spec.turn_format, config.rerank))
        else:
            apply_embedding_template(processor, spec.turn_format, config.prompts)
        self.kind = kind
        self._renderer = PromptRenderer(processor)
        self._tokenizer = processor.tokenizer.backend_tokenizer  # the Rust tokenizer: lengths without id lists
        # The template writes the BOS where the family has one; the tokenizer adds none (as the models do).
        self._add_special_tokens = not spec.turn_format.bos

    def _count(self, texts: Sequence[str]) -> list[int]:
        return [
            len(encoding)
            for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=self._add_special_tokens)
        ]

    def embedding_costs(
        self, items: Sequence[Input], instruction: str | None, max_tokens: int, field: str = "input"
    ) -> list[int]:
        """Tokens of each input's prompt (instruction, template, text, image); 413 above `max_tokens`, naming the
        item as `field[index]` (or the instruction, when it alone is too long)."""
        counts = self._count([self._renderer.render(item, instruction) for item in items])
        costs = [count + image_tokens(item) for count, item in zip(counts, items, strict=True)]
        for index, cost in enumerate(costs):
            if cost > max_tokens:
                alone = self._count([instruction])[0] if instruction else 0
                param, where = ("instruction", None) if alone > max_tokens else (f"{field}[{index}]", index)
                raise _too_many_tokens(f"{field} {index}'s prompt", cost, max_tokens, param, where)
        return costs

    def maxsim_costs(
        self,
        query: Input,
        documents: Sequence[Input],
        query_instruction: str | None,
        document_instruction: str | None,
        max_tokens: int,
    ) -> list[int]:
        """Tokens of the query's prompt, then of each document's, each embedded alone (MaxSim reranking by a
        multi-vector embedder); 413 above `max_tokens`, naming the query or `documents[index]`."""
        try:
            query_cost = self.embedding_costs([query], query_instruction, max_tokens)
        except RequestError as err:
            param = err.param if err.param == "instruction" else "query"
            raise RequestError(err.message.replace("input 0's", "the query's"), param=param, status=413) from err
        return query_cost + self.embedding_costs(documents, document_instruction, max_tokens, field="documents")

    def rerank_costs(
        self, query: Input, documents: Sequence[Input], instruction: str | None, max_tokens: int
    ) -> list[int]:
        """Tokens of each (query, document) prompt; 413 above `max_tokens`, naming the field at fault.

        A pair's prompt repeats the query: the query, the instruction and each document are tokenized once, and
        a pair's count is theirs plus its template's (within a token or two of the joined prompt's, where
        pieces of text merge across a boundary).
        """
        query_tokens = self._text_tokens(query) + image_tokens(query)
        template: dict[tuple[bool, bool, bool], int] = {}
        costs = []
        for document, document_tokens in zip(documents, self._count([d.text or "" for d in documents]), strict=True):
            shape = (query.has_image, document.has_image, document.text is not None)
            if shape not in template:  # the prompt with empty texts: the template and the instruction
                blank = Input(text="" if query.text is not None else None, image=query.image)
                other = Input(text="" if document.text is not None else None, image=document.image)
                template[shape] = self._count([self._renderer.render_pair(blank, other, instruction)])[0]
            costs.append(template[shape] + query_tokens + document_tokens + image_tokens(document))
        for index, cost in enumerate(costs):
            if cost > max_tokens:
                fixed = min(template.values()) + query_tokens  # what every pair holds before its document
                param, where = ("query", None) if fixed > max_tokens else (f"documents[{index}]", index)
                if param == "query" and instruction and self._count([instruction])[0] > max_tokens:
                    param = "instruction"
                raise _too_many_tokens(f"the prompt of the query and document {index}", cost, max_tokens, param, where)
        return costs

    def _text_tokens(self, item: Input) -> int:
        return self._count([item.text])[0] if item.text else 0


def image_tokens(item: Input) -> int:
    """An image's share of a prompt: one token per 28x28 pixels (0 without an image)."""
    return -(-item.image_pixels // PIXELS_PER_TOKEN) if item.has_image else 0


def _too_many_tokens(what: str, count: int, limit: int, param: str, index: int | None) -> RequestError:
    return RequestError(
        f"{what} is {count} tokens after templating (instruction and images included); this server accepts at most "
        f"{limit} (max_input_tokens)",
        param=param,
        index=index,
        status=413,
    )


def echo_document(raw: Any) -> dict[str, Any]:
    """A document as results echo it: `{"text": ...}` for a string, the item as sent otherwise."""
    return {"text": raw} if isinstance(raw, str) else dict(raw)
