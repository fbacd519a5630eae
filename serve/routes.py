"""The routes: one small handler per route, reading the server's state from `request.app.state`.

`create_app` (`unime.serve.app`) sets that state: `config` (the `ServeConfig`), `hosted` (kind -> `HostedModel`),
`metrics`, `limits` (`Limits.of(config)`) and `tokens` (kind -> `PromptTokens`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import State

from unime.pooling import finish_embeddings
from unime.serve.backends import BatchResult
from unime.serve.errors import RequestError
from unime.serve.hosting import HostedModel
from unime.serve.protocol import (
    EmbeddingCall,
    RerankCall,
    echo_document,
    load_json,
    parse_embedding_request,
    parse_rerank_request,
)

try:  # optional speed-up (the `serve` extra installs it); the standard library's json otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

router = APIRouter()


class FastJSONResponse(JSONResponse):
    """A JSON response rendered by orjson where installed (the `serve` extra): a 64-float vector in 3 us, not 68.

    Vectors arrive as Python floats (`ndarray.tolist()`), which orjson writes in their shortest round-trip
    form, as the standard library does, so a client parses the same numbers either way.
    """

    def render(self, content: Any) -> bytes:
        if orjson is None:
            return super().render(content)
        return orjson.dumps(content)


def request_body(schema_name: str) -> dict[str, Any]:
    # The handlers validate by hand (errors name field and index), so the body schema is declared here.
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
        }
    }


def arriving(state: State, kind: str) -> contextlib.AbstractContextManager:
    # The body is in: tell the model's batcher a request is on its way while it is decoded.
    model = state.hosted.get(kind)
    return model.batcher.arriving() if model is not None else contextlib.nullcontext()


def model_for(state: State, kind: str, asked: str | None) -> HostedModel:
    hosted: dict[str, HostedModel] = state.hosted
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


def prepare_embeddings(state: State, raw: bytes) -> tuple[EmbeddingCall, HostedModel, str | None, list[int]]:
    # In the thread pool, in one trip: decoding (JSON, images) and token counting are slow for large bodies.
    call = parse_embedding_request(load_json(raw), state.limits)
    model = model_for(state, "embedder", call.model)
    if call.dimensions is not None and call.dimensions > model.backend.dimension:
        raise RequestError(
            f"must be <= {model.backend.dimension} (the model's size), got {call.dimensions}", param="dimensions"
        )
    instruction = call.instruction if call.instruction is not None else model.backend.instruction_for(call.input_type)
    costs = state.tokens["embedder"].embedding_costs(call.items, instruction, state.config.max_input_tokens)
    return call, model, instruction, costs


def prepare_rerank(state: State, raw: bytes) -> tuple[RerankCall, HostedModel, list[int]]:
    call = parse_rerank_request(load_json(raw), state.limits)
    model = model_for(state, "reranker", call.model)
    costs = state.tokens["reranker"].rerank_costs(
        call.query, call.documents, call.instruction, state.config.max_input_tokens
    )
    return call, model, costs


@router.get("/health", summary="Liveness: the models are loaded and the workers run")
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {
        "status": "ok",
        "models": {
            kind: {"name": m.name, "backend": m.backend.name, "queue": m.batcher.depth}
            for kind, m in state.hosted.items()
        },
        "http_workers": state.config.http_workers,
        "pid": os.getpid(),  # the process that answered: one of the HTTP workers where there are several
    }


@router.get("/ready", summary="Readiness: 503 while a queued request has waited longer than max_queue_wait_s")
async def ready(request: Request) -> JSONResponse:
    hosted: dict[str, HostedModel] = request.app.state.hosted
    config = request.app.state.config
    oldest = {kind: m.batcher.oldest_wait_s for kind, m in hosted.items()}
    stuck = {kind: wait for kind, wait in oldest.items() if wait > config.max_queue_wait_s}
    models = {kind: {"queue": m.batcher.depth, "oldest_wait_s": round(oldest[kind], 3)} for kind, m in hosted.items()}
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


@router.get("/v1/models", summary="The hosted models (OpenAI-compatible)")
async def models(request: Request) -> dict[str, Any]:
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
            for kind, m in request.app.state.hosted.items()
        ],
    }


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


@router.post(
    "/v1/embeddings",
    summary="Embed texts, images and text+image items: one vector per item, in order",
    openapi_extra=request_body("EmbeddingRequest"),
)
async def embeddings(request: Request) -> FastJSONResponse:
    state = request.app.state
    raw = await request.body()
    with arriving(state, "embedder"):
        call, model, instruction, costs = await run_in_threadpool(prepare_embeddings, state, raw)
        pending = model.batcher.enqueue(call.items, [instruction] * len(call.items), costs)
    result: BatchResult = await pending
    vectors = truncate(result.values, call.dimensions, model.backend.normalize)
    state.metrics.items.labels("/v1/embeddings").inc(len(call.items))
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


@router.post(
    "/v1/rerank",
    summary="Order documents by relevance to a query (Cohere/Jina shape)",
    openapi_extra=request_body("RerankRequest"),
)
async def rerank(request: Request) -> FastJSONResponse:
    state = request.app.state
    raw = await request.body()
    with arriving(state, "reranker"):
        call, model, costs = await run_in_threadpool(prepare_rerank, state, raw)
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
    state.metrics.items.labels("/v1/rerank").inc(len(pairs))
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


__all__: Sequence[str] = ("FastJSONResponse", "encode_vector", "router", "truncate")
