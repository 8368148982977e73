"""Building raw tritonclient inputs for the end-to-end tests (one image, optional hint)."""

from __future__ import annotations

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
