"""The HTTP application: the guard in front of the routes (key, body size, metrics), error answers, OpenAPI.

The routes themselves are in `unime.serve.routes`; the hosted models and their batchers in `unime.serve.hosting`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from unime.errors import InvalidInputError
from unime.serve.config import ServeConfig
from unime.serve.errors import RequestError
from unime.serve.hosting import HostedModel
from unime.serve.metrics import ServerMetrics
from unime.serve.protocol import EmbeddingRequest, Limits, PromptTokens, RerankRequest
from unime.serve.routes import router

logger = logging.getLogger("unime.serve")

ROUTES = ("/health", "/ready", "/v1/models", "/metrics", "/v1/embeddings", "/v1/rerank", "/docs", "/openapi.json")

INTERNAL_ERROR = "internal server error; the server log has the details"
"""The one message a 500 carries: an exception's text and traceback go to the log, never to the client."""


class BodyTooLargeError(RequestError):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes", param="body", status=413)


def error_response(err: RequestError) -> JSONResponse:
    headers = {}
    if err.retry_after_s is not None:  # a full queue, a server shutting down
        headers["Retry-After"] = str(err.retry_after_s)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


class GuardMiddleware:
    """In front of every route: the API key (constant-time comparison), the body-size limit, and metrics."""

    def __init__(self, app: Any, config: ServeConfig, metrics: ServerMetrics):
        self.app = app
        self.api_key = config.api_key.encode() if config.api_key else None
        self.max_body_bytes = config.max_body_bytes
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


def create_app(config: ServeConfig, hosted: dict[str, HostedModel], metrics: ServerMetrics) -> GuardMiddleware:
    """The ASGI app serving `hosted` (from `host_models`, or an HTTP worker's remote batchers), guarded.

    The routes read what they need from `app.state`; `unime.serve.lifecycle` puts its shutdown deadline between
    the guard and the app (`GuardMiddleware.app`).
    """
    app = FastAPI(
        title="unime server",
        description="Multimodal embeddings (OpenAI-compatible) and reranking (Cohere/Jina-shaped).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.hosted = hosted
    app.state.metrics = metrics
    app.state.limits = Limits.of(config)
    directories = {"embedder": config.embedder_dir, "reranker": config.reranker_dir}
    app.state.tokens = {kind: PromptTokens(directories[kind], kind) for kind in hosted}
    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(InvalidInputError, on_invalid_input)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.include_router(router)
    app.openapi = lambda: openapi_schema(app)
    return GuardMiddleware(app, config, metrics)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # uvicorn has stopped accepting and let the requests in flight finish: stop the batchers.
    for model in app.state.hosted.values():
        await run_in_threadpool(model.batcher.close, app.state.config.shutdown_grace_s)


async def on_request_error(request: Request, err: RequestError) -> JSONResponse:
    return error_response(err)


async def on_invalid_input(request: Request, err: InvalidInputError) -> JSONResponse:
    return error_response(RequestError(str(err), index=err.index))


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


async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
    # A failure of ours (or a model-side one the batcher has isolated to this request): logged with its
    # traceback, and answered with a fixed message, so that no internal detail reaches the client.
    name = getattr(err, "type_name", type(err).__name__)  # a model process's error, forwarded by name
    logger.error("request to %s failed: %s: %s", request.url.path, name, err, exc_info=err)
    body = {"error": {"message": INTERNAL_ERROR, "type": "server_error", "param": None}}
    body["error"].update(index=None, code=500)
    return JSONResponse(body, status_code=500)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    # The request bodies are validated by hand, so their models' schemas are added to the generated one.
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model_class in (EmbeddingRequest, RerankRequest):
            model_schema = model_class.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model_class.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema


__all__: Sequence[str] = ("GuardMiddleware", "create_app", "error_response")
