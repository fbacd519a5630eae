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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import State

from unime.multi_vector import maxsim_scores
from unime.pooling import finish_embeddings
from unime.serve.backends import BatchResult, TokenVectors
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


def check_token_vectors(model: HostedModel, param: str, otherwise: str) -> None:
    """Token vectors are asked of `model`: 400 when it has no multi-vector head (`otherwise`: what the client can do
    instead)."""
    if model.backend.multi_vector_dim is None:
        raise RequestError(
            f"model {model.name!r} is a single-vector embedder (no multi-vector head in its directory), so it gives "
            f"no token vectors; {otherwise}",
            param=param,
        )


def check_pooled_vectors(model: HostedModel) -> None:
    """Pooled vectors are asked of `model`: 501 where its backend gives its token vectors only (vLLM runs a
    multi-vector model on its late-interaction class, which pools no vector)."""
    if not getattr(model.backend, "single_vector", True):
        raise RequestError(
            f"the {model.backend.name} backend serves the token vectors of {model.name!r} only (its late-interaction "
            f'engine gives no pooled vector): ask with "output": "multi_vector", or serve it with --backend '
            "transformers for one vector per item",
            param="output",
            status=501,
        )


def prepare_embeddings(state: State, raw: bytes) -> tuple[EmbeddingCall, HostedModel, str | None, list[int]]:
    # In the thread pool, in one trip: decoding (JSON, images) and token counting are slow for large bodies.
    call = parse_embedding_request(load_json(raw), state.limits)
    model = model_for(state, "embedder", call.model)
    if call.output == "multi_vector":
        check_token_vectors(model, "output", 'leave "output" out (or "single_vector") for one vector per item')
    else:
        check_pooled_vectors(model)
    if call.dimensions is not None and call.dimensions > model.backend.dimension:
        raise RequestError(
            f"must be <= {model.backend.dimension} (the model's size), got {call.dimensions}", param="dimensions"
        )
    instruction = call.instruction if call.instruction is not None else model.backend.instruction_for(call.input_type)
    costs = state.tokens["embedder"].embedding_costs(call.items, instruction, state.config.max_input_tokens)
    return call, model, instruction, costs


def rerank_model(state: State, asked: str | None) -> HostedModel:
    """The reranker, or the embedder where the request names it and it has a multi-vector head (MaxSim scoring)."""
    embedder: HostedModel | None = state.hosted.get("embedder")
    reranker: HostedModel | None = state.hosted.get("reranker")
    if embedder is not None and asked == embedder.name:
        if embedder.backend.multi_vector_dim is None:  # the embedder exists, but cannot rank: not found as a ranker
            hosted = f"this server's reranker is {reranker.name!r}" if reranker else "this server hosts no reranker"
            raise RequestError(
                f"model {asked!r} is a single-vector embedder (no multi-vector head in its directory), which cannot "
                f"rank; {hosted}",
                param="model",
                status=404,
            )
        check_token_vectors(embedder, "model", "rank with a reranker")
        return embedder
    if asked is None and reranker is None and embedder is not None and embedder.backend.multi_vector_dim is not None:
        raise RequestError(
            f"this server hosts no reranker; name the multi-vector embedder {embedder.name!r} to rank by MaxSim",
            param="model",
            status=404,
        )
    return model_for(state, "reranker", asked)


@dataclass
class RerankJob:
    """A validated `/v1/rerank` request and what its model's queue gets."""

    call: RerankCall
    model: HostedModel
    inputs: list[Any]
    """(query, document) pairs for a reranker; the query then each document (`TokenVectors`) for an embedder."""
    instructions: list[str | None]
    costs: list[int]

    @property
    def by_maxsim(self) -> bool:
        return self.model.kind == "embedder"


