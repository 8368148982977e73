"""Networks run inside the calling process with onnxruntime, on a repository's own ONNX files.

Two users: the raw side of `cxrlt bench` (and the reference pipeline's onnxruntime engine),
and a BLS model configured with `member_execution: in_process`.

Why a BLS model would do this: each BLS call to a network model is a request into Triton,
a trip through the callee's dynamic batcher and Python stub, and a response back, about
1.5 ms of CPU on a small machine. The tiny profile's networks compute in 1-3 ms, so four
such hops per image cost more than the networks. Running the members in the BLS process
removes the hops, and gives up what they buy: per-member dynamic batching across requests,
per-member statistics, and loading or replacing a member without the BLS model.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from cxrlt.contract.releases import version_dir
from python_backends.onnx_runner import OnnxRunner

MEMBER_EXECUTION = ("bls", "in_process")


def member_execution(value: str) -> str:
    """The `member_execution` config parameter, checked."""
    if value not in MEMBER_EXECUTION:
        raise ValueError(f"parameter member_execution must be one of {', '.join(MEMBER_EXECUTION)}, not {value!r}")
    return value


class LocalNetworks:
    """One onnxruntime session per network model of a repository, made on first use.

    `infer` is the async `infer(model_name, pixel_values)` the pipelines take. With
    `concurrent_calls`, it runs the sessions on a pool of that many threads (onnxruntime
    releases the GIL), so an image's three ensemble members compute at once, as they do in
    three network models; without, in the calling thread, one call after another.
    """

    def __init__(self, repository: Path | str, intra_op_threads: int = 1, providers: str = "auto",
                 concurrent_calls: int = 0, release: int = 1) -> None:
        self.repository = Path(repository)
        self.release = release  # whose version directories the ONNX files come from
        self.intra_op_threads = intra_op_threads
        self.providers = providers
        self._runners: dict[str, OnnxRunner] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrent_calls, thread_name_prefix="member") if concurrent_calls else None

    def onnx_path(self, model_name: str) -> Path:
        return version_dir(self.repository, model_name, self.release) / "model.onnx"

    def runner(self, model_name: str) -> OnnxRunner:
        with self._lock:
            runner = self._runners.get(model_name)
            if runner is None:
                path = self.onnx_path(model_name)
                if not path.is_file():
                    raise FileNotFoundError(
                        f"network model {model_name!r} has no ONNX file at {path}; rebuild the repository with `cxrlt build-repo`"
                    )
                runner = self._runners[model_name] = OnnxRunner(path, self.intra_op_threads, self.providers)
        return runner

    def load(self, model_names: Iterable[str]) -> "LocalNetworks":
        """Create the sessions now (a BLS model does this at load, so a missing file fails the load)."""
        for name in model_names:
            self.runner(name)
        return self

    def __len__(self) -> int:
        return len(self._runners)

    async def infer(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        run = self.runner(model_name).run
        if self._pool is None:
            return run(pixel_values)
        return await asyncio.get_running_loop().run_in_executor(self._pool, run, pixel_values)
