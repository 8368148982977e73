"""TorchScript runner: the network models' engine where only PyTorch has CUDA (optionally fp16)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from python_backends.onnx_runner import run_merged


def select_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; set device to 'auto' or 'cpu'")
    return torch.device(preference)


class TorchScriptRunner:
    """A traced TorchScript network; fp16 autocast on CUDA when asked, outputs always float32."""

    def __init__(self, path: Path | str, device: str = "auto", fp16: bool = False, threads: int = 1) -> None:
        self.device = select_device(device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.fp16 = fp16 and self.device.type == "cuda"
        self.module = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            output = self.module(tensor)
        return output.float().cpu().numpy()

    def run_many(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        return run_merged(self.run, batches)
