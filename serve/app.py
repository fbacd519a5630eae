"""The HTTP application: routes, the guard in front of them (key, body size, metrics) and error answers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from unime.errors import InvalidInputError
from unime.pooling import finish_embeddings
from unime.serve.backends import BatchResult, EmbedderBackend, RerankerBackend
from unime.serve.config import ServeConfig
from unime.serve.errors import RequestError
from unime.serve.metrics import ServerMetrics
from unime.serve.micro_batching import MicroBatcher
from unime.serve.protocol import (
    EmbeddingCall,
    EmbeddingRequest,
    Limits,
    PromptTokens,
    RerankCall,
    RerankRequest,
    echo_document,
    load_json,
    parse_embedding_request,
    parse_rerank_request,
)

try:  # optional speed-up (the `serve` extra installs it); the standard library's json otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

logger = logging.getLogger("unime.serve")

ROUTES = ("/health", "/ready", "/v1/models", "/metrics", "/v1/embeddings", "/v1/rerank", "/docs", "/openapi.json")

INTERNAL_ERROR = "internal server error; the server log has the details"
"""The one message a 500 carries: an exception's text and traceback go to the log, never to the client."""


class BodyTooLargeError(RequestError):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes", param="body", status=413)


class Batcher(Protocol):
    """What the routes need from the queue in front of a model.

    In one process it is the model's `MicroBatcher`; in an HTTP worker process (`--http-workers`) it is a
    `unime.serve.workers.RemoteBatcher`, which forwards each request to the model process's batcher.
    """

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        ...

    @property
    def oldest_wait_s(self) -> float:
        """Seconds the longest-waiting queued request has waited for the model (readiness)."""
        ...

    def arriving(self) -> contextlib.AbstractContextManager:
        """Announce a request whose body is in and that is being decoded, until it is queued."""
        ...

    def enqueue(self, inputs: list[Any], instructions: list[str | None], costs: list[int]) -> asyncio.Future:
        """Queue a request (`costs`: each input's tokens); its future gets its `BatchResult` (or the error)."""
        ...

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests; finish the queued ones."""
        ...


@dataclass
class HostedModel:
    """A model the server hosts: its public name, its backend and the batcher in front of it.

    `backend` is the backend itself, or in an HTTP worker a description of it (`workers.BackendInfo`): the
    routes read only its `name`, `dimension`, `normalize`, `matryoshka_dims` and `instruction_for`.
    """

    name: str
    kind: str
    backend: Any
    batcher: Batcher


def split_batch(result: BatchResult, sizes: list[int]) -> list[BatchResult]:
    parts, start = [], 0
    for size in sizes:
        parts.append(
            BatchResult(values=result.values[start : start + size], tokens=result.tokens[start : start + size])
        )
        start += size
    return parts


def join_batches(parts: list[BatchResult]) -> BatchResult:
    """The results of a request's slices (`MicroBatcher`), back in one."""
    return BatchResult(
        values=np.concatenate([part.values for part in parts]), tokens=[n for part in parts for n in part.tokens]
    )


def error_response(err: RequestError) -> JSONResponse:
    headers = {}
    if err.retry_after_s is not None:  # a full queue, a server shutting down
        headers["Retry-After"] = str(err.retry_after_s)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


