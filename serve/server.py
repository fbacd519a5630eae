"""Start the server: load the hosted models with the chosen backend, then serve HTTP until a signal.

    unime serve MODEL_DIR [--reranker DIR] [--backend auto|vllm|transformers] [--port 8000] [--api-key KEY]

On SIGTERM or SIGINT the server stops accepting connections, lets the requests in flight finish, stops its
batchers and exits 0. Requests still unanswered after `shutdown_grace_s` get 503 with Retry-After
(`ShutdownDeadline`), and the process then exits 0 without waiting for the model, as it does on a second signal:
a forward pass cannot be interrupted, and an interpreter exit under a running torch or vLLM thread aborts the
process. With `http_workers` > 0, HTTP is served by that many worker processes in front of this one
(`unime.serve.workers`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import signal
import sys
from typing import Any

from unime.errors import ConfigError
from unime.serve.config import ServeConfig
from unime.serve.errors import RequestError

logger = logging.getLogger("unime.serve")

DEADLINE_MARGIN_S = 5
"""uvicorn's own graceful-shutdown timeout is this much longer than the grace period: a backstop that cancels what
is left only if the 503s of `ShutdownDeadline` could not be sent in that time."""


def load_models(config: ServeConfig) -> dict[str, Any]:
    """Load the hosted models (engines start here): `host_models`' keyword arguments."""
    from unime.serve.app import hosted_names
    from unime.serve.backends import load_embedder, load_reranker, resolve_backend

    backend = resolve_backend(config.backend)
    reranker_backend = resolve_backend(config.reranker_backend or config.backend)
    embedder = load_embedder(backend, config.embedder_dir, config) if config.embedder_dir else None
    reranker = load_reranker(reranker_backend, config.reranker_dir, config) if config.reranker_dir else None
    embedder_name, reranker_name = hosted_names(config)
    return {"embedder": embedder, "reranker": reranker, "embedder_name": embedder_name, "reranker_name": reranker_name}


def build_app(config: ServeConfig):
    """Load the models and return the ASGI app (one process: HTTP and the batchers)."""
    from unime.serve.app import create_app, host_models
    from unime.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    return create_app(config, host_models(config, metrics, **load_models(config)), metrics)


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
        from unime.serve.app import error_response

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


def uvicorn_config(app: Any, config: ServeConfig) -> Any:
    import uvicorn

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
    import uvicorn

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
    from unime.serve.backends import resolve_backend

    hosts = ", ".join(name for name in (config.embedder_dir, config.reranker_dir) if name)
    backend = resolve_backend(config.backend)
    return f"unime serve: {hosts} with the {backend} backend on http://{config.host}:{config.port}"


def serve(config: ServeConfig) -> int:
    """Serve until a signal: exit status 0; 2 where the models cannot be loaded as configured (a message names the
    setting to change, e.g. an engine's memory, instead of a stack trace)."""
    from unime.serve.backends import EngineStartError

    try:
        if config.http_workers:
            from unime.serve.workers import serve_with_http_workers

            return serve_with_http_workers(config)
        return _serve_in_one_process(config)
    except (ConfigError, EngineStartError) as err:
        print(f"unime serve: error: {err}", file=sys.stderr, flush=True)
        return 2


def _serve_in_one_process(config: ServeConfig) -> int:
    server, deadline = graceful_server(build_app(config), config)
    print(banner(config), flush=True)
    # uvicorn catches SIGTERM/SIGINT while it serves, drains, then raises the signal again against the handler
    # that was in place before it started: a no-op here, so that a graceful stop ends with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_graceful_stop)
    server.run()
    if deadline.expired:
        exit_now(0, "unime serve: stopped (grace period over; unfinished requests were answered 503)")
    if server.force_exit:  # a second signal: uvicorn stopped without waiting, and so must the batchers
        exit_now(0, "unime serve: stopped (forced by a second signal; requests in flight were cut short)")
    print("unime serve: stopped", flush=True)
    return 0


def exit_now(status: int, message: str | None = None) -> None:
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


def _after_graceful_stop(signum: int, frame: object) -> None:
    del signum, frame  # the server has already stopped


if __name__ == "__main__":
    sys.exit(serve(ServeConfig(embedder_dir=sys.argv[1])))
