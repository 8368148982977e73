"""Errors the pipelines raise; the model.py adapters turn them into Triton error codes."""

from __future__ import annotations


class RequestError(ValueError):
    """The request itself is bad (Triton INVALID_ARG); the message names the problem."""


class MemberError(RuntimeError):
    """A model called through BLS failed or is unavailable (Triton INTERNAL/UNAVAILABLE)."""

    def __init__(self, model_name: str, reason: str, unavailable: bool = False) -> None:
        state = "is unavailable" if unavailable else "failed"
        super().__init__(f"model {model_name!r} {state}: {reason}")
        self.model_name = model_name
        self.unavailable = unavailable
