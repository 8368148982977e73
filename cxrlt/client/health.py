"""A health check that tells the truth: ready only when a real inference works everywhere.

Triton 2.51's `/v2/health/ready` (and each model's ready endpoint) keeps answering 200
after a Python-backend stub has died and every request to that model fails. So besides
asking Triton, this check runs one tiny inference through every network model (zeros at
the model's input size) and one through `cxr_findings` for each projection (a small
synthetic image, hints PA and LL), which passes through every pipeline model. It uses only
inference, health and metadata calls, which stay open when the admin APIs are restricted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from cxrlt.contract.served import ENCODER_MODEL, FINDINGS_MODEL, served_model_names, network_names

PROBE_HINTS = ("PA", "LL")


@dataclasses.dataclass
class HealthReport:
    url: str
    ready: bool
    problems: list[str]
    checked: list[str]
    seconds: float

    def lines(self) -> list[str]:
        head = f"{self.url}: {'READY' if self.ready else 'NOT READY'} ({len(self.checked)} checks, {self.seconds:.2f} s)"
        return [head, *(f"  - {problem}" for problem in self.problems)]


def probe_image(size: int = 64) -> np.ndarray:
    """A small radiograph-like UINT16 image [1, size, size]: bright body, two dark lungs."""
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = ((x - 0.3) ** 2 + (y - 0.5) ** 2 < 0.04) | ((x - 0.7) ** 2 + (y - 0.5) ** 2 < 0.04)
    image = np.where(lungs, 12000, 40000) + (x * 2000).astype(np.int64)
    return image.astype(np.uint16)[None]


def check_health(url: str, timeout_s: float = 10.0, headers: dict[str, str] | None = None,
                 tls: dict[str, Any] | None = None) -> HealthReport:
    """Check the server at `url`; never raises for a server problem, reports it instead.

    tls: `ssl`, `root_certificates`, `private_key`, `certificate_chain` as tritonclient takes them.
    """
    import tritonclient.grpc as grpcclient

    started = time.monotonic()
    problems: list[str] = []
    checked: list[str] = []
    client = grpcclient.InferenceServerClient(url, **(tls or {}))
    try:
        _check(client, timeout_s, headers, problems, checked)
    finally:
        client.close()
    return HealthReport(url, not problems, problems, checked, time.monotonic() - started)


def _check(client: Any, timeout_s: float, headers: dict[str, str] | None, problems: list[str], checked: list[str]) -> None:
    try:
        checked.append("server ready")
        if not client.is_server_ready(headers=headers, client_timeout=timeout_s):
            problems.append("the server says it is not ready")
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out: all mean not ready
        problems.append(f"no answer from the server: {_message(exc)}")
        return
    for model in served_model_names():
        checked.append(f"{model} ready")
        try:
            if not client.is_model_ready(model, headers=headers, client_timeout=timeout_s):
                problems.append(f"model {model} is not ready")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"model {model}: {_message(exc)}")
    if problems:
        return
    for model in [*network_names(), ENCODER_MODEL]:
        checked.append(f"{model} inference")
        try:
            _infer_zeros(client, model, timeout_s, headers)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"inference on {model} failed: {_message(exc)}")
    for hint in PROBE_HINTS:
        checked.append(f"{FINDINGS_MODEL} inference (hint {hint})")
        try:
            _infer_findings(client, hint, timeout_s, headers)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"inference on {FINDINGS_MODEL} (hint {hint}) failed: {_message(exc)}")


def _infer_zeros(client: Any, model: str, timeout_s: float, headers: dict[str, str] | None) -> None:
    import tritonclient.grpc as grpcclient

    config = client.get_model_config(model, as_json=True, headers=headers, client_timeout=timeout_s)["config"]
    (tensor,) = config["input"]
    dims = [int(d) for d in tensor["dims"]]
    pixels = np.zeros([1, *dims], dtype=np.float32)
    request = grpcclient.InferInput(tensor["name"], list(pixels.shape), "FP32")
    request.set_data_from_numpy(pixels)
    result = client.infer(model, [request], headers=headers, client_timeout=timeout_s)
    output = result.as_numpy(config["output"][0]["name"])
    if output is None or not np.all(np.isfinite(output)):
        raise RuntimeError("the output is missing or not finite")


def _infer_findings(client: Any, hint: str, timeout_s: float, headers: dict[str, str] | None) -> None:
    import tritonclient.grpc as grpcclient

    image = probe_image()
    pixels = grpcclient.InferInput("IMAGE", list(image.shape), "UINT16")
    pixels.set_data_from_numpy(image)
    hint_input = grpcclient.InferInput("PROJECTION_HINT", [1, 1], "BYTES")
    hint_input.set_data_from_numpy(np.array([[hint.encode()]], dtype=np.object_))
    result = client.infer(FINDINGS_MODEL, [pixels, hint_input], headers=headers, client_timeout=timeout_s)
    probabilities = result.as_numpy("PROBABILITIES")
    if probabilities is None or probabilities.shape != (1, 36) or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise RuntimeError(f"unexpected PROBABILITIES {None if probabilities is None else probabilities.shape}")


def _message(exc: Exception) -> str:
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return " ".join(str(text).split())[:300]
