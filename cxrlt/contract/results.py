"""Typed results of one classified image, as the client SDK returns them."""

from __future__ import annotations

import dataclasses
from typing import Any

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS


@dataclasses.dataclass(frozen=True)
class FindingsResult:
    image_id: str
    probabilities: dict[str, float]  # label -> probability, in ALL_LABELS order (30 then 6)
    projection: str  # "frontal" or "lateral": the ensemble that was used
    projection_score: float  # router probability of that projection (1.0 when a hint was trusted)
    hint: str | None  # the DICOM ViewPosition hint sent with the image, if any
    hint_used: bool  # whether the server routed by the hint rather than by the router
    model_name: str
    model_version: str
    random_weights: bool = False  # served networks were randomly initialised: not diagnostic
    latency_ms: float | None = None
    attempts: int = 1  # requests the client sent for this image (> 1: retried while the server was unavailable)

    def task1(self) -> dict[str, float]:
        return {label: self.probabilities[label] for label in TASK1_LABELS if label in self.probabilities}

    def task2(self) -> dict[str, float]:
        return {label: self.probabilities[label] for label in TASK2_LABELS if label in self.probabilities}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probabilities"] = {label: float(self.probabilities[label]) for label in ALL_LABELS if label in self.probabilities}
        return data
