"""Typed results of one classified image (and of a study), as the client SDK returns them."""

from __future__ import annotations

import dataclasses
from typing import Any

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS


@dataclasses.dataclass(frozen=True)
class Decision:
    """One finding called at the repository's operating point (cxrlt.contract.operating_points)."""

    positive: bool
    threshold: float
    policy: str  # how the threshold was chosen: youden, f1, sensitivity=X, ppv=X
    sensitivity: float  # what the threshold achieved on the validation data
    specificity: float


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
    # label -> decision at the repository's operating points; None: the repository has none
    decisions: dict[str, Decision] | None = None
    calibrated_probabilities: dict[str, float] | None = None  # None: the repository is not calibrated
    repository_sha256: str | None = None  # the identity of the release that answered (its repository_sha256)
    release: int | None = None  # the release that answered (cxrlt.contract.releases); None: a server without releases
    study_instance_uid: str | None = None  # of a DICOM source
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    source: str | None = None  # the path (or name) the image came from
    # The out-of-distribution gate (docs/gate.md): the image's OOD_SCORE, the threshold in force, and
    # whether the score is above it (an image the server answered despite that: ood_action "flag");
    # all None when the repository has no fitted gate
    ood_score: float | None = None
    ood_threshold: float | None = None
    out_of_distribution: bool | None = None

    def task1(self) -> dict[str, float]:
        return {label: self.probabilities[label] for label in TASK1_LABELS if label in self.probabilities}

    def task2(self) -> dict[str, float]:
        return {label: self.probabilities[label] for label in TASK2_LABELS if label in self.probabilities}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``findings``: per finding its probability and, when the
        repository has operating points, ``positive``, ``threshold``, ``policy``, ``sensitivity`` and
        ``specificity`` (and ``calibrated_probability`` when it is calibrated)."""
        data = dataclasses.asdict(self)
        data["probabilities"] = {label: float(self.probabilities[label]) for label in ALL_LABELS if label in self.probabilities}
        data["findings"] = findings_dict(self.probabilities, self.decisions, self.calibrated_probabilities)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FindingsResult":
        """The result :meth:`to_dict` wrote (extra keys, e.g. ``findings``, are ignored)."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields}
        if values.get("decisions") is not None:
            values["decisions"] = {label: Decision(**decision) for label, decision in values["decisions"].items()}
        return cls(**values)


def findings_dict(probabilities: dict[str, float], decisions: dict[str, Decision] | None,
                  calibrated: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """label -> {probability, [calibrated_probability], [positive, threshold, policy, sensitivity, specificity]}."""
    findings = {}
    for label in (label for label in ALL_LABELS if label in probabilities):
        entry: dict[str, Any] = {"probability": float(probabilities[label])}
        if calibrated and label in calibrated:
            entry["calibrated_probability"] = float(calibrated[label])
        if decisions and label in decisions:
            entry.update(dataclasses.asdict(decisions[label]))
        findings[label] = entry
    return findings
