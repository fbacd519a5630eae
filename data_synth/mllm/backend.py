"""What every generation backend takes and gives back.

A backend turns requests (chat messages plus the answer's JSON schema) into results, in any order, as they
complete, so that the pipeline can write each record as soon as it is ready. A result has either the model's
text or a failure reason; failures are transport problems (timeouts, HTTP errors, a dead engine), not bad
answers, and are retried by the next run instead of being recorded as rejected.

A `PhotoBackend` (generation on a Ray cluster, `ray_generation.RayBackend`) takes `PhotoRequest`s instead: the
prompt and the photo's path, so that the driver holds paths, not every photo of the job as a data URL, and each
worker reads its photos itself (`read_request`, the same request a local backend gets).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from unime.data_synth.mllm.images import open_photo
from unime.data_synth.mllm.prompting import chat_messages, image_data_url


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


@dataclass(frozen=True)
class PhotoRequest:
    """A request before its photo is read."""

    key: str
    """The record's idempotent key."""
    prompt: str
    """The rendered prompt text."""
    photo: str
    """The photo's absolute path (on a cluster, every worker must see it)."""


def read_request(request: PhotoRequest, max_side: int) -> GenerationRequest:
    """The chat request of `request`: its photo downscaled to `max_side` as a data URL, then the prompt. Raises
    OSError when the photo cannot be read."""
    url = image_data_url(open_photo(request.photo), max_side=max_side)
    return GenerationRequest(request.key, chat_messages(request.prompt, url))


@runtime_checkable
class PhotoBackend(Protocol):
    """A backend whose workers read the photos (`ray_generation.RayBackend`)."""

    name: str
    """The model's name as recorded in the manifest."""

    def generate_photos(
        self, requests: Sequence[PhotoRequest], schema: dict[str, Any], max_side: int
    ) -> Iterator[GenerationResult]:
        """One result per request, in request order."""
        ...
