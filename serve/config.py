"""What an operator sets when starting the server (`unime serve ...`): models, backend, limits, batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

BackendName = Literal["auto", "vllm", "transformers"]


@dataclass
class ServeConfig:
    """Serve embeddings and reranking over HTTP: everything the server process needs (`unime serve` settings)."""

    embedder_dir: Annotated[tyro.conf.Positional[str | None], tyro.conf.arg(metavar="MODEL_DIR")] = None
    """Model directory of the embedder to host (`/v1/embeddings`); None hosts no embedder."""
    reranker_dir: Annotated[str | None, tyro.conf.arg(aliases=("--reranker",))] = None
    """Model directory of the reranker to host (`/v1/rerank`); None hosts no reranker."""
    backend: BackendName = "auto"
    """`vllm`: the vLLM engine; `transformers`: unime's own encode/rerank; `auto`: vLLM where it is installed."""
    reranker_backend: BackendName | None = None
    """Backend of the reranker when it should differ from `backend` (e.g. embedder on vLLM, reranker on
    transformers); None: the same as `backend`."""
    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default: expose it deliberately, behind a key)."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """When set, every route (health, metrics and the docs included) needs `Authorization: Bearer <key>`
    (`unime serve` default: `$UNIME_API_KEY`, else none)."""
    served_model_name: str | None = None
    """Name of the embedder in `/v1/models`, responses and the `model` field of `/v1/embeddings` (of the reranker
    when no embedder is hosted); default: its directory's name."""
    reranker_served_model_name: str | None = None
    """Name of the reranker in `/v1/models`, responses and the `model` field of `/v1/rerank`; default: its
    directory's name (or `served_model_name` when no embedder is hosted)."""

    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body accepted (413 above it); images count in their base64 form."""
    max_items: int = 256
    """Most inputs in one `/v1/embeddings` request, or documents in one `/v1/rerank` request."""
    max_text_chars: int = 20_000
    """Longest text accepted in one field: an input, the query, a document, the instruction."""
    max_input_tokens: int = 16_384
    """Longest prompt accepted for one input (embedder) or one query + document pair (reranker), in tokens after
    templating: instruction, template and text, and images at one token per 28x28 pixels."""
    max_tokens_per_item: int = 4096
    """Most token vectors in one returned matrix (`/v1/embeddings` with `"output": "multi_vector"`): an input whose
    matrix holds more is answered 413 naming it (a 4096 x 128 matrix is about 10 MB of JSON floats)."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width x height) accepted, checked from its header before decoding (decompression bombs)."""
    max_request_pixels: int = 2 * 4096 * 4096
    """Most image pixels in one request, all its images together, each checked from its header before decoding.
    (A merged batch holds at most `max_batch_tokens` tokens, images counted at one token per 28x28 pixels.)"""
    max_image_aspect_ratio: float = 200.0
    """Widest or tallest image accepted (long side / short side); Qwen2-VL's image processor refuses more."""
    allow_remote_images: bool = False
    """Accept `http(s)://` image URLs (never to loopback, private, link-local or reserved addresses)."""
    remote_image_timeout_s: float = 5.0
    """Timeout of one remote image download."""

    max_queue: int = 256
    """Requests waiting for the model at most; one more is answered 503 with Retry-After."""
    max_queue_wait_s: float = 30.0
    """Readiness: `/ready` answers 503 while a queued request has waited longer than this for the model (a request
    larger than a batch waits from the end of its last slice)."""
    batching: bool = True
    """Merge requests that arrive together into one batch (off: each request runs alone, batch-1 for
    one-item requests)."""
    max_batch_items: int = 64
    """Most inputs (or pairs) in one merged batch."""
    max_batch_tokens: int = 16_384
    """Most tokens in one merged batch (prompts after templating, images at one token per 28x28 pixels). A request
    with more is run in slices, and the requests queued behind it run between them."""
    batch_wait_ms: float = 2.0
    """How long the batcher waits for more requests after the first one before it runs a batch."""
    batch_wait_arriving_ms: float = 20.0
    """How long a batch may wait for requests already received and still being decoded (JSON, images): under
    load they join it instead of forming a small batch right after it. 0: do not wait for them."""
    retry_after_s: int = 1
    """Retry-After sent with a 503 when the queue is full."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM/SIGINT, how long requests in flight may take to finish; those still unanswered then get 503 with
    Retry-After, and the server exits 0 without waiting for the model."""
    http_workers: int = 0
    """HTTP front-end processes (`unime.serve.workers`): each accepts connections on the one listening socket,
    parses and decodes requests (JSON, base64, images) and sends the decoded inputs to this process, which loads
    the models and whose batchers merge the requests of all workers. 0: one process does everything."""

    dtype: str | None = None
    """Model dtype; default: what `unime.load` picks (bfloat16 on a GPU that supports it, else float32)."""
    device: str | None = None
    """transformers backend: device for the models (default: CUDA when available)."""
    tensor_parallel_size: int = 1
    """vLLM backend: GPUs to shard each model over."""
    enforce_eager: bool = False
    """vLLM backend: skip CUDA graphs / torch.compile (faster start, what tests use)."""
    gpu_memory_utilization: float | None = None
    """vLLM backend: fraction of GPU memory per engine (default vLLM's; lower it to host both models). On CPU, vLLM
    reads it as the share of all memory to reserve, which must be available at start."""
    kv_cache_gib: float | None = None
    """vLLM backend: KV cache size per engine, in GiB (default on GPU: what `gpu_memory_utilization` leaves; on
    CPU: a quarter of the memory available at start, at most 4 GiB, unless VLLM_CPU_KVCACHE_SPACE is set)."""

    def __post_init__(self) -> None:
        if self.embedder_dir is None and self.reranker_dir is None:
            raise ValueError("give an embedder directory, a reranker directory (--reranker), or both")
        positive = (
            "max_body_bytes",
            "max_items",
            "max_text_chars",
            "max_input_tokens",
            "max_tokens_per_item",
            "max_image_pixels",
        )
        for name in (*positive, "max_request_pixels", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reranker_served_model_name and self.reranker_dir is None:
            raise ValueError("a reranker name (--reranker-served-model-name) needs a reranker (--reranker)")
        if self.served_model_name and self.served_model_name == self.reranker_served_model_name:
            raise ValueError(f"the embedder and the reranker are both named {self.served_model_name!r}")
        if self.max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0, got {self.max_queue_wait_s}")
        if self.max_image_aspect_ratio < 1:
            raise ValueError(f"max_image_aspect_ratio must be >= 1, got {self.max_image_aspect_ratio}")
        if self.http_workers < 0:
            raise ValueError(f"http_workers must be >= 0, got {self.http_workers}")
        if self.max_batch_items < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_batch_items and max_batch_tokens must be >= 1")
        for name in ("backend", "reranker_backend"):
            if getattr(self, name) not in ("auto", "vllm", "transformers", None):
                raise ValueError(f"{name} must be auto, vllm or transformers, got {getattr(self, name)!r}")
