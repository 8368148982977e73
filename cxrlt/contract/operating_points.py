"""Operating points: the per-finding thresholds that turn probabilities into decisions.

Thresholds belong to the weights (a retrained model moves its score distribution), so they live
in the model repository: ``operating_points.json`` at its root, part of ``repository_sha256``.
`cxrlt operating-points` (evaluation.operating_points) chooses them on validation data by a named
policy and writes the file; the pipeline models serve the same table as their config parameter
``operating_points`` and answer ``DECISIONS`` with it. The file also holds the per-finding Platt
calibration (``CALIBRATED_PROBABILITIES``), when one was fitted.

A finding has a point for ``any`` projection and, where the validation data had enough images of
one projection, for ``frontal`` and ``lateral``: an image uses its projection's point when there
is one, else the ``any`` point. A finding with no point gets no decision (-1), never a silent 0.5.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["OPERATING_POINTS_FILE", "CONFIG_PARAMETER", "ANY_PROJECTION", "POLICIES", "NO_DECISION",
           "Policy", "parse_policy", "OperatingPoint", "Calibration", "OperatingPoints", "load_operating_points",
           "served_operating_points"]

OPERATING_POINTS_FILE = "operating_points.json"
CONFIG_PARAMETER = "operating_points"  # the pipeline configs' copy of the table (what the stubs apply)
ANY_PROJECTION = "any"
POLICIES = ("youden", "f1", "sensitivity", "ppv")  # sensitivity and ppv take a target: sensitivity=0.9
NO_DECISION = -1  # DECISIONS value of a finding without an operating point
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a threshold is chosen: ``youden`` (max sensitivity + specificity - 1), ``f1`` (max F1),
    ``sensitivity=X`` (the highest threshold whose sensitivity is at least X) or ``ppv=X`` (the
    lowest threshold whose PPV is at least X)."""

    name: str
    target: float | None = None

    def __str__(self) -> str:
        return self.name if self.target is None else f"{self.name}={self.target:g}"


def parse_policy(text: str) -> Policy:
    """A :class:`Policy` from ``youden``, ``f1``, ``sensitivity=0.9`` or ``ppv=0.8``."""
    name, _, value = str(text).strip().lower().partition("=")
    if name not in POLICIES:
        raise ValueError(f"unknown operating-point policy {text!r}; use youden, f1, sensitivity=X or ppv=X")
    needs_target = name in ("sensitivity", "ppv")
    if needs_target != bool(value):
        hint = f"{name}=X with X in (0, 1], e.g. {name}=0.9" if needs_target else name
        raise ValueError(f"operating-point policy {text!r}: write {hint}")
    if not needs_target:
        return Policy(name)
    try:
        target = float(value)
    except ValueError:
        raise ValueError(f"operating-point policy {text!r}: {value!r} is not a number") from None
    if not 0.0 < target <= 1.0:
        raise ValueError(f"operating-point policy {text!r}: the target must be in (0, 1]")
    return Policy(name, target)


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """One finding's threshold on one projection, with what it achieved on the validation data."""

    threshold: float  # positive when probability >= threshold
    sensitivity: float
    specificity: float
    sensitivity_ci: tuple[float, float]  # bootstrap 95 % interval (grouped by patient when known)
    specificity_ci: tuple[float, float]
    positives: int  # validation images with the finding
    negatives: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OperatingPoint":
        return cls(float(data["threshold"]), float(data["sensitivity"]), float(data["specificity"]),
                   _pair(data["sensitivity_ci"]), _pair(data["specificity_ci"]),
                   int(data["positives"]), int(data["negatives"]))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Platt scaling on the served probability's logit: ``sigmoid(slope * logit(p) + intercept)``.

    Monotonic, so a decision at a threshold is the same on either scale; the served
    ``PROBABILITIES`` keep the seeds' math bit-exact and the calibrated values are a second output."""

    slope: float
    intercept: float

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
        return 1.0 / (1.0 + np.exp(-(self.slope * np.log(p / (1 - p)) + self.intercept)))


