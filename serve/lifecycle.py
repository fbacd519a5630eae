"""A server process's lifecycle, shared by the one-process server (`unime.serve.server`) and the HTTP workers
(`unime.serve.workers`): load the hosted models, run uvicorn with a shutdown that ends with the grace period
(`ShutdownDeadline`), and exit at once without waiting for a forward pass (`exit_now`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import socket
import sys
from typing import Any, NoReturn

import uvicorn

from unime.errors import ConfigError
from unime.serve.app import error_response
from unime.serve.backends import load_embedder, load_reranker, resolve_backend, shared_multi_task_model
from unime.serve.config import ServeConfig
from unime.serve.errors import RequestError
from unime.serve.hosting import hosted_names

logger = logging.getLogger("unime.serve")

DEADLINE_MARGIN_S = 5
"""uvicorn's own graceful-shutdown timeout is this much longer than the grace period: a backstop that cancels what
is left only if the 503s of `ShutdownDeadline` could not be sent in that time."""


def load_models(config: ServeConfig) -> dict[str, Any]:
    """Load the hosted models (engines start here): `host_models`' keyword arguments."""
    backend = resolve_backend(config.backend)
    reranker_backend = resolve_backend(config.reranker_backend or config.backend)
    # A multi-task directory named as both the embedder and the reranker is loaded once: both heads share its weights.
    shared = shared_multi_task_model(backend, reranker_backend, config)
    embedder = load_embedder(backend, config.embedder_dir, config, shared) if config.embedder_dir else None
    reranker = load_reranker(reranker_backend, config.reranker_dir, config, shared) if config.reranker_dir else None
    embedder_name, reranker_name = hosted_names(config)
    return {"embedder": embedder, "reranker": reranker, "embedder_name": embedder_name, "reranker_name": reranker_name}


class ShutdownDeadline:
    """The requests open in one HTTP process, and their 503 when the shutdown grace period ends.

    `middleware` tracks each HTTP request's task; `expire` cancels the ones still open, and each answers 503 with
    Retry-After instead of the 500 a cancelled request would get. After `expire`, the app's lifespan shutdown is
    skipped: it would wait for the batchers, which may still be running the work of the requests just answered.
    """

    def __init__(self, retry_after_s: int):
        self.retry_after_s = retry_after_s
        self.expired = False
        self._open: set[asyncio.Task] = set()

    def expire(self) -> None:
        self.expired = True
        if self._open:
            logger.warning("shutdown grace period over: answering %d open requests 503", len(self._open))
        for task in list(self._open):
            task.cancel(msg="shutdown grace period over")

    def middleware(self, app: Any) -> Any:
        """The ASGI app `app` with its HTTP requests tracked (installed inside the guard, so metrics see 503)."""

        async def tracked(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await self._lifespan(app, scope, receive, send)
            elif scope["type"] == "http":
                await self._request(app, scope, receive, send)
            else:
                await app(scope, receive, send)

        return tracked

    async def _request(self, app: Any, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self._open.add(task)
        try:
            await app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            # Our cancel alone (not uvicorn's backstop): answer it.
            if not (self.expired and task.cancelling() == 1):
                raise
            task.uncancel()
            if not started:
                await self._answer_unavailable(scope, receive, send_tracked)
        finally:
            self._open.discard(task)

    async def _lifespan(self, app: Any, scope: dict, receive: Any, send: Any) -> None:
        skipped = False

        async def receive_unless_expired() -> dict:
            nonlocal skipped
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.expired:
                # The server goes on stopping; the app, still waiting for this message, is cancelled with the
                # event loop (the process then exits without waiting for the batchers).
                skipped = True
                await send({"type": "lifespan.shutdown.complete"})
                await asyncio.Future()
            return message

        async def send_unless_skipped(message: dict) -> None:
            if not skipped:
                await send(message)

        await app(scope, receive_unless_expired, send_unless_skipped)

    async def _answer_unavailable(self, scope: dict, receive: Any, send: Any) -> None:
        err = RequestError(
            "the server shut down before this request was answered (its shutdown grace period ran out); retry",
            status=503,
        )
        err.retry_after_s = self.retry_after_s
        await error_response(err)(scope, receive, send)


def install_shutdown_deadline(guarded_app: Any, config: ServeConfig) -> ShutdownDeadline:
    """Put a `ShutdownDeadline` between `create_app`'s guard and its routes."""
    deadline = ShutdownDeadline(config.retry_after_s)
    guarded_app.app = deadline.middleware(guarded_app.app)
    return deadline


def bind_listening_socket(config: ServeConfig) -> socket.socket:
    """The HTTP socket, bound before the models load. An engine that picks free ports while it starts (vLLM's does)
    could otherwise take the port meant for HTTP, and a port already in use now fails at once instead of after the
    models have loaded."""
    try:
        return uvicorn.Config(app=None, host=config.host, port=config.port, log_level="warning").bind_socket()
    except SystemExit:  # uvicorn logs the bind error and exits; say which setting to change
        raise ConfigError(f"cannot listen on {config.host}:{config.port} (in use?): choose another --port") from None


def uvicorn_config(app: Any, config: ServeConfig) -> Any:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=math.ceil(config.shutdown_grace_s) + DEADLINE_MARGIN_S,
        # The body limit is the guard's job; this bounds the headers uvicorn buffers.
        h11_max_incomplete_event_size=64 * 1024,
    )


def graceful_server(guarded_app: Any, config: ServeConfig) -> tuple[Any, ShutdownDeadline]:
    """A uvicorn server for `guarded_app` (from `create_app`) whose shutdown ends with the grace period.

    When the grace period ends, the requests still open are answered 503 and the server stops without the app's
    lifespan shutdown: the caller sees `deadline.expired` and exits.
    """
    deadline = install_shutdown_deadline(guarded_app, config)

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets: list | None = None) -> None:
            timer = asyncio.get_running_loop().call_later(config.shutdown_grace_s, deadline.expire)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return GracefulServer(uvicorn_config(guarded_app, config)), deadline


def banner(config: ServeConfig) -> str:
    hosts = ", ".join(name for name in (config.embedder_dir, config.reranker_dir) if name)
    backend = resolve_backend(config.backend)
    return f"unime serve: {hosts} with the {backend} backend on http://{config.host}:{config.port}"


def exit_now(status: int, message: str | None = None) -> NoReturn:
    """End the process without waiting for the batcher threads, which may be inside a forward pass.

    The interpreter's normal exit would run C++ destructors under a running torch/vLLM thread, which aborts the
    process ("terminate called without an active exception", SIGABRT); and it can take seconds to free what a
    process holds (a machine short of memory pages it back in) when the grace period is already spent. Child
    processes (a vLLM engine core) are stopped first, as the engine's own shutdown would have.
    """
    if message is not None:
        print(message, flush=True)
    logging.shutdown()
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(5)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
