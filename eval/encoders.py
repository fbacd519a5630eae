"""What the harness evaluates: anything that turns items into vectors, behind one protocol.

Backends:
- `UnimeEncoder`: a unime model directory or hub name, loaded through `unime.load` (or a loaded `Embedder`);
- `SentenceTransformersEncoder`: any sentence-transformers model (a text-only one gets text items only);
- `HTTPEncoder`: an OpenAI-style `POST {base}/v1/embeddings` endpoint, of unime's server or of vLLM.

The same benchmark runs on each of them, so their numbers compare. Each encoder has a `fingerprint` that
changes when the model or its settings change: it namespaces the embedding cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from unime.embedding_store import model_fingerprint
from unime.errors import ConfigError, UnimeError
from unime.inputs import Input

HTTPServer = Literal["unime", "vllm"]


class EncoderError(UnimeError, RuntimeError):
    """An encoder failed or answered something unusable; the message names the backend and the item."""


@runtime_checkable
class Encoder(Protocol):
    """Items in, one float32 vector per item out, row i for item i."""

    @property
    def fingerprint(self) -> str:
        """Identity of the model and its settings: equal fingerprints give equal vectors for equal items."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the results JSON records about this encoder."""
        ...

    def encode(self, items: Sequence[Input], *, batch_size: int = 32) -> np.ndarray:
        """`[len(items), dim]` float32."""
        ...


@runtime_checkable
class MultiVectorEncoder(Protocol):
    """An encoder that also gives token matrices, for late-interaction (MaxSim) scoring."""

    @property
    def has_multi_vector(self) -> bool:
        """Whether this encoder's model has a multi-vector head."""
        ...

    def encode_multi_vector(self, items: Sequence[Input], *, batch_size: int = 32) -> list[np.ndarray]:
        """One `[n_tokens_i, dim]` float32 matrix per item, row order = item order."""
        ...