@dataclasses.dataclass(frozen=True)
class OperatingPoints:
    """The repository's operating points (label -> projection -> point) and calibration (label -> Platt)."""

    policy: Policy
    points: Mapping[str, Mapping[str, OperatingPoint]]
    calibration: Mapping[str, Calibration] = dataclasses.field(default_factory=dict)
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # what they were chosen on

    @property
    def calibrated(self) -> bool:
        return bool(self.calibration)

    def point(self, label: str, projection: str | None) -> OperatingPoint | None:
        """The point an image of ``projection`` uses: its projection's, else the ``any`` one."""
        per_projection = self.points.get(label, {})
        return per_projection.get(projection or ANY_PROJECTION) or per_projection.get(ANY_PROJECTION)

    def thresholds(self, labels: Sequence[str], projections: Sequence[str | None]) -> np.ndarray:
        """[images, labels] thresholds, NaN where a finding has no point."""
        rows = [[(p.threshold if (p := self.point(label, projection)) else math.nan) for label in labels]
                for projection in projections]
        return np.asarray(rows, dtype=np.float64).reshape(len(projections), len(labels))

    def decide(self, probabilities: np.ndarray, labels: Sequence[str], projections: Sequence[str | None]) -> np.ndarray:
        """[images, labels] int8: 1 positive, 0 negative, NO_DECISION where there is no point."""
        thresholds = self.thresholds(labels, projections)
        decisions = (np.asarray(probabilities, dtype=np.float64) >= thresholds).astype(np.int8)
        decisions[np.isnan(thresholds)] = NO_DECISION
        return decisions

    def calibrate(self, probabilities: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """The calibrated probabilities ([images, labels]); a finding without calibration keeps its value."""
        out = np.array(probabilities, dtype=np.float64, copy=True).reshape(-1, len(labels))
        for column, label in enumerate(labels):
            if label in self.calibration:
                out[:, column] = self.calibration[label].apply(out[:, column])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "policy": str(self.policy),
            "points": {label: {projection: dataclasses.asdict(point) for projection, point in by_projection.items()}
                       for label, by_projection in self.points.items()},
            "calibration": {label: dataclasses.asdict(c) for label, c in self.calibration.items()},
            "source": dict(self.source),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OperatingPoints":
        if data.get("format") != FORMAT:
            raise ValueError(f"operating points of format {data.get('format')!r}; this version reads format {FORMAT}")
        return cls(
            policy=parse_policy(data["policy"]),
            points={label: {projection: OperatingPoint.from_dict(point) for projection, point in by_projection.items()}
                    for label, by_projection in data["points"].items()},
            calibration={label: Calibration(float(c["slope"]), float(c["intercept"]))
                         for label, c in data.get("calibration", {}).items()},
            source=data.get("source", {}),
        )

    @classmethod
    def from_json(cls, text: str) -> "OperatingPoints":
        return cls.from_dict(json.loads(text))


def load_operating_points(directory: str | Path) -> OperatingPoints | None:
    """A release's operating points (`directory`: its files, cxrlt.contract.releases.files_of), or
    None when it has none (no decisions are made)."""
    path = Path(directory) / OPERATING_POINTS_FILE
    if not path.is_file():
        return None
    try:
        return OperatingPoints.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid operating-points file ({exc}); rerun `cxrlt operating-points`") from None


def served_operating_points(parameters: Mapping[str, str]) -> OperatingPoints | None:
    """The table a pipeline config serves (parameter ``operating_points``), or None without one."""
    text = parameters.get(CONFIG_PARAMETER, "").strip()
    if not text:
        return None
    try:
        return OperatingPoints.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"config parameter {CONFIG_PARAMETER!r} is not a valid operating-points table ({exc}); "
                         "rerun `cxrlt operating-points` on the repository") from None


def _pair(value: Sequence[float]) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)
