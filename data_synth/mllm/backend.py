"""What every generation backend takes and gives back.

A backend turns requests (chat messages plus the answer's JSON schema) into results, in any order, as they
complete, so that the pipeline can write each record as soon as it is ready. A result has either the model's
text or a failure reason; failures are transport problems (timeouts, HTTP errors, a dead engine), not bad
answers, and are retried by the next run instead of being recorded as rejected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationRequest:
    """One generation pass."""

    key: str
    """The record's idempotent key."""
    messages: list[dict[str, Any]]
    """Chat-completions messages (images as data URLs)."""


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one request."""

    key: str
    text: str | None = None
    """The model's answer, or None when the request failed."""
    truncated: bool = False
    """The answer stopped at the token limit."""
    failure: str | None = None
    """Why no answer came back (e.g. "endpoint_timeout", "endpoint_http_503", "engine_exited")."""
    attempts: int = 1
    """Requests sent for it (retries included)."""


class Backend(Protocol):
    """A generation backend (`OpenAIBackend`, `VllmBackend`)."""

    name: str
    """The model's name as recorded in the manifest."""

    def generate(self, requests: Iterable[GenerationRequest], schema: dict[str, Any]) -> Iterator[GenerationResult]:
        """One result per request, in completion order."""
        ...
