"""Start the server: load the hosted models with the chosen backend, then serve HTTP until a signal.

    unime serve MODEL_DIR [--reranker DIR] [--backend auto|vllm|transformers] [--port 8000] [--api-key KEY]

On SIGTERM or SIGINT the server stops accepting connections, lets the requests in flight finish (up to
`shutdown_grace_s`), stops its batchers and exits 0. With `http_workers` > 0, HTTP is served by that many
worker processes in front of this one (`unime.serve.workers`).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from unime.serve.config import ServeConfig

logger = logging.getLogger("unime.serve")


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


def uvicorn_config(app: Any, config: ServeConfig) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=int(config.shutdown_grace_s),
        # The body limit is the guard's job; this bounds the headers uvicorn buffers.
        h11_max_incomplete_event_size=64 * 1024,
    )


def banner(config: ServeConfig) -> str:
    from unime.serve.backends import resolve_backend

    hosts = ", ".join(name for name in (config.embedder_dir, config.reranker_dir) if name)
    backend = resolve_backend(config.backend)
    return f"unime serve: {hosts} with the {backend} backend on http://{config.host}:{config.port}"


def serve(config: ServeConfig) -> int:
    if config.http_workers:
        from unime.serve.workers import serve_with_http_workers

        return serve_with_http_workers(config)
    import uvicorn

    server = uvicorn.Server(uvicorn_config(build_app(config), config))
    print(banner(config), flush=True)
    # uvicorn catches SIGTERM/SIGINT while it serves, drains, then raises the signal again against the handler
    # that was in place before it started: a no-op here, so that a graceful stop ends with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_graceful_stop)
    server.run()
    print("unime serve: stopped", flush=True)
    return 0


def _after_graceful_stop(signum: int, frame: object) -> None:
    del signum, frame  # the server has already stopped


if __name__ == "__main__":
    sys.exit(serve(ServeConfig(embedder_dir=sys.argv[1])))
