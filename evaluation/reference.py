"""The reference pipeline: the served computation, in process, without Triton.

It runs the very pipeline code the Triton models run (python_backends.classifier and
.zeroshot) with the settings read from the repository's own config.pbtxt files, but
executes the networks in process: with PyTorch modules rebuilt from the same checkpoints
(engine "torch", what parity tests and evaluation use) or with onnxruntime on the
repository's ONNX files (engine "onnxruntime", the raw side of `cxrlt bench`).
For zero-shot the torch engine re-encodes the repository's prompt file with open_clip
instead of reading the cached tensor, so the cache itself is checked too.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxrlt.contract.labels import TASK2_LABELS
from cxrlt.contract.text_cache import PROMPTS_FILE, TextCache
from cxrlt.contract.manifest import manifest_profile, read_manifest
from cxrlt.contract.releases import release_dir, release_text_cache, served_parameters
from cxrlt.contract.prompts import load_prompts
from cxrlt.contract.served import CLASSIFIER_MODEL, ZEROSHOT_MODEL
from python_backends.classifier import Classification, ClassifierPipeline, ClassifierSettings
from python_backends.in_process import LocalNetworks
from python_backends.zeroshot import ENCODER_MODEL, ZeroShotPipeline, ZeroShotSettings

from networks.clip import ImageTower, encode_prompt_ensembles, tokenizer_for
from networks.weights import load_clip, load_network
from cxrlt.contract.releases import release_number

ENGINES = ("torch", "onnxruntime")


def _checkpoint_dir(entry: dict) -> Path | None:
    return Path(entry["checkpoint"]).parent if entry.get("checkpoint") else None


class ReferencePipeline:
    def __init__(self, repository: Path | str, engine: str = "torch", threads: int = 0,
                 executor: Executor | None = None, providers: str = "cpu", release: int | None = None) -> None:
        """`executor`: run each network call on its threads, so a pipeline's concurrent calls
        (an image's three ensemble members) overlap as a BLS model's do; without one they run
        one after another. `providers`: the onnxruntime engine's execution providers
        (python_backends.onnx_runner.select_providers). `release`: whose weights (default: the live one)."""
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.repository = Path(repository)
        self.release = release_number(self.repository, release)
        self.manifest = read_manifest(self.repository, self.release)
        self.profile = manifest_profile(self.manifest)
        self.engine = engine
        self.threads = threads
        self.executor = executor
        self._runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self._onnx = (LocalNetworks(self.repository, threads, providers=providers, release=self.release)
                      if engine == "onnxruntime" else None)
        self.classifier_settings = ClassifierSettings.from_parameters(served_parameters(self.repository, CLASSIFIER_MODEL, self.release))
        self.zeroshot_settings = ZeroShotSettings.from_parameters(served_parameters(self.repository, ZEROSHOT_MODEL, self.release))
        self.classifier = ClassifierPipeline(self.classifier_settings, self.infer)
        self.zeroshot = ZeroShotPipeline(self.zeroshot_settings, self._text_cache(), self.infer)

    def _runner(self, model_name: str) -> Callable[[np.ndarray], np.ndarray]:
        if model_name not in self._runners:
            entry = self.manifest["models"][model_name]
            seed = self.manifest["seed"]
            if self._onnx is not None:
                self._runners[model_name] = self._onnx.runner(model_name).run
            else:
                if model_name == ENCODER_MODEL:
                    module = ImageTower(load_clip(self.profile, _checkpoint_dir(entry), seed, allow_random=True)[0]).eval()
                else:
                    module = load_network(self.profile, model_name, _checkpoint_dir(entry), seed, allow_random=True)[0]
                self._runners[model_name] = _torch_runner(module)
        return self._runners[model_name]

    async def infer(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        """Run one network in process: the `infer` the pipelines call (tune-weights taps it)."""
        run = self._runner(model_name)
        if self.executor is None:
            return run(pixel_values)
        return await asyncio.get_running_loop().run_in_executor(self.executor, run, pixel_values)

    def _text_cache(self) -> TextCache:
        if self.engine == "onnxruntime":
            return release_text_cache(self.repository, self.release, TASK2_LABELS)
        clip_entry = self.manifest["models"][ENCODER_MODEL]
        clip_model, _ = load_clip(self.profile, _checkpoint_dir(clip_entry), self.manifest["seed"], allow_random=True)
        prompts = load_prompts(release_dir(self.repository, self.release) / PROMPTS_FILE)
        tokenizer = tokenizer_for(self.profile.clip.model_name)
        positive = encode_prompt_ensembles(clip_model, tokenizer, prompts.prompts).numpy()
        negative = encode_prompt_ensembles(clip_model, tokenizer, prompts.negatives).numpy() if prompts.negatives else None
        return TextCache(prompts.class_names, positive, negative, {"source": "open_clip, encoded in process"})

    def classify(self, image: np.ndarray, hint: str | None = None) -> Classification:
        return asyncio.run(self.classifier.classify(image, hint))

    def score_zeroshot(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return asyncio.run(self.zeroshot.score(image))

    def findings(self, image: np.ndarray, hint: str | None = None) -> tuple[np.ndarray, Classification]:
        """All 36 probabilities (30 then 6), and the Task 1 classification."""
        task1 = self.classify(image, hint)
        task2, _ = self.score_zeroshot(image)
        return np.concatenate([task1.probabilities, task2]), task1


def _torch_runner(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    @torch.no_grad()
    def run(pixel_values: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))).numpy()

    return run
