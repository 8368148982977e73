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

from loadtest.kernel import Check

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


UNITS = {"min_rps": "req/s", "max_p95_ms": "ms", "max_failures": "failures"}


def _check(target: str, limit: float | None, stats: Mapping[str, float] | None) -> Check | None:
    """One target (e.g. "min_rps" or "cxr_findings.max_p95_ms") against locust's figures."""
    if limit is None:
        return None
    key = target.rsplit(".", 1)[-1]
    relation, unit = (">=" if key.startswith("min") else "<="), UNITS[key]
    if stats is None or not stats.get("requests"):
        # Nothing ran: a failure budget is trivially kept, throughput and latency cannot be.
        measured = 0.0 if key == "max_failures" else None
    else:
        measured = {"min_rps": stats["rps"], "max_p95_ms": stats.get("p95_ms"), "max_failures": stats["failures"]}[key]
    if measured is None:
        return Check(target, False, f"{target}: no completed requests to measure (target {relation} {limit:g} {unit})",
                     None, limit=limit)
    passed = measured >= limit if relation == ">=" else measured <= limit
    return Check(target, passed, f"{target} {'met' if passed else 'MISSED'}: measured {float(measured):.4g} {unit}, "
                                 f"target {relation} {limit:g} {unit}", float(measured), limit=limit)


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