def require_multi_vector(encoder: Encoder, setting: str) -> MultiVectorEncoder:
    """`encoder` as a `MultiVectorEncoder`, or a ConfigError naming its model and the `setting` that asked for
    token matrices."""
    if isinstance(encoder, MultiVectorEncoder) and encoder.has_multi_vector:
        return encoder
    described = encoder.describe()
    model = described.get("model", described.get("url", type(encoder).__name__))
    why = (
        "has no multi-vector head (its unime_config.json has no multi_vector section)"
        if isinstance(encoder, MultiVectorEncoder)
        else f"is evaluated through the {described.get('backend', '?')} backend, which gives single vectors only"
    )
    raise ConfigError(
        f"{setting}: multi-vector scoring needs token matrices, but the model {model} {why}; "
        f"set {setting} to 'single_vector' or evaluate a model with a multi-vector head"
    )


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def module_fingerprint(module: Any) -> str:
    """An in-memory torch module's identity: a hash of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _group_by_prompt(items: Sequence[Input]) -> dict[tuple[str | None, str | None], list[int]]:
    groups: dict[tuple[str | None, str | None], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[(item.role, item.instruction)].append(index)
    return groups


class UnimeEncoder:
    """A unime embedder: `model` is a loaded `Embedder`, or a directory / hub name passed to `unime.load`.

    A query item without its own instruction gets the model's configured query instruction, a document item
    the document instruction; an item without a role gets none.
    """

    def __init__(self, model: Any, *, truncate_dim: int | None = None, **load_kwargs: Any):
        import unime

        self.source = str(model) if isinstance(model, (str, os.PathLike)) else None
        self.model = unime.load(model, **load_kwargs) if self.source is not None else model
        self.truncate_dim = truncate_dim
        if self.source is not None and Path(self.source).is_dir():
            weights = model_fingerprint(self.source)
        else:
            weights = self.source if self.source is not None else module_fingerprint(self.model.model)
        self._fingerprint = _digest("unime", weights, self.model.config.to_dict(), truncate_dim, load_kwargs)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "unime",
            "model": self.source or "<in-memory Embedder>",
            "backbone": self.model.config.backbone,
            "truncate_dim": self.truncate_dim,
            "fingerprint": self.fingerprint,
        }

    @property
    def has_multi_vector(self) -> bool:
        """Whether the model holds a multi-vector head (`encode_multi_vector` works)."""
        return getattr(self.model, "multi_vector_head", None) is not None

    def _encode_by_prompt(self, items: Sequence[Input], batch_size: int, **encode_kwargs: Any) -> Iterator[Any]:
        """`(indices, output)` per group of items sharing a role and instruction: the model's `encode` applies one
        instruction per call, so each group is one call."""
        for (role, instruction), indices in _group_by_prompt(items).items():
            prompt: dict[str, Any] = {"prompt": instruction} if instruction is not None else {"prompt_name": role}
            yield (
                indices,
                self.model.encode(
                    [items[i].to_dict() for i in indices],
                    batch_size=batch_size,
                    show_progress_bar=False,
                    **prompt,
                    **encode_kwargs,
                ),
            )

    def encode(self, items: Sequence[Input], *, batch_size: int = 32) -> np.ndarray:
        out: np.ndarray | None = None
        for indices, vectors in self._encode_by_prompt(items, batch_size, truncate_dim=self.truncate_dim):
            # vectors: [n_group, D]
            if out is None:
                out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
            out[indices] = vectors
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def encode_multi_vector(self, items: Sequence[Input], *, batch_size: int = 32) -> list[np.ndarray]:
        """One `[n_tokens_i, dim]` float32 matrix of unit token vectors per item (the multi-vector head's kept
        tokens), in item order. `truncate_dim` does not apply: it truncates single vectors only."""
        out: list[np.ndarray] = [np.zeros((0, 0), dtype=np.float32)] * len(items)
        for indices, matrices in self._encode_by_prompt(items, batch_size, output="multi_vector"):
            for index, matrix in zip(indices, matrices, strict=True):
                out[index] = np.asarray(matrix, dtype=np.float32)  # [n_tokens, dim]
        return out


class SentenceTransformersEncoder:
    """Any sentence-transformers model (a name, a path, or a loaded `SentenceTransformer`).

    Roles map to the model's prompts of the same name when it has them (`prompt_name="query"`); an item's own
    instruction is passed as `prompt`. Images are passed as PIL images, which multimodal models accept.
    """

    def __init__(self, model: Any, *, normalize_embeddings: bool = True, **model_kwargs: Any):
        from sentence_transformers import SentenceTransformer

        self.source = str(model) if isinstance(model, (str, os.PathLike)) else None
        self.model = SentenceTransformer(self.source, **model_kwargs) if self.source is not None else model
        self.normalize_embeddings = normalize_embeddings
        if self.source is not None and Path(self.source).is_dir():
            weights = model_fingerprint(self.source)
        else:
            weights = self.source if self.source is not None else module_fingerprint(self.model)
        self._fingerprint = _digest("sentence-transformers", weights, normalize_embeddings, model_kwargs)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "sentence-transformers",
            "model": self.source or f"<in-memory {type(self.model).__name__}>",
            "fingerprint": self.fingerprint,
        }

    def encode(self, items: Sequence[Input], *, batch_size: int = 32) -> np.ndarray:
        from PIL import Image

        prompts = getattr(self.model, "prompts", {}) or {}
        out: np.ndarray | None = None
        for (role, instruction), indices in _group_by_prompt(items).items():
            inputs: list[Any] = []
            for i in indices:
                item = items[i]
                image = Image.open(item.image).convert("RGB") if item.image is not None else None
                if image is None:
                    inputs.append(item.text)
                elif item.text is None:
                    inputs.append(image)
                else:
                    inputs.append({"text": item.text, "image": image})
            kwargs: dict[str, Any] = {}
            if instruction is not None:
                kwargs["prompt"] = instruction
            elif role is not None and role in prompts:
                kwargs["prompt_name"] = role
            vectors = np.asarray(
                self.model.encode(
                    inputs,
                    batch_size=batch_size,
                    normalize_embeddings=self.normalize_embeddings,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                    **kwargs,
                ),
                dtype=np.float32,
            )  # [n_group, D]
            if out is None:
                out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
            out[indices] = vectors
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def image_data_uri(path: Path) -> str:
    """An image file as a `data:image/<type>;base64,...` URI (the file's own bytes, re-encoded by nobody)."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


class HTTPEncoder:
    """An OpenAI-style embeddings endpoint: `POST {base_url}/v1/embeddings`.

    Args:
        base_url: the server, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted).
        model: the `model` field of requests.
        server: `"unime"` (`unime serve`): one request per batch, `input` a list of strings and `{"text",
            "image"}` objects (images as data URIs), with `input_type` set from the items' role and `instruction`
            from their own instruction. `"vllm"`: vLLM's OpenAI server,
            where an image can only travel in a chat-style `messages` request that yields one vector, so every
            item is sent as its own `messages` request (text items too: that is how the server applies the
            model's chat template, which a unime model directory's embedding prompt lives in); an item's
            instruction (or `query_instruction` / `document_instruction` for its role) becomes a system
            message, as unime's own encode sends it.
        api_key: sent as `Authorization: Bearer <key>` when given (default: `$UNIME_EVAL_API_KEY` if set).
        timeout: seconds per request.
        concurrency: requests in flight at once (vLLM batches concurrent requests itself).
        query_instruction / document_instruction: for `server="vllm"`, the instructions of query and
            document items without their own (vLLM cannot know the model's configured ones).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        server: HTTPServer = "unime",
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 8,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
    ):
        if server not in ("unime", "vllm"):
            raise ValueError(f"server must be 'unime' or 'vllm', got {server!r}")
        base = base_url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/embeddings"
        self.model = model
        self.server = server
        self.api_key = api_key if api_key is not None else os.environ.get("UNIME_EVAL_API_KEY")
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.instructions = {"query": query_instruction, "document": document_instruction}
        self._fingerprint = _digest("http", self.url, model, server, self.instructions)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"backend": f"http-{self.server}", "url": self.url, "model": self.model, "fingerprint": self.fingerprint}

    def encode(self, items: Sequence[Input], *, batch_size: int = 32) -> np.ndarray:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.server == "unime":
            # One request per batch of items of one prompt (a request's input_type / instruction covers all of it).
            requests = [
                indices[start : start + batch_size]
                for indices in _group_by_prompt(items).values()
                for start in range(0, len(indices), batch_size)
            ]
        else:
            requests = [[index] for index in range(len(items))]
        out: list[np.ndarray | None] = [None] * len(items)
        with httpx.Client(timeout=self.timeout, headers=headers) as client:

            def send(indices: list[int]) -> None:
                body = (
                    self._unime_body(items, indices) if self.server == "unime" else self._vllm_body(items[indices[0]])
                )
                try:
                    response = client.post(self.url, json=body)
                except httpx.HTTPError as err:
                    raise EncoderError(
                        f"{self.url}: request for items {indices[0]}..{indices[-1]} failed ({err})"
                    ) from err
                if response.status_code != 200:
                    raise EncoderError(
                        f"{self.url}: HTTP {response.status_code} for items {indices[0]}..{indices[-1]}: "
                        f"{response.text[:500]}"
                    )
                data = sorted(response.json().get("data", []), key=lambda entry: entry.get("index", 0))
                if len(data) != len(indices):
                    raise EncoderError(f"{self.url}: {len(data)} embeddings returned for {len(indices)} inputs")
                for index, entry in zip(indices, data, strict=True):
                    out[index] = np.asarray(entry["embedding"], dtype=np.float32)

            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                for future in [pool.submit(send, indices) for indices in requests]:
                    future.result()
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)  # [n, D]

    def _unime_body(self, items: Sequence[Input], indices: list[int]) -> dict[str, Any]:
        inputs: list[Any] = []
        for index in indices:
            item = items[index]
            if item.image is None:
                inputs.append(item.text)
            else:
                entry: dict[str, str] = {"image": image_data_uri(item.image)}
                if item.text is not None:
                    entry["text"] = item.text
                inputs.append(entry)
        body: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": "float"}
        first = items[indices[0]]  # every item of a request shares its role and instruction (see encode)
        if first.role is not None:
            body["input_type"] = first.role
        if first.instruction is not None:
            body["instruction"] = first.instruction
        return body

    def _vllm_body(self, item: Input) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if item.image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_uri(item.image)}})
        if item.text is not None:
            content.append({"type": "text", "text": item.text})
        messages: list[dict[str, Any]] = []
        instruction = item.instruction if item.instruction is not None else self.instructions.get(item.role or "")
        if instruction:
            messages.append({"role": "system", "content": [{"type": "text", "text": instruction}]})
        messages.append({"role": "user", "content": content})
        return {"model": self.model, "messages": messages, "encoding_format": "float"}
