"""Helpers of the end-to-end tests: raw tritonclient inputs (one image, optional hint) and
reading Triton's statistics once they are up to date."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient


def image_inputs(image: np.ndarray, hint: str | None = None, dtype: str = "UINT16") -> list[grpcclient.InferInput]:
    batch = image[None]
    tensor = grpcclient.InferInput("IMAGE", list(batch.shape), dtype)
    tensor.set_data_from_numpy(batch)
    inputs = [tensor]
    if hint is not None:
        hint_tensor = grpcclient.InferInput("PROJECTION_HINT", [1, 1], "BYTES")
        hint_tensor.set_data_from_numpy(np.array([[hint.encode()]], dtype=object))
        inputs.append(hint_tensor)
    return inputs


def inference_counts(client: grpcclient.InferenceServerClient, model: str | None = None) -> dict[str, dict[str, int]]:
    """model -> its cumulative counts from Triton's statistics API: "images" (batch items
    inferred), "executions" (a dynamic batch is one), "success" and "fail" (requests); every
    model's without `model`."""
    entries = client.get_inference_statistics(model or "", as_json=True)["model_stats"]
    return {
        entry["name"]: {
            "images": int(entry.get("inference_count", 0)),
            "executions": int(entry.get("execution_count", 0)),
            "success": int(entry["inference_stats"]["success"].get("count", 0)),
            "fail": int(entry["inference_stats"]["fail"].get("count", 0)),
        }
        for entry in entries
    }


T = TypeVar("T")


def settled(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 5.0) -> T:
    """read() once done(value) holds, or its last value after `timeout` seconds.

    Triton records a request's statistics when it releases the request, a moment after the
    client may already hold the response; a count read right after the last call can lag."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.02)
        value = read()
    return value
