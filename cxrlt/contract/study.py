"""Study-level results: the images of one study (frontal and lateral) combined into one answer.

Per finding, as the CXR-LT 2024 teams aggregate views: the mean over the study's frontal images,
the mean over its lateral images, then the mean of the two (a study with one projection only
takes that projection's mean). The repository's ``any``-projection operating points are applied
to the study score.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cxrlt.contract.labels import ALL_LABELS
from cxrlt.contract.operating_points import ANY_PROJECTION, NO_DECISION, OperatingPoints
from cxrlt.contract.results import Decision, FindingsResult, findings_dict

__all__ = ["StudyResult", "aggregate_study", "group_by_study", "decisions_at", "decisions_from"]


@dataclasses.dataclass(frozen=True)
class StudyResult:
    study_instance_uid: str
    probabilities: dict[str, float]  # label -> study score, ALL_LABELS order
    images: tuple[FindingsResult, ...]  # what it was aggregated from
    decisions: dict[str, Decision] | None = None  # None: the repository has no operating points

    @property
    def projections(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for image in self.images:
            counts[image.projection or "unknown"] += 1
        return dict(counts)

    @property
    def random_weights(self) -> bool:
        return any(image.random_weights for image in self.images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "projections": self.projections,
            "random_weights": self.random_weights,
            "repository_sha256": next((i.repository_sha256 for i in self.images if i.repository_sha256), None),
            "probabilities": dict(self.probabilities),
            "findings": findings_dict(self.probabilities, self.decisions),
            "images": [image.to_dict() for image in self.images],
        }


def decisions_from(points: OperatingPoints, calls: Mapping[str, int], projection: str | None) -> dict[str, Decision]:
    """label -> its call (1 positive, 0 negative, as ``OperatingPoints.decide`` and the served DECISIONS
    give it) with the operating point of ``projection`` it was made at; NO_DECISION is left out."""
    decisions = {}
    for label, call in calls.items():
        point = points.point(label, projection)
        if call != NO_DECISION and point is not None:
            decisions[label] = Decision(bool(call), point.threshold, str(points.policy), point.sensitivity,
                                        point.specificity)
    return decisions


def decisions_at(points: OperatingPoints | None, probabilities: dict[str, float],
                 projection: str | None) -> dict[str, Decision] | None:
    """Each finding of ``probabilities`` called at ``points`` (None without points; a finding without a
    point is left out)."""
    if points is None:
        return None
    labels = list(probabilities)
    calls = points.decide(np.array([[probabilities[label] for label in labels]]), labels, [projection])[0]
    return decisions_from(points, dict(zip(labels, calls.tolist())), projection)


def aggregate_study(images: Sequence[FindingsResult], points: OperatingPoints | None = None) -> StudyResult:
    """One study's result from its images' results (all with the same StudyInstanceUID)."""
    if not images:
        raise ValueError("a study needs at least one classified image")
    uids = {image.study_instance_uid for image in images}
    if len(uids) != 1:
        raise ValueError(f"images of {len(uids)} studies given to one study aggregate: {sorted(map(str, uids))}")
    labels = [label for label in ALL_LABELS if all(label in image.probabilities for image in images)]
    per_projection = defaultdict(list)
    for image in images:
        per_projection[image.projection].append([image.probabilities[label] for label in labels])
    means = [np.mean(rows, axis=0) for rows in per_projection.values()]
    score = np.mean(means, axis=0)
    probabilities = {label: float(value) for label, value in zip(labels, score)}
    return StudyResult(str(uids.pop() or ""), probabilities, tuple(images), decisions_at(points, probabilities, ANY_PROJECTION))


def group_by_study(images: Iterable[FindingsResult]) -> dict[str, list[FindingsResult]]:
    """StudyInstanceUID -> its images' results, in the order given; images without a study are left out."""
    studies: dict[str, list[FindingsResult]] = defaultdict(list)
    for image in images:
        if image.study_instance_uid:
            studies[image.study_instance_uid].append(image)
    return dict(studies)
