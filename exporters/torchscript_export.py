"""TorchScript export (for the `torchscript` engine: PyTorch on CUDA, optionally fp16) with a parity check."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from exporters.onnx_export import PARITY_TOLERANCE, ParityError


def export_torchscript(model: nn.Module, path: Path | str, image_size: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        traced = torch.jit.trace(model.eval(), torch.zeros(2, 3, image_size, image_size), check_trace=False)
    traced.save(str(path))
    return path


@torch.no_grad()
def check_torchscript_parity(model: nn.Module, path: Path | str, inputs: Sequence[np.ndarray], tolerance: float = PARITY_TOLERANCE) -> float:
    traced = torch.jit.load(str(path)).eval()
    worst = 0.0
    for batch in inputs:
        tensor = torch.from_numpy(batch)
        worst = max(worst, float((traced(tensor) - model.eval()(tensor)).abs().max()))
    if not worst <= tolerance:
        raise ParityError(f"{path}: TorchScript differs from PyTorch by {worst:.3g} > {tolerance:g}")
    return worst
