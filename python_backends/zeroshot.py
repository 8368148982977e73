"""Task 2 pipeline: CLIP image embedding against the cached prompt-ensembled text tensor."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from cxrlt.contract import ensemble
from cxrlt.contract.preprocessing import ImageError, PreprocessConfig, check_not_constant, preprocess, validate_served_image
from cxrlt.contract.text_cache import TextCache

from python_backends.classifier import DEFAULT_MAX_PIXELS, Infer
from cxrlt.contract.served import ENCODER_MODEL
from python_backends.pipeline_errors import RequestError, check_finite_output
from python_backends.triton_params import require

SCORINGS = ("sigmoid", "softmax")


@dataclasses.dataclass(frozen=True)
class ZeroShotSettings:
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig.clip)
    alpha: float = ensemble.DEFAULT_ZEROSHOT_ALPHA
    scoring: str = "sigmoid"  # "softmax": positive-vs-negative prompts (needs negative prompts)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"zero-shot scoring must be one of {SCORINGS}, not {self.scoring!r}")

    def to_parameters(self) -> dict[str, str]:
        params = self.preprocess.to_parameters()
        params.update({"zeroshot_alpha": repr(float(self.alpha)), "scoring": self.scoring, "max_pixels": str(self.max_pixels)})
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "ZeroShotSettings":
        return cls(
            preprocess=PreprocessConfig.from_parameters(params),
            alpha=float(require(params, "zeroshot_alpha")),
            scoring=require(params, "scoring"),
            max_pixels=int(require(params, "max_pixels")),
        )


class ZeroShotPipeline:
    def __init__(self, settings: ZeroShotSettings, cache: TextCache, infer: Infer) -> None:
        if settings.scoring == "softmax" and cache.negative is None:
            raise ValueError(
                "scoring 'softmax' needs negative prompts for every class; add them to the prompt file and "
                "rebuild the text cache, or set scoring to 'sigmoid'"
            )
        self.settings, self.cache, self.infer = settings, cache, infer

    async def score(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [C], similarities [C]) for one image."""
        (outcome,) = await self.score_many([image])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def score_many(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """Each image's (probabilities, similarities), or the exception that stopped it; the
        images that pass their checks share one encoder call."""
        return self.scores(await self.embed_many(images))

    async def embed_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """Each image's CLIP embedding (what the out-of-distribution gate scores too), or its exception."""
        return await embed_many(images, self.settings.preprocess, self.settings.max_pixels, self.infer)

    def scores(self, embeddings: Sequence[np.ndarray | Exception]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """(probabilities, similarities) of each embedding; an exception stays the image's outcome."""
        negative = self.cache.negative if self.settings.scoring == "softmax" else None
        outcomes: list = []
        for embedding in embeddings:
            if isinstance(embedding, BaseException):
                outcomes.append(embedding)
                continue
            try:
                probabilities, similarities = ensemble.zeroshot_scores(embedding, self.cache.positive, negative, self.settings.alpha)
                check_finite_output(probabilities, "cxr_zeroshot probabilities")
                outcomes.append((probabilities, similarities))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


async def embed_many(images: Sequence[np.ndarray], config: PreprocessConfig, max_pixels: int,
                     infer: Infer) -> list[np.ndarray | Exception]:
    """The CLIP image embedding of each image, or the exception that stopped it: the served image
    checks, the CLIP preprocessing, then one encoder call for every image that passed."""
    outcomes: list = [None] * len(images)
    inputs: dict[int, np.ndarray] = {}
    for index, image in enumerate(images):
        try:
            validate_served_image(image, max_pixels)
            check_not_constant(image)
            inputs[index] = preprocess(image, config)[0]
        except ImageError as exc:
            outcomes[index] = RequestError(str(exc))
        except Exception as exc:  # this image alone: the others go on
            outcomes[index] = exc
    if not inputs:
        return outcomes
    try:
        embeddings = await infer(ENCODER_MODEL, np.stack(list(inputs.values())))
    except Exception as exc:  # the encoder serves every image: all of them learn why
        for index in inputs:
            outcomes[index] = exc
        return outcomes
    for index, embedding in zip(inputs, embeddings):
        outcomes[index] = embedding
    return outcomes
