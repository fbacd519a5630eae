"""Any OpenAI-compatible chat-completions endpoint: async requests, bounded concurrency, retries, timeouts.

The event loop runs in a worker thread and hands results to the caller through a queue as they complete, so
the caller writes (and a killed run loses) at most the requests in flight. Retried: timeouts, connection
errors, HTTP 429 and 5xx, with exponential backoff (honouring `Retry-After`). Not retried: other 4xx (the
request itself is wrong). A request that still fails is returned with its failure reason.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from unime.data_synth.mllm.backend import GenerationRequest, GenerationResult
from unime.errors import ConfigError


@dataclass(frozen=True)
class OpenAIBackendConfig:
    """Settings of the OpenAI-compatible backend."""

    base_url: str = ""
    """The API root, e.g. "https://api.openai.com/v1" or "http://localhost:8000/v1"; required."""
    model: str = ""
    """The model name sent with each request (and recorded in the manifest); required."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset: no Authorization header)."""
    concurrency: int = 8
    """Requests in flight at once."""
    timeout_s: float = 120.0
    """Per-request timeout (connect, read and write)."""
    max_retries: int = 4
    """Retries after the first attempt, on timeouts, connection errors, 429 and 5xx."""
    backoff_s: float = 1.0
    """First retry delay; doubled each retry, plus up to 10% jitter."""
    backoff_max_s: float = 30.0
    """Longest delay between retries (also caps `Retry-After`)."""
    max_tokens: int = 1024
    """Answer length limit."""
    temperature: float = 0.7
    """Sampling temperature."""
    structured_output: bool = True
    """Send the answer's JSON schema as `response_format` (endpoints without it answer HTTP 400: turn off)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ConfigError("max_retries and backoff_s must be >= 0 and timeout_s > 0")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")


class OpenAIBackend:
    """Generate through an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, config: OpenAIBackendConfig):
        if not config.base_url or not config.model:
            raise ConfigError("the OpenAI backend needs a base URL and a model (--openai.base-url, --openai.model)")
        self.config = config
        self.name = config.model

    def generate(self, requests: Iterable[GenerationRequest], schema: dict[str, Any]) -> Iterator[GenerationResult]:
        results: queue.Queue = queue.Queue()
        done = object()
        stop = threading.Event()

        def run() -> None:
            try:
                asyncio.run(self._run_all(requests, schema, results, stop))
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, re-raised there
                results.put(err)
            finally:
                results.put(done)

        worker = threading.Thread(target=run, name="openai-backend", daemon=True)
        worker.start()
        try:
            while (item := results.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the caller stopped early (or failed): let the loop wind down
            worker.join(timeout=self.config.timeout_s)

    async def _run_all(
        self, requests: Iterable[GenerationRequest], schema: dict[str, Any], results: queue.Queue, stop
    ) -> None:
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.config.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        slots_count = self.config.concurrency
        limits = httpx.Limits(max_connections=slots_count, max_keepalive_connections=slots_count)
        slots = asyncio.Semaphore(self.config.concurrency)
        async with httpx.AsyncClient(
            base_url=self.config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(self.config.timeout_s),
            limits=limits,
        ) as client:
            pending: set[asyncio.Task] = set()

            async def one(request: GenerationRequest) -> None:
                try:
                    results.put(await self._complete(client, request, schema))
                finally:
                    slots.release()

            # Requests are built lazily (each reads and encodes a photo), at most `concurrency` ahead, and in
            # a worker thread, so that decoding the next photo does not hold up the answers arriving meanwhile.
            iterator = iter(requests)
            while not stop.is_set():
                await slots.acquire()
                request = await asyncio.to_thread(next, iterator, None)
                if request is None:
                    slots.release()
                    break
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)

    def _body(self, request: GenerationRequest, schema: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": request.messages,
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        if self.config.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "generated_example", "schema": schema, "strict": True},
            }
        return body

    async def _complete(
        self, client: httpx.AsyncClient, request: GenerationRequest, schema: dict[str, Any]
    ) -> GenerationResult:
        body = self._body(request, schema)
        failure = "endpoint_error"
        for attempt in range(1, self.config.max_retries + 2):
            retry_after = None
            try:
                # httpx's timeout bounds each phase (connect, each read); wait_for bounds the whole request,
                # so an endpoint that trickles its answer slowly times out too.
                response = await asyncio.wait_for(
                    client.post("chat/completions", json=body), timeout=self.config.timeout_s
                )
            except (httpx.TimeoutException, asyncio.TimeoutError):
                failure = "endpoint_timeout"
            except httpx.TransportError:
                failure = "endpoint_connection_error"
            else:
                if response.status_code == 200:
                    return _result(request.key, response, attempt)
                failure = f"endpoint_http_{response.status_code}"
                if response.status_code != 429 and response.status_code < 500:
                    return GenerationResult(request.key, failure=failure, attempts=attempt)
                retry_after = _retry_after_s(response)
            if attempt <= self.config.max_retries:
                delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
                delay = delay * (1 + 0.1 * random.random())
                if retry_after is not None:
                    delay = min(self.config.backoff_max_s, max(delay, retry_after))
                await asyncio.sleep(delay)
        return GenerationResult(request.key, failure=failure, attempts=self.config.max_retries + 1)


def _result(key: str, response: httpx.Response, attempts: int) -> GenerationResult:
    """The answer of a 200 response; one that is not a chat completion is an endpoint failure, not an answer."""
    try:
        choice = response.json()["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (ValueError, KeyError, IndexError, TypeError):
        return GenerationResult(key, failure="endpoint_bad_response", attempts=attempts)
    return GenerationResult(key, text=text, truncated=choice.get("finish_reason") == "length", attempts=attempts)


def _retry_after_s(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