class GuardMiddleware:
    """In front of every route: the API key (constant-time comparison), the body-size limit, and metrics."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_status)
            else:
                await self.app(scope, self._limited(receive), send_with_status)
        finally:
            self.metrics.in_flight.dec()
            status = status_holder["status"]
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(route, str(status)).inc()

    def _refusal(self, scope: dict) -> RequestError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest takes the same time wherever the first difference is: the key cannot be guessed
            # byte by byte from response times.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return RequestError("missing or wrong API key (send 'Authorization: Bearer <key>')", status=401)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return BodyTooLargeError(self.max_body_bytes)
        return None

    def _limited(self, receive: Any) -> Any:
        # Bodies without a (truthful) Content-Length are counted as they stream in.
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        return limited_receive


class FastJSONResponse(JSONResponse):
    """A JSON response rendered by orjson where installed (the `serve` extra): a 64-float vector in 3 us, not 68.

    Vectors arrive as Python floats (`ndarray.tolist()`), which orjson writes in their shortest round-trip
    form, as the standard library does, so a client parses the same numbers either way.
    """

    def render(self, content: Any) -> bytes:
        if orjson is None:
            return super().render(content)
        return orjson.dumps(content)


def host_models(
    config: ServeConfig,
    metrics: ServerMetrics,
    *,
    embedder: EmbedderBackend | None,
    reranker: RerankerBackend | None,
    embedder_name: str | None,
    reranker_name: str | None,
    observe_queue: Callable[[str, int], None] = lambda kind, depth: None,
) -> dict[str, HostedModel]:
    """The loaded models, each behind its own `MicroBatcher` (whose worker thread runs its batches).

    `observe_queue(kind, depth)` is told each new queue depth, beside the metrics.
    """

    def batcher_for(name: str, kind: str, run: Any) -> MicroBatcher:
        def queue_changed(depth: int) -> None:
            metrics.queue_depth.labels(name).set(depth)
            observe_queue(kind, depth)

        return MicroBatcher(
            name,
            run,
            split_batch,
            join=join_batches,
            max_queue=config.max_queue,
            max_batch_items=config.max_batch_items,
            max_batch_tokens=config.max_batch_tokens,
            wait_ms=config.batch_wait_ms,
            arriving_wait_ms=config.batch_wait_arriving_ms,
            batching=config.batching,
            retry_after_s=config.retry_after_s,
            observe_batch=lambda items, requests: (
                metrics.batch_items.labels(name).observe(items),
                metrics.batch_requests.labels(name).observe(requests),
            ),
            observe_queue=queue_changed,
        )

    hosted: dict[str, HostedModel] = {}
    if embedder is not None and embedder_name is not None:
        hosted["embedder"] = HostedModel(
            embedder_name, "embedder", embedder, batcher_for(embedder_name, "embedder", embedder.embed)
        )
    if reranker is not None and reranker_name is not None:
        hosted["reranker"] = HostedModel(
            reranker_name, "reranker", reranker, batcher_for(reranker_name, "reranker", reranker.score)
        )
    return hosted


def create_app(config: ServeConfig, hosted: dict[str, HostedModel], metrics: ServerMetrics) -> Any:
    """The ASGI app serving `hosted` (from `host_models`, or an HTTP worker's remote batchers), guarded."""
    limits = Limits.of(config)
    directories = {"embedder": config.embedder_dir, "reranker": config.reranker_dir}
    tokens = {kind: PromptTokens(directories[kind], kind) for kind in hosted}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has stopped accepting and let the requests in flight finish: stop the batchers.
        for model in hosted.values():
            await run_in_threadpool(model.batcher.close, config.shutdown_grace_s)

    app = FastAPI(
        title="unime server",
        description="Multimodal embeddings (OpenAI-compatible) and reranking (Cohere/Jina-shaped).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.hosted = hosted

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(InvalidInputError)
    async def on_invalid_input(request: Request, err: InvalidInputError) -> JSONResponse:
        return error_response(RequestError(str(err), index=err.index))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
        # Routing's refusals (no such route, a method the route does not take), in the API's error shape.
        if err.status_code == 404:
            refusal = RequestError(f"no route {request.url.path}; routes: {', '.join(ROUTES)}", param="path")
        elif err.status_code == 405:
            refusal = RequestError(f"{request.url.path} does not take {request.method}", param="method")
        else:
            refusal = RequestError(str(err.detail), param=None)
        refusal.status = err.status_code
        response = error_response(refusal)
        response.headers.update(err.headers or {})  # Allow, for a 405
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        # A failure of ours (or a model-side one the batcher has isolated to this request): logged with its
        # traceback, and answered with a fixed message, so that no internal detail reaches the client.
        name = getattr(err, "type_name", type(err).__name__)  # a model process's error, forwarded by name
        logger.error("request to %s failed: %s: %s", request.url.path, name, err, exc_info=err)
        body = {"error": {"message": INTERNAL_ERROR, "type": "server_error", "param": None}}
        body["error"].update(index=None, code=500)
        return JSONResponse(body, status_code=500)

    def arriving(kind: str) -> contextlib.AbstractContextManager:
        # The body is in: tell the model's batcher a request is on its way while it is decoded.
        model = hosted.get(kind)
        return model.batcher.arriving() if model is not None else contextlib.nullcontext()

    def model_for(kind: str, asked: str | None) -> HostedModel:
        model = hosted.get(kind)
        if model is None:
            raise RequestError(f"this server hosts no {kind}", status=404)
        if asked is not None and asked != model.name:
            raise RequestError(
                f"unknown model {asked!r}; this server's {kind} is {model.name!r} (models: "
                f"{', '.join(repr(m.name) for m in hosted.values())})",
                param="model",
                status=404,
            )
        return model

    def prepare_embeddings(raw: bytes) -> tuple[EmbeddingCall, HostedModel, str | None, list[int]]:
        # In the thread pool, in one trip: decoding (JSON, images) and token counting are slow for large bodies.
        call = parse_embedding_request(load_json(raw), limits)
        model = model_for("embedder", call.model)
        if call.dimensions is not None and call.dimensions > model.backend.dimension:
            raise RequestError(
                f"must be <= {model.backend.dimension} (the model's size), got {call.dimensions}", param="dimensions"
            )
        instruction = (
            call.instruction if call.instruction is not None else model.backend.instruction_for(call.input_type)
        )
        costs = tokens["embedder"].embedding_costs(call.items, instruction, config.max_input_tokens)
        return call, model, instruction, costs

    def prepare_rerank(raw: bytes) -> tuple[RerankCall, HostedModel, list[int]]:
        call = parse_rerank_request(load_json(raw), limits)
        model = model_for("reranker", call.model)
        costs = tokens["reranker"].rerank_costs(call.query, call.documents, call.instruction, config.max_input_tokens)
        return call, model, costs

    def waits() -> dict[str, float]:
        return {kind: m.batcher.oldest_wait_s for kind, m in hosted.items()}

    @app.get("/health", summary="Liveness: the models are loaded and the workers run")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": {
                kind: {"name": m.name, "backend": m.backend.name, "queue": m.batcher.depth}
                for kind, m in hosted.items()
            },
            "http_workers": config.http_workers,
            "pid": os.getpid(),  # the process that answered: one of the HTTP workers where there are several
        }

    @app.get("/ready", summary="Readiness: 503 while a queued request has waited longer than max_queue_wait_s")
    async def ready() -> JSONResponse:
        oldest = waits()
        stuck = {kind: wait for kind, wait in oldest.items() if wait > config.max_queue_wait_s}
        models = {
            kind: {"queue": m.batcher.depth, "oldest_wait_s": round(oldest[kind], 3)} for kind, m in hosted.items()
        }
        if not stuck:
            return JSONResponse({"status": "ready", "max_queue_wait_s": config.max_queue_wait_s, "models": models})
        kind, wait = max(stuck.items(), key=lambda entry: entry[1])
        refusal = RequestError(
            f"not ready: a request queued for the {kind} has waited {wait:.1f} s, longer than max_queue_wait_s "
            f"({config.max_queue_wait_s:g} s)",
            status=503,
        )
        body = {**refusal.to_json(), "status": "not ready", "models": models}
        return JSONResponse(body, 503, headers={"Retry-After": str(config.retry_after_s)})

    @app.get("/v1/models", summary="The hosted models (OpenAI-compatible)")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "owned_by": "unime",
                    "kind": kind,
                    "backend": m.backend.name,
                    # An embedder's size and the truncations (`dimensions`) it was trained for; any size works.
                    **(
                        {"dimensions": m.backend.dimension, "matryoshka_dimensions": m.backend.matryoshka_dims}
                        if kind == "embedder"
                        else {}
                    ),
                }
                for kind, m in hosted.items()
            ],
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post(
        "/v1/embeddings",
        summary="Embed texts, images and text+image items: one vector per item, in order",
        openapi_extra=_request_body("EmbeddingRequest"),
    )
    async def embeddings(request: Request) -> FastJSONResponse:
        raw = await request.body()
        with arriving("embedder"):
            call, model, instruction, costs = await run_in_threadpool(prepare_embeddings, raw)
            pending = model.batcher.enqueue(call.items, [instruction] * len(call.items), costs)
        result: BatchResult = await pending
        vectors = truncate(result.values, call.dimensions, model.backend.normalize)
        metrics.items.labels("/v1/embeddings").inc(len(call.items))
        tokens = sum(result.tokens)
        return FastJSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": index, "embedding": encode_vector(vector, call.encoding_format)}
                    for index, vector in enumerate(vectors)
                ],
                "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.post(
        "/v1/rerank",
        summary="Order documents by relevance to a query (Cohere/Jina shape)",
        openapi_extra=_request_body("RerankRequest"),
    )
    async def rerank(request: Request) -> FastJSONResponse:
        raw = await request.body()
        with arriving("reranker"):
            call, model, costs = await run_in_threadpool(prepare_rerank, raw)
            pairs = [(call.query, document) for document in call.documents]
            pending = model.batcher.enqueue(pairs, [call.instruction] * len(pairs), costs)
        result: BatchResult = await pending
        scores = np.asarray(result.values, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[: call.top_n]
        results = []
        for index in order:
            entry: dict[str, Any] = {"index": int(index), "relevance_score": float(scores[index])}
            if call.return_documents:
                entry["document"] = echo_document(call.raw_documents[index])
            results.append(entry)
        metrics.items.labels("/v1/rerank").inc(len(pairs))
        tokens = sum(result.tokens)
        return FastJSONResponse(
            {
                "id": f"rerank-{uuid.uuid4().hex}",
                "object": "rerank",
                "model": model.name,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model_class in (EmbeddingRequest, RerankRequest):
                model_schema = model_class.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model_class.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return GuardMiddleware(app, api_key=config.api_key, max_body_bytes=config.max_body_bytes, metrics=metrics)


def _request_body(schema_name: str) -> dict[str, Any]:
    # The handlers validate by hand (errors name field and index), so the body schema is declared here.
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
        }
    }


def truncate(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka: keep the first dims, renormalised when the model normalises (as `Embedder.encode` does).

    The backends return vectors normalised already; normalising a truncated unit vector gives the same result
    as truncating the raw one and normalising it.
    """
    if dimensions is None:
        return vectors
    return finish_embeddings(torch.from_numpy(vectors), normalize=normalize, truncate_dim=dimensions).numpy()


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: little-endian float32 bytes (what the OpenAI client decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()  # Python floats, as float(x) of each gives


def hosted_names(config: ServeConfig) -> tuple[str | None, str | None]:
    """Public names of the embedder and the reranker: the served names, else the directories' names.

    `served_model_name` names the embedder (the reranker when it is hosted alone), `reranker_served_model_name`
    the reranker.
    """

    def name(directory: str | None) -> str | None:
        return Path(directory).resolve().name if directory else None

    embedder, reranker = name(config.embedder_dir), name(config.reranker_dir)
    if config.served_model_name:
        if embedder is not None:
            embedder = config.served_model_name
        else:
            reranker = config.served_model_name
    if config.reranker_served_model_name:
        reranker = config.reranker_served_model_name
    return embedder, reranker


__all__: Sequence[str] = ("create_app", "host_models", "hosted_names")
