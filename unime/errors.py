"""Errors that name what was wrong and where, so that a user can fix the input without a debugger."""

from __future__ import annotations


class UnimeError(Exception):
    """Base class of the errors unime raises on purpose."""


class InvalidInputError(UnimeError, ValueError):
    """An input to encode/rank is malformed; the message names its index in the call."""

    def __init__(self, index: int | None, problem: str):
        self.index = index
        where = f"input {index}" if index is not None else "input"
        super().__init__(f"{where}: {problem}")


class ModelLoadError(UnimeError, OSError):
    """A model directory or hub name cannot be loaded as asked; the message names the path."""


class ConfigError(UnimeError, ValueError):
    """A configuration file or value is invalid; the message names the file and field."""
