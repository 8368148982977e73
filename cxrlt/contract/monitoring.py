"""Monitoring: the pipeline's metric names (python_backends.monitoring sends them) and the
monitoring baseline, what the served model answered on validation data, the reference the drift
rules compare live traffic with (JSON).

``monitoring_baseline.json`` at the repository root, written by `cxrlt operating-points`
(evaluation.baseline) from the same validation predictions as the operating points, and part of
``repository_sha256`` (it belongs to the weights: retrained networks move every rate). It holds,
per finding, the rate of positive decisions (at the operating points; probability > 0.5 where a
finding has none) overall and per projection, and the probability distribution (quantiles and
the fraction under each bucket bound the pipeline's histogram uses); the projection mix (the
fraction of lateral images, as routed); and, when the repository has a fitted gate, the OOD
score's quantiles, mean, standard deviation and refusal rate. `cxrlt monitoring-rules` turns it
into Prometheus rules (docs/monitoring.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MONITORING_BASELINE_FILE", "BASELINE_FORMAT", "load_baseline", "IMAGES", "POSITIVES", "PROBABILITY",
           "PROJECTIONS", "DISAGREEMENTS", "REFUSALS", "OOD_SCORE", "HISTOGRAMS", "COUNTERS",
           "PROBABILITY_BUCKETS", "OOD_BUCKET_FACTORS", "DEFAULT_DECISION", "PROJECTION_LABELS", "UNROUTED",
           "INVALID_INPUT", "OUT_OF_DISTRIBUTION", "REFUSAL_REASONS", "RELEASE_ANSWERS", "RELEASE_SECONDS",
           "SHADOW_IMAGES", "SHADOW_FLIPS", "SHADOW_POSITIVES", "SHADOW_DELTA",
           "DELTA_BUCKETS", "SECONDS_BUCKETS"]

# Metric names (docs/contract.md, "Metrics"); a histogram is its name + _bucket (le), _count, _sum.
IMAGES = "cxrlt_images_total"
POSITIVES = "cxrlt_positive_decisions_total"
PROBABILITY = "cxrlt_probability"
PROJECTIONS = "cxrlt_projections_total"
DISAGREEMENTS = "cxrlt_hint_disagreements_total"
REFUSALS = "cxrlt_refusals_total"
OOD_SCORE = "cxrlt_ood_score"
HISTOGRAMS = (PROBABILITY, OOD_SCORE)
COUNTERS = (IMAGES, POSITIVES, PROJECTIONS, DISAGREEMENTS, REFUSALS)
# Releases (cxrlt.contract.releases): who answered, and a shadow candidate's agreement with the live
# release on the same images (`cxrlt release report` reads them).
RELEASE_ANSWERS = "cxrlt_release_answers_total"  # {model, release, role: live|canary}
RELEASE_SECONDS = "cxrlt_release_seconds"  # histogram {model, release, role: live|canary|shadow}: a batch's pipeline time
SHADOW_IMAGES = "cxrlt_shadow_images_total"  # {model, release}: images the candidate `release` ran in shadow
SHADOW_FLIPS = "cxrlt_shadow_decision_flips_total"  # {model, release, finding}: candidate decision != live decision
SHADOW_POSITIVES = "cxrlt_shadow_positive_decisions_total"  # {model, release, finding, role: live|shadow}
SHADOW_DELTA = "cxrlt_shadow_abs_delta_probability"  # histogram {model, release, finding}: |p candidate - p live|
RELEASE_COUNTERS = (RELEASE_ANSWERS, SHADOW_IMAGES, SHADOW_FLIPS, SHADOW_POSITIVES)
RELEASE_HISTOGRAMS = (RELEASE_SECONDS, SHADOW_DELTA)
DELTA_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PROBABILITY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9)
# OOD_SCORE buckets as multiples of the gate's threshold (config parameter ood_threshold; 1.0 when
# the config has none), so the bucket at 1.0 splits accepted from refused images.
OOD_BUCKET_FACTORS = (0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0)
DEFAULT_DECISION = 0.5  # a finding without an operating point counts as positive above this probability
PROJECTION_LABELS = ("frontal", "lateral", "none")  # none: a model that does not route (cxr_zeroshot)
UNROUTED = "none"
INVALID_INPUT = "invalid_input"
OUT_OF_DISTRIBUTION = "out_of_distribution"
REFUSAL_REASONS = (INVALID_INPUT, OUT_OF_DISTRIBUTION)

MONITORING_BASELINE_FILE = "monitoring_baseline.json"
BASELINE_FORMAT = 1


def load_baseline(directory: Path | str) -> dict[str, Any] | None:
    """A release's monitoring baseline (`directory`: its files, cxrlt.contract.releases.files_of), or
    None when it has none."""
    path = Path(directory) / MONITORING_BASELINE_FILE
    if not path.is_file():
        return None
    try:
        baseline = json.loads(path.read_text())
        if baseline.get("format") != BASELINE_FORMAT or "findings" not in baseline:
            raise ValueError(f"format {baseline.get('format')!r}, expected {BASELINE_FORMAT}")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a monitoring baseline ({exc}); rerun `cxrlt operating-points`") from None
    return baseline
