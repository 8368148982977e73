"""ONNX export with a parity check against PyTorch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from python_backends.onnx_runner import OnnxRunner

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


def export_onnx(model: nn.Module, path: Path | str, image_size: int, output_name: str) -> Path:
    """Export [B, 3, S, S] -> [B, K] with a dynamic batch axis (TorchScript exporter, opset 17)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic; trace the plain path.
    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["pixel_values"],
            output_names=[output_name],
            dynamic_axes={"pixel_values": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    torch.backends.mha.set_fastpath_enabled(fastpath)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    path.write_bytes(buffer.getvalue())
    return path


@torch.no_grad()
def max_abs_difference(model: nn.Module, onnx_path: Path | str, inputs: Sequence[np.ndarray]) -> float:
    """Largest |onnxruntime - PyTorch| over all inputs (each a [B, 3, S, S] batch)."""
    runner = OnnxRunner(onnx_path, intra_op_threads=1, providers="cpu")  # one thread: reproducible figures
    worst = 0.0
    for batch in inputs:
        expected = model.eval()(torch.from_numpy(batch)).numpy()
        worst = max(worst, float(np.abs(runner.run(batch) - expected).max()))
    return worst


def check_parity(model: nn.Module, onnx_path: Path | str, inputs: Sequence[np.ndarray], tolerance: float = PARITY_TOLERANCE) -> float:
    difference = max_abs_difference(model, onnx_path, inputs)
    if not difference <= tolerance:
        raise ParityError(
            f"{onnx_path}: onnxruntime differs from PyTorch by {difference:.3g} > {tolerance:g}; "
            "the export is not faithful (check for unsupported ops or training-mode layers)"
        )
    return difference
