"""Errors the server answers with: a status, a message, and the request field (and item index) at fault."""

from __future__ import annotations

from typing import Any

from unime.errors import UnimeError


class RequestError(UnimeError):
    """A request the server refuses; becomes `{"error": {"message", "type", "param", "index", "code"}}`."""

    retry_after_s: int | None = None
    """Seconds a client should wait before retrying (sent as `Retry-After`); None: no header."""

    def __init__(self, message: str, *, param: str | None = None, index: int | None = None, status: int = 400):
        self.message = message
        self.param = param
        self.index = index
        self.status = status
        super().__init__(f"{param}: {message}" if param else message)

    @property
    def error_type(self) -> str:
        return {
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            501: "not_implemented_error",
            503: "server_overloaded",
        }.get(self.status, "invalid_request_error")

    def to_json(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.error_type,
                "param": self.param,
                "index": self.index,
                "code": self.status,
            }
        }


class QueueFullError(RequestError):
    """The bounded queue in front of a model is full: the client should retry later (503 + Retry-After)."""

    def __init__(self, model: str, retry_after_s: int):
        super().__init__(f"the queue of model {model!r} is full; retry later", status=503)
        self.retry_after_s = retry_after_s


class ShuttingDownError(RequestError):
    """The server is finishing the requests in flight and takes no new ones."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down", status=503)
        self.retry_after_s = 1
