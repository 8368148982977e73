"""The reference pipeline: the served computation, in process, without Triton.

It runs the very pipeline code the Triton models run (python_backends.classifier and
.zeroshot) with the settings read from the repository's own config.pbtxt files, but
executes the networks in process: with PyTorch modules rebuilt from the same checkpoints
(engine "torch", what parity tests and evaluation use) or with onnxruntime on the
repository's ONNX files (engine "onnxruntime", python_backends.in_process.LocalPipelines).
For zero-shot the torch engine re-encodes the repository's prompt file with open_clip
instead of reading the cached tensor, so the cache itself is checked too.
"""

from __future__ import annotations

import asyncio
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxrlt.contract.manifest import manifest_profile, read_manifest
from cxrlt.contract.profiles import Profile
from cxrlt.contract.prompts import load_prompts
from cxrlt.contract.releases import release_dir
from cxrlt.contract.text_cache import PROMPTS_FILE, TextCache
from networks.clip import ImageTower, encode_prompt_ensembles, tokenizer_for
from networks.weights import load_clip, load_network
from python_backends.classifier import Classification
from python_backends.in_process import LocalPipelines
from python_backends.zeroshot import ENCODER_MODEL

ENGINES = ("torch", "onnxruntime")


def _checkpoint_dir(entry: dict) -> Path | None:
    return Path(entry["checkpoint"]).parent if entry.get("checkpoint") else None


class ReferencePipeline(LocalPipelines):
    """`LocalPipelines` whose networks run in PyTorch (engine "torch") or onnxruntime, one call
    after another; `release`: whose weights and settings (default: the live one)."""

    def __init__(self, repository: Path | str, engine: str = "torch", threads: int = 0, providers: str = "cpu",
                 release: int | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.engine = engine
        self._modules: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        super().__init__(repository, threads, providers, release=release)

    @cached_property
    def manifest(self) -> dict:
        return read_manifest(self.repository, self.release)

    @cached_property
    def profile(self) -> Profile:
        return manifest_profile(self.manifest)

    def _module(self, model_name: str) -> Callable[[np.ndarray], np.ndarray]:
        if model_name not in self._modules:
            entry, seed = self.manifest["models"][model_name], self.manifest["seed"]
            if model_name == ENCODER_MODEL:
                module = ImageTower(load_clip(self.profile, _checkpoint_dir(entry), seed, allow_random=True)[0]).eval()
            else:
                module = load_network(self.profile, model_name, _checkpoint_dir(entry), seed, allow_random=True)[0]
            self._modules[model_name] = _torch_runner(module)
        return self._modules[model_name]

    async def infer(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        """Run one network in process: the `infer` the pipelines call (tune-weights taps it)."""
        if self.engine == "onnxruntime":
            return await super().infer(model_name, pixel_values)
        return self._module(model_name)(pixel_values)

    def text_cache(self) -> TextCache:
        if self.engine == "onnxruntime":
            return super().text_cache()
        clip_model, _ = load_clip(self.profile, _checkpoint_dir(self.manifest["models"][ENCODER_MODEL]), self.manifest["seed"],
                                  allow_random=True)
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
