"""Task 1 pipeline: projection routing, TTA, logit-level weighted ensembling, normal gating.

The pipeline is written once against an async `infer(model_name, pixel_values)` call.
Inside Triton that call is a BLS request (see triton_models/cxr_classifier/model.py);
the reference pipeline plugs in PyTorch modules and the raw benchmark onnxruntime
sessions, so all three compute exactly the same thing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable, Mapping, Sequence, Union

import numpy as np

from cxrlt.contract import ensemble
from cxrlt.contract.labels import PROJECTIONS, projection_from_hint
from cxrlt.contract.preprocessing import (MAX_PIXELS, ImageError, PreprocessConfig, check_not_constant, normalize, parse_tta_views,
                                          prepare_square, tta_view, validate_served_image)
from cxrlt.contract.served import ROUTER_MODEL, ensemble_model_name, network_names  # noqa: F401 (network_names: re-exported)

from python_backends.pipeline_errors import RequestError, check_finite_output
from python_backends.triton_params import as_bool, require

Infer = Callable[[str, np.ndarray], Awaitable[np.ndarray]]

DEFAULT_MAX_PIXELS = MAX_PIXELS  # ~7000 x 7000, beyond any chest radiograph detector


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    preprocess: PreprocessConfig
    tta_views: tuple[str, ...] = ("identity", "hflip")
    weights: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=lambda: ensemble.DEFAULT_WEIGHTS)
    gating_alpha: float = ensemble.DEFAULT_GATING_ALPHA
    trust_hint: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def to_parameters(self) -> dict[str, str]:
        params = self.preprocess.to_parameters()
        params.update(
            {
                "tta_views": ",".join(self.tta_views),
                "normal_gating_alpha": repr(float(self.gating_alpha)),
                "trust_hint": "true" if self.trust_hint else "false",
                "max_pixels": str(int(self.max_pixels)),
            }
        )
        for projection in PROJECTIONS:
            params[f"weights_{projection}"] = ensemble.format_weights(self.weights[projection])
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "ClassifierSettings":
        return cls(
            preprocess=PreprocessConfig.from_parameters(params),
            tta_views=parse_tta_views(require(params, "tta_views")),
            weights={p: ensemble.parse_weights(require(params, f"weights_{p}")) for p in PROJECTIONS},
            gating_alpha=float(require(params, "normal_gating_alpha")),
            trust_hint=as_bool(require(params, "trust_hint")),
            max_pixels=int(require(params, "max_pixels")),
        )


@dataclasses.dataclass(frozen=True)
class Classification:
    logits: np.ndarray  # [30] ensembled logits
    probabilities: np.ndarray  # [30] after sigmoid and normal gating
    projection: str
    projection_score: float  # the router's probability of the projection that was used
    hint_used: bool


Outcome = Union[Classification, Exception]


class ClassifierPipeline:
    """Task 1 for any number of images at once.

    `classify_many` is what the BLS model runs for every image the dynamic batcher handed it:
    one router call for all of them, then per projection one call per member with every
    image's TTA views stacked, so four network calls serve a whole batch instead of four per
    image. Each image keeps its own outcome: a bad image, or a network failing for one
    projection, fails only the images it concerns.
    """

    def __init__(self, settings: ClassifierSettings, infer: Infer) -> None:
        self.settings = settings
        self.infer = infer

    def _validate(self, image: np.ndarray, hint: str | bytes | None) -> tuple[np.ndarray, str | None]:
        # Shape first, then the hint, then the content: the order cxr_findings relies on to
        # report the same problem whichever of its two callees answers first.
        try:
            validate_served_image(image, self.settings.max_pixels)
            hinted = projection_from_hint(hint)
            check_not_constant(image)
        except (ImageError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        return prepare_square(image, self.settings.preprocess), hinted

    async def classify(self, image: np.ndarray, hint: str | bytes | None = None) -> Classification:
        (outcome,) = await self.classify_many([(image, hint)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def classify_many(self, items: Sequence[tuple[np.ndarray, str | bytes | None]]) -> list[Outcome]:
        """A Classification, or the exception that stopped it, for each (image, hint)."""
        outcomes: list[Outcome | None] = [None] * len(items)
        prepared: dict[int, tuple[np.ndarray, str | None]] = {}
        for index, (image, hint) in enumerate(items):
            try:
                prepared[index] = self._validate(image, hint)
            except Exception as exc:  # this image alone: the others go on
                outcomes[index] = exc
        if prepared:
            indices = list(prepared)
            squares = np.stack([prepared[i][0] for i in indices])
            try:
                router_probs = ensemble.softmax(await self.infer(ROUTER_MODEL, normalize(squares, self.settings.preprocess)))
            except Exception as exc:  # the router serves every image: all of them learn why
                for index in indices:
                    outcomes[index] = exc
            else:
                routes = {}
                for row, index in enumerate(indices):
                    routed = PROJECTIONS[int(np.argmax(router_probs[row]))]
                    hinted = prepared[index][1]
                    hint_used = hinted is not None and self.settings.trust_hint
                    routes[index] = (hinted if hint_used else routed, router_probs[row], hint_used)
                groups = [[i for i in indices if routes[i][0] == projection] for projection in PROJECTIONS]
                await asyncio.gather(*(self._ensemble(projection, group, np.stack([prepared[i][0] for i in group]), routes, outcomes)
                                       for projection, group in zip(PROJECTIONS, groups) if group))
        return outcomes  # type: ignore[return-value]

    async def _ensemble(self, projection: str, group: list[int], squares: np.ndarray,
                        routes: Mapping[int, tuple[str, np.ndarray, bool]], outcomes: list) -> None:
        """The members of one projection on the stacked views of the images routed to it."""
        view_count = len(self.settings.tta_views)
        views = normalize(np.stack([tta_view(square, v) for square in squares for v in self.settings.tta_views]),
                          self.settings.preprocess)
        members = list(ensemble.MEMBERS)
        try:
            outputs = await asyncio.gather(*(self.infer(ensemble_model_name(projection, m), views) for m in members))
        except Exception as exc:
            for index in group:
                outcomes[index] = exc
            return
        for position, index in enumerate(group):
            rows = slice(position * view_count, (position + 1) * view_count)
            try:
                logits, probabilities = ensemble.ensemble_probabilities(
                    {m: out[rows] for m, out in zip(members, outputs)}, self.settings.weights[projection], self.settings.gating_alpha
                )
                check_finite_output(probabilities, "cxr_classifier probabilities")
            except Exception as exc:
                outcomes[index] = exc
                continue
            _, router_probs, hint_used = routes[index]
            outcomes[index] = Classification(
                logits=logits,
                probabilities=probabilities,
                projection=projection,
                projection_score=float(router_probs[PROJECTIONS.index(projection)]),
                hint_used=hint_used,
            )
