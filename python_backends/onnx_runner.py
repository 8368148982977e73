"""The one ONNX runner behind every network model of the embedded target (and the raw benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort


EXECUTION_PROVIDERS = ("auto", "cpu", "cuda", "openvino")
OPENVINO = "openvino"  # not an onnxruntime provider: the openvino package (python_backends.openvino_runner)


def select_providers(preference: str = "auto") -> list[str]:
    """'auto' takes CUDA when onnxruntime-gpu offers it, else CPU; 'cpu' / 'cuda' force one.
    ('openvino' is OnnxRunner's business: it never reaches onnxruntime.)"""
    available = ort.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if preference == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "execution provider 'cuda' was asked for but this onnxruntime has none; "
                "install onnxruntime-gpu or set execution_provider to 'auto'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference != "auto":
        raise ValueError(f"execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, not {preference!r}")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]


class OnnxRunner:
    """One onnxruntime session with a single input and a single output; with providers "openvino",
    the same file on OpenVINO (python_backends.openvino_runner, imported only then) at the
    precision recorded in the file."""

    def __init__(self, onnx_path: Path | str, intra_op_threads: int = 1, providers: str = "auto") -> None:
        self.openvino = None
        if providers == OPENVINO:
            from python_backends.openvino_runner import OpenVinoRunner

            self.openvino = OpenVinoRunner(onnx_path, intra_op_threads)
            self.run = self.openvino.run  # type: ignore[method-assign]
            return
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(intra_op_threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=select_providers(providers))
        (self.input,) = self.session.get_inputs()
        (self.output,) = self.session.get_outputs()

    @property
    def providers(self) -> list[str]:
        return self.openvino.providers if self.openvino is not None else self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output.name], {self.input.name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def run_many(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        return run_merged(self.run, batches)


def run_merged(run: Callable[[np.ndarray], np.ndarray], batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run several requests' batches as one call and split the result back.

    This is where the dynamic batcher pays off: requests Triton merged cost one run.
    """
    sizes = [len(b) for b in batches]
    outputs = run(np.concatenate(batches, axis=0) if len(batches) > 1 else batches[0])
    return np.split(outputs, np.cumsum(sizes)[:-1], axis=0)
