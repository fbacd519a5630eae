"""Start the server: load the hosted models with the chosen backend, then serve HTTP until a signal.

    unime serve MODEL_DIR [--reranker DIR] [--backend auto|vllm|transformers] [--port 8000] [--api-key KEY]

On SIGTERM or SIGINT the server stops accepting connections, lets the requests in flight finish, stops its
batchers and exits 0. Requests still unanswered after `shutdown_grace_s` get 503 with Retry-After
(`unime.serve.lifecycle.ShutdownDeadline`), and the process then exits 0 without waiting for the model, as it
does on a second signal: a forward pass cannot be interrupted. Every stop ends with `exit_now`, a graceful one
too: the interpreter's own exit, under the threads a vLLM engine leaves behind, can abort the process (SIGABRT)
after everything was answered. With `http_workers` > 0, HTTP is served by that many worker processes in front
of this one (`unime.serve.workers`).
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

from unime.errors import ConfigError
from unime.serve.app import create_app
from unime.serve.backends import EngineStartError
from unime.serve.config import ServeConfig
from unime.serve.hosting import host_models
from unime.serve.lifecycle import banner, bind_listening_socket, exit_now, graceful_server, load_models
from unime.serve.metrics import ServerMetrics
from unime.serve.workers import serve_with_http_workers


def build_app(config: ServeConfig):
    """Load the models and return the ASGI app (one process: HTTP and the batchers)."""
    metrics = ServerMetrics()
    return create_app(config, host_models(config, metrics, **load_models(config)), metrics)


def serve(config: ServeConfig) -> int:
    """Serve until a signal, then end the process (`exit_now`, status 0, or 1 where an HTTP worker died); return
    2 where the models cannot be loaded as configured (a message names the setting to change, e.g. an engine's
    memory, instead of a stack trace)."""
    try:
        if config.http_workers:
            return serve_with_http_workers(config)
        return _serve_in_one_process(config)
    except (ConfigError, EngineStartError) as err:
        print(f"unime serve: error: {err}", file=sys.stderr, flush=True)
        return 2


def _serve_in_one_process(config: ServeConfig) -> NoReturn:
    sock = bind_listening_socket(config)
    try:
        server, deadline = graceful_server(build_app(config), config)
        print(banner(config), flush=True)
        # uvicorn catches SIGTERM/SIGINT while it serves, drains, then raises the signal again against the handler
        # that was in place before it started: a no-op here, so that a graceful stop ends with exit status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _after_graceful_stop)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if deadline.expired:
        exit_now(0, "unime serve: stopped (grace period over; unfinished requests were answered 503)")
    if server.force_exit:  # a second signal: uvicorn stopped without waiting, and so must the batchers
        exit_now(0, "unime serve: stopped (forced by a second signal; requests in flight were cut short)")
    exit_now(0, "unime serve: stopped")


def _after_graceful_stop(signum: int, frame: object) -> None:
    del signum, frame  # the server has already stopped


if __name__ == "__main__":
    sys.exit(serve(ServeConfig(embedder_dir=sys.argv[1])))
