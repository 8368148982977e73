"""Networks run inside the calling process with onnxruntime, on a repository's own ONNX files.

Two users: `LocalPipelines`, the served pipelines run in process (the reference pipeline, the
raw side of `cxrlt bench`, `cxrlt stress`'s parity), and a BLS model configured with
`member_execution: in_process`.

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

from cxrlt.contract.labels import TASK2_LABELS
from cxrlt.contract.releases import release_number, release_text_cache, served_parameters, version_dir
from cxrlt.contract.served import CLASSIFIER_MODEL, ZEROSHOT_MODEL
from cxrlt.contract.text_cache import TextCache
from python_backends.classifier import ClassifierPipeline, ClassifierSettings
from python_backends.onnx_runner import OnnxRunner
from python_backends.zeroshot import ZeroShotPipeline, ZeroShotSettings

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

    def loaded(self) -> list[str]:
        """The network models whose sessions exist."""
        return list(self._runners)

    async def infer(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        run = self.runner(model_name).run
        if self._pool is None:
            return run(pixel_values)
        return await asyncio.get_running_loop().run_in_executor(self._pool, run, pixel_values)


class LocalPipelines:
    """A repository release's two pipelines (the code the Triton models run, with the settings of
    their served configs and the release's text cache) in this process, their networks on
    onnxruntime (`LocalNetworks`); a subclass may run the networks another way (`infer`)."""

    def __init__(self, repository: Path | str, intra_op_threads: int = 1, providers: str = "auto",
                 concurrent_calls: int = 0, release: int | None = None) -> None:
        self.repository = Path(repository)
        self.release = release_number(self.repository, release)  # default: the live release
        self.networks = LocalNetworks(self.repository, intra_op_threads, providers, concurrent_calls, self.release)
        parameters = {name: served_parameters(self.repository, name, self.release) for name in (CLASSIFIER_MODEL, ZEROSHOT_MODEL)}
        self.classifier_settings = ClassifierSettings.from_parameters(parameters[CLASSIFIER_MODEL])
        self.zeroshot_settings = ZeroShotSettings.from_parameters(parameters[ZEROSHOT_MODEL])
        self.classifier = ClassifierPipeline(self.classifier_settings, self.infer)
        self.zeroshot = ZeroShotPipeline(self.zeroshot_settings, self.text_cache(), self.infer)

    async def infer(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        """One network's outputs: the `infer` the pipelines call."""
        return await self.networks.infer(model_name, pixel_values)

    def text_cache(self) -> TextCache:
        return release_text_cache(self.repository, self.release, TASK2_LABELS)

    async def probabilities(self, model: str, image: np.ndarray, hint: str | None = None) -> np.ndarray:
        """One image's PROBABILITIES as pipeline model `model` answers them (cxr_findings: both
        pipelines side by side, Task 1's 30 then the zero-shot 6)."""
        if model == ZEROSHOT_MODEL:
            return (await self.zeroshot.score(image))[0]
        if model == CLASSIFIER_MODEL:
            return (await self.classifier.classify(image, hint)).probabilities
        task1, (task2, _) = await asyncio.gather(self.classifier.classify(image, hint), self.zeroshot.score(image))
        return np.concatenate([task1.probabilities, task2])
