"""Errors the pipelines raise; the model.py adapters turn them into Triton error codes."""

from __future__ import annotations

import numpy as np


# Triton hands a BLS caller its callee's errors with the code INTERNAL, whatever the callee
# said; this marker keeps "your input is bad" recognisable through a chain of BLS calls.
INVALID_INPUT = "invalid input: "


class RequestError(ValueError):
    """The request itself is bad (Triton INVALID_ARG); the message names the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(INVALID_INPUT) else INVALID_INPUT + message)


class MemberError(RuntimeError):
    """A model called through BLS failed or is unavailable (Triton INTERNAL/UNAVAILABLE)."""

    def __init__(self, model_name: str, reason: str, unavailable: bool = False) -> None:
        state = "is unavailable" if unavailable else "failed"
        super().__init__(f"model {model_name!r} {state}: {reason}")
        self.model_name = model_name
        self.unavailable = unavailable


class ServingError(RuntimeError):
    """A fault on the server's side (Triton INTERNAL); the message is the whole story."""


class NonFiniteOutput(ServingError):
    """A network produced NaN or Inf (Triton INTERNAL): never handed back as probabilities."""


def non_finite_count(array) -> int:
    """How many values of a float array are NaN or +-Inf (0 for other dtypes)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite_output(array, what: str) -> None:
    bad = non_finite_count(array)
    if bad:
        raise NonFiniteOutput(
            f"{what}: {bad} non-finite value(s) (NaN or Inf) came out of the networks and were not returned; "
            "the model's weights or its ONNX file are broken: rebuild the repository with `cxrlt build-repo`"
        )
