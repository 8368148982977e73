"""Load-test targets (minimum throughput, maximum p95 latency, failures) and profile files.

A profile file (YAML) holds targets and, optionally, the load that goes with them:

    load:                      # defaults for `cxrlt loadtest`; command-line options win
      users: 2
      spawn_rate: 2
      duration_s: 8
      weights: {cxr_classifier: 1, cxr_zeroshot: 1, cxr_findings: 1}
      image_set: all
    targets:
      min_rps: 1.0             # aggregate requests/s over the run
      max_p95_ms: 5000         # aggregate 95th percentile latency
      max_failures: 0          # failed requests allowed
      models:                  # optional, per model, same keys
        cxr_findings: {max_p95_ms: 8000}
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

TARGET_KEYS = ("min_rps", "max_p95_ms", "max_failures")
LOAD_KEYS = ("users", "spawn_rate", "duration_s", "weights", "image_set")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


@dataclasses.dataclass
class Targets:
    min_rps: float | None = None
    max_p95_ms: float | None = None
    max_failures: int | None = 0  # "zero failures" unless a profile or the command line says otherwise
    models: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Profile:
    targets: Targets
    load: dict[str, Any]
    source: str | None = None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ProfileError(f"{where} must be a non-negative number, not {value!r}")
    return float(value)


def _target_values(section: Mapping[str, Any], where: str) -> dict[str, float]:
    unknown = set(section) - set(TARGET_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown target(s) {sorted(unknown)}; known: {', '.join(TARGET_KEYS)}")
    return {key: _number(value, f"{where}.{key}") for key, value in section.items() if value is not None}


def load_profile(path: Path | str) -> Profile:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with 'targets' (and optionally 'load')")
    unknown = set(data) - {"targets", "load", "description"}
    if unknown:
        raise ProfileError(f"{path}: unknown section(s) {sorted(unknown)}; expected targets, load, description")
    section = dict(data.get("targets") or {})
    models_section = section.pop("models", None) or {}
    values = _target_values(section, f"{path}: targets")
    models = {}
    for model, model_section in models_section.items():
        if not isinstance(model_section, dict):
            raise ProfileError(f"{path}: targets.models.{model} must be a mapping")
        models[model] = _target_values(model_section, f"{path}: targets.models.{model}")
    targets = Targets(
        min_rps=values.get("min_rps"),
        max_p95_ms=values.get("max_p95_ms"),
        max_failures=int(values["max_failures"]) if "max_failures" in values else 0,
        models=models,
    )
    load = dict(data.get("load") or {})
    unknown = set(load) - set(LOAD_KEYS)
    if unknown:
        raise ProfileError(f"{path}: unknown load key(s) {sorted(unknown)}; known: {', '.join(LOAD_KEYS)}")
    return Profile(targets, load, str(path))


@dataclasses.dataclass
class Check:
    target: str  # e.g. "min_rps" or "cxr_findings.max_p95_ms"
    limit: float
    measured: float | None
    passed: bool

    @property
    def message(self) -> str:
        name = self.target.rsplit(".", 1)[-1]
        unit = {"min_rps": "req/s", "max_p95_ms": "ms", "max_failures": "failures"}[name]
        relation = ">=" if name.startswith("min") else "<="
        if self.measured is None:
            return f"{self.target}: no completed requests to measure (target {relation} {self.limit:g} {unit})"
        verdict = "met" if self.passed else "MISSED"
        return f"{self.target} {verdict}: measured {self.measured:.4g} {unit}, target {relation} {self.limit:g} {unit}"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "message": self.message}


def _check(target: str, limit: float | None, stats: Mapping[str, float] | None) -> Check | None:
    if limit is None:
        return None
    key = target.rsplit(".", 1)[-1]
    if stats is None or not stats.get("requests"):
        # Nothing ran: a failure budget is trivially kept, throughput and latency cannot be.
        return Check(target, limit, 0.0 if key == "max_failures" else None, key == "max_failures")
    if key == "min_rps":
        measured = float(stats["rps"])
        return Check(target, limit, measured, measured >= limit)
    if key == "max_p95_ms":
        if stats.get("p95_ms") is None:
            return Check(target, limit, None, False)
        measured = float(stats["p95_ms"])
        return Check(target, limit, measured, measured <= limit)
    measured = float(stats["failures"])
    return Check(target, limit, measured, measured <= limit)


def check_targets(targets: Targets, aggregated: Mapping[str, float] | None,
                  per_model: Mapping[str, Mapping[str, float]]) -> list[Check]:
    """Every target against the locust figures.

    `aggregated` and each `per_model` entry hold 'requests' (all, failed included, as locust
    counts them), 'failures', 'rps' and 'p95_ms'.
    """
    checks = [
        _check("min_rps", targets.min_rps, aggregated),
        _check("max_p95_ms", targets.max_p95_ms, aggregated),
        _check("max_failures", targets.max_failures, aggregated),
    ]
    for model, values in targets.models.items():
        for key in TARGET_KEYS:
            checks.append(_check(f"{model}.{key}", values.get(key), per_model.get(model)))
    return [c for c in checks if c is not None]
