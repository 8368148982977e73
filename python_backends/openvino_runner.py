"""A network's ONNX file on OpenVINO's CPU plugin (the `openvino` package), behind OnnxRunner's interface.

Why the `openvino` package and not onnxruntime's OpenVINO execution provider: that provider
ships as `onnxruntime-openvino`, a wheel that installs the same `onnxruntime` module as the
CPU wheel (one of the two wins, in one environment), trails onnxruntime's releases and bundles
its own OpenVINO; and it hides the plugin's inference precision behind provider options. The
`openvino` package reads the same ONNX file, lets us say the precision, and runs the int8
(QDQ) files post-training quantization writes. Imported only when a model asks for it.

Precision: OpenVINO's CPU plugin computes in bf16 by default wherever the CPU has bf16
instructions (AVX512_BF16 or AMX), so "fp32" must be asked for explicitly: INFERENCE_PRECISION_HINT
f32 here. "bf16" asks for bf16; "int8" runs a quantized file's int8 kernels, its other ops in f32.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

# The precision a build chose travels inside the ONNX file (metadata_props), so every runner of
# the file (network model, in-process members, bench, evaluation) applies the same one.
PRECISION_KEY = "cxrlt.precision"
PRECISIONS = ("fp32", "bf16", "int8")
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 lives in the file's QDQ nodes


def file_precision(model: Any) -> str:
    """The precision recorded in an OpenVINO model read from ONNX (fp32 when none is)."""
    path = ["framework", PRECISION_KEY]
    if not model.has_rt_info(path):  # no metadata: an FP32 file
        return "fp32"
    value = model.get_rt_info(path).astype(str)
    if value not in PRECISIONS:
        raise ValueError(f"the ONNX file's {PRECISION_KEY} metadata is {value!r}, not one of {', '.join(PRECISIONS)}")
    return value


class OpenVinoRunner:
    """One compiled OpenVINO model with a single input and a single output (dynamic batch)."""

    def __init__(self, onnx_path: Path | str, intra_op_threads: int = 1, precision: str | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeError("execution provider 'openvino' needs the openvino package: "
                               "pip install 'cxrlt-triton[serve]' (or pip install openvino)") from exc
        core = ov.Core()
        model = core.read_model(str(onnx_path))
        self.precision = precision or file_precision(model)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        config = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision], "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": "1"}
        if int(intra_op_threads) > 0:
            config["INFERENCE_NUM_THREADS"] = str(int(intra_op_threads))
        self.compiled = core.compile_model(model, "CPU", config)
        self.output = self.compiled.outputs[0]
        self._local = threading.local()  # one infer request per calling thread

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.precision})"]

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer([np.ascontiguousarray(batch, dtype=np.float32)])
        return np.array(result[self.output], dtype=np.float32, copy=True)
