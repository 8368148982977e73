"""The served out-of-distribution gate (the third layer after the DICOM tags and the pixel checks).

A pipeline model scores each image's CLIP embedding against the repository's fitted gate
(cxrlt.contract.ood_gate, file GATE_FILE) and answers `OOD_SCORE`. Above the threshold it refuses
the image (`ood_action: refuse`, the default: INVALID_ARGUMENT "not a chest radiograph ...") or
only reports the score (`flag`). cxr_zeroshot and cxr_findings score the embedding their zero-shot
task computes anyway; cxr_classifier makes one encoder call per batch for it, and none without a
gate. A repository without a gate logs so once at load and answers OOD_SCORE NaN.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxrlt.contract.ood_gate import (ACTION_PARAMETER, ACTIONS, DEFAULT_ACTION, GATE_FILE, NO_SCORE, THRESHOLD_PARAMETER,
                                     OodGate, load_gate, refusal_message)
from cxrlt.contract.preprocessing import PreprocessConfig
from cxrlt.contract.releases import release_dir, version_dir
from cxrlt.contract.served import ENCODER_MODEL
from cxrlt.contract.text_cache import ENCODER_RECORD
from python_backends.classifier import DEFAULT_MAX_PIXELS, Infer
from python_backends.pipeline_errors import RequestError
from python_backends.zeroshot import ZeroShotPipeline, embed_many

log = logging.getLogger(__name__)

NO_GATE_MESSAGE = ("no out-of-distribution gate is fitted in this repository ({path} is absent): only the DICOM tag and "
                   "pixel checks run and OOD_SCORE is NaN; fit one with `cxrlt build-repo ... --reference-images DIR`")
Score = float | BaseException


@dataclasses.dataclass
class ServedGate:
    """What a pipeline model does with the gate: `embed_many` the images (or reuse the zero-shot
    task's embeddings), then `judge` them into scores or refusals."""

    gate: OodGate | None = None
    action: str = DEFAULT_ACTION
    threshold: float = math.nan
    preprocess: PreprocessConfig | None = None  # the CLIP preprocessing the gate was fitted with
    infer: Infer | None = None  # the encoder call, for a model without the zero-shot task
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"parameter {ACTION_PARAMETER} must be one of {', '.join(ACTIONS)}, not {self.action!r}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any], params: Mapping[str, str], make_infer: Any,
                  zeroshot: ZeroShotPipeline | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  release: int = 1) -> "ServedGate":
        """The gate of release `release` in the repository a Triton `initialize(args)` names. `make_infer()`
        gives the encoder call (only asked for when the gate is fitted and there is no zero-shot task to share)."""
        action = params.get(ACTION_PARAMETER, DEFAULT_ACTION).strip().lower() or DEFAULT_ACTION
        repository = Path(args.get("model_repository") or "<no repository>").parent
        files = release_dir(repository, release)
        gate = load_gate(files) if "model_repository" in args else None
        if gate is None:
            log.warning(NO_GATE_MESSAGE.format(path=files / GATE_FILE))
            return cls(None, action)
        _check_encoder(gate, version_dir(repository, ENCODER_MODEL, release) / ENCODER_RECORD)
        threshold = _threshold(params.get(THRESHOLD_PARAMETER, ""), gate)
        preprocess = PreprocessConfig.from_parameters(gate.meta["preprocess"])
        if zeroshot is not None and zeroshot.settings.preprocess != preprocess:
            raise ValueError(f"the gate in {files / GATE_FILE} was fitted on embeddings of another preprocessing "
                             f"than the zero-shot task's; refit it with `cxrlt build-repo ... --reference-images DIR`")
        return cls(gate, action, threshold, preprocess, None if zeroshot is not None else make_infer(), max_pixels)

    @property
    def fitted(self) -> bool:
        return self.gate is not None

    async def embed_many(self, images: Sequence[np.ndarray], zeroshot: ZeroShotPipeline | None) -> list:
        """The images' CLIP embeddings: the zero-shot task's when it runs, else the gate's own encoder
        call; Nones without a gate and without a zero-shot task (nothing to compute)."""
        if zeroshot is not None:
            return await zeroshot.embed_many(images)
        if self.gate is None or self.infer is None or self.preprocess is None:
            return [None] * len(images)
        return await embed_many(images, self.preprocess, self.max_pixels, self.infer)

    def judge(self, embeddings: Sequence[Any]) -> list[Score]:
        """Each image's OOD score (NaN without a gate), its embedding's exception, or a RequestError
        refusing it (action refuse, score above the threshold)."""
        outcomes: list[Score] = []
        for embedding in embeddings:
            if isinstance(embedding, BaseException):
                outcomes.append(embedding)
            elif self.gate is None or embedding is None:
                outcomes.append(NO_SCORE)
            else:
                score = float(self.gate.score(embedding)[0])
                refused = self.action == "refuse" and not score <= self.threshold  # NaN is refused too
                outcomes.append(RequestError(refusal_message(score, self.threshold)) if refused else score)
        return outcomes


def _threshold(value: str, gate: OodGate) -> float:
    """The config's `ood_threshold` (a number: an operator's override), or the gate's fitted one."""
    if not value.strip():
        return gate.threshold
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"parameter {THRESHOLD_PARAMETER} must be a number (or empty: the fitted one), not {value!r}") from None
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"parameter {THRESHOLD_PARAMETER} must be a positive number, not {value!r}")
    return threshold


def _check_encoder(gate: OodGate, encoder_record: Path) -> None:
    """Refuse to load a gate fitted on another encoder's embeddings (its distances mean nothing)."""
    served = json.loads(encoder_record.read_text()).get("weights_sha256") if encoder_record.is_file() else None
    fitted = gate.meta.get("encoder_weights_sha256")
    if served != fitted:
        raise ValueError(f"the out-of-distribution gate was fitted on CLIP weights {str(fitted)[:12]} but the image encoder "
                         f"serves {str(served)[:12]}; refit it with `cxrlt build-repo ... --reference-images DIR`")