def prepare_rerank(state: State, raw: bytes) -> RerankJob:
    call = parse_rerank_request(load_json(raw), state.limits)
    model = rerank_model(state, call.model)
    limit = state.config.max_input_tokens
    if model.kind == "embedder":
        # The query and each document are embedded alone, with the model's query and document instructions (the
        # request's instruction replaces the query's), as `encode_query` / `encode_document` would.
        query_instruction = call.instruction if call.instruction is not None else model.backend.instruction_for("query")
        document_instruction = model.backend.instruction_for("document")
        costs = state.tokens["embedder"].maxsim_costs(
            call.query, call.documents, query_instruction, document_instruction, limit
        )
        inputs: list[Any] = [TokenVectors(item) for item in (call.query, *call.documents)]
        instructions = [query_instruction] + [document_instruction] * len(call.documents)
        return RerankJob(call, model, inputs, instructions, costs)
    costs = state.tokens["reranker"].rerank_costs(call.query, call.documents, call.instruction, limit)
    pairs = [(call.query, document) for document in call.documents]
    return RerankJob(call, model, pairs, [call.instruction] * len(pairs), costs)


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
                # An embedder's size and the truncations (`dimensions`) it was trained for (any size works), and
                # the size of its token vectors (`"output": "multi_vector"`; null: it has no multi-vector head).
                **(
                    {
                        "dimensions": m.backend.dimension,
                        "matryoshka_dimensions": m.backend.matryoshka_dims,
                        "multi_vector_dimensions": m.backend.multi_vector_dim,
                    }
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
        items = call.items if call.output == "single_vector" else [TokenVectors(item) for item in call.items]
        pending = model.batcher.enqueue(items, [instruction] * len(call.items), costs)
    result: BatchResult = await pending
    if call.output == "multi_vector":
        # Off the event loop: a large matrix takes milliseconds to turn into JSON numbers or base64.
        data = await run_in_threadpool(
            token_matrix_data, result.matrices, call.encoding_format, call.dtype, state.config.max_tokens_per_item
        )
    else:
        vectors = truncate(result.values, call.dimensions, model.backend.normalize)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_vector(vector, call.encoding_format, call.dtype),
            }
            for index, vector in enumerate(vectors)
        ]
    state.metrics.items.labels("/v1/embeddings").inc(len(call.items))
    tokens = sum(result.tokens)
    return FastJSONResponse(
        {
            "object": "list",
            "data": data,
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
    # Before decoding, the model asked for is unknown: the reranker's batcher is told, where one is hosted.
    with arriving(state, "reranker" if "reranker" in state.hosted else "embedder"):
        job = await run_in_threadpool(prepare_rerank, state, raw)
        call, model = job.call, job.model
        pending = model.batcher.enqueue(job.inputs, job.instructions, job.costs)
    result: BatchResult = await pending
    if job.by_maxsim:
        scores = await run_in_threadpool(maxsim_relevance, result.matrices)
    else:
        scores = np.asarray(result.values, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[: call.top_n]
    results = []
    for index in order:
        entry: dict[str, Any] = {"index": int(index), "relevance_score": float(scores[index])}
        if call.return_documents:
            entry["document"] = echo_document(call.raw_documents[index])
        results.append(entry)
    state.metrics.items.labels("/v1/rerank").inc(len(call.documents))
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


def encode_vector(vector: np.ndarray, encoding_format: str, dtype: str = "float32") -> list | str:
    """float: a JSON list (of lists, for a token matrix); base64: the little-endian bytes of `dtype`, row after row
    (float32 is what the OpenAI client decodes)."""
    if encoding_format == "base64":
        little_endian = "<f2" if dtype == "float16" else "<f4"
        return base64.b64encode(np.ascontiguousarray(vector, dtype=little_endian).tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()  # Python floats, as float(x) of each gives


def token_matrix_data(
    matrices: Sequence[np.ndarray], encoding_format: str, dtype: str, max_tokens: int
) -> list[dict[str, Any]]:
    """The `data` of a multi-vector answer: each input's `[num_tokens, dim]` token vectors and their count; 413
    naming the first input whose matrix holds more than `max_tokens` (`max_tokens_per_item`)."""
    for index, matrix in enumerate(matrices):
        if len(matrix) > max_tokens:
            raise RequestError(
                f"input {index}'s token matrix holds {len(matrix)} token vectors; this server returns at most "
                f"{max_tokens} per item (max_tokens_per_item)",
                param=f"input[{index}]",
                index=index,
                status=413,
            )
    return [
        {
            "object": "embedding",
            "index": index,
            "embedding": encode_vector(matrix, encoding_format, dtype),
            "num_tokens": len(matrix),
        }
        for index, matrix in enumerate(matrices)
    ]


def maxsim_relevance(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """`[n_documents]` MaxSim scores of the query (the first matrix) against each document (the others), as
    `Embedder.maxsim` gives them: the sum over the query's tokens of their best cosine with a document token."""
    return maxsim_scores(matrices[:1], matrices[1:])[0].double().numpy()  # [n_documents]


__all__: Sequence[str] = (
    "FastJSONResponse",
    "encode_vector",
    "maxsim_relevance",
    "router",
    "token_matrix_data",
    "truncate",
)
