"""The monitoring baseline (cxrlt.contract.monitoring) from validation predictions.

`cxrlt operating-points` computes it from the same predictions it chooses the operating points
on, with the points just chosen, so the baseline's positive rates are those of the decisions the
server will make; the drift rules (evaluation.drift) compare live traffic with it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cxrlt.contract.labels import PROJECTIONS
from cxrlt.contract.monitoring import BASELINE_FORMAT, DEFAULT_DECISION, MONITORING_BASELINE_FILE, PROBABILITY_BUCKETS
from cxrlt.contract.operating_points import OperatingPoints

QUANTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {str(q): float(np.percentile(values, q)) for q in QUANTILES} if len(values) else {}


def _rate(positive: np.ndarray) -> dict[str, Any]:
    return {"positive_rate": float(positive.mean()) if len(positive) else None,
            "positives": int(positive.sum()), "images": int(len(positive))}


def finding_baseline(probabilities: np.ndarray, positive: np.ndarray, projections: np.ndarray) -> dict[str, Any]:
    """One finding: its positive rate overall and per projection, and its probability distribution
    (quantiles, and the fraction at or under each of the pipeline histogram's bucket bounds)."""
    record = _rate(positive)
    record["by_projection"] = {p: _rate(positive[projections == p]) for p in PROJECTIONS if (projections == p).any()}
    record["probability_quantiles"] = _quantiles(probabilities)
    record["probability_cdf"] = {f"{b:g}": float(np.mean(probabilities <= b)) for b in PROBABILITY_BUCKETS}
    record["probability_mean"] = float(probabilities.mean())
    return record


def ood_baseline(scores: Sequence[float], threshold: float) -> dict[str, Any] | None:
    """The OOD score of in-distribution validation images: quantiles, mean, standard deviation and
    the share above the gate's threshold (what the gate refuses of in-distribution traffic)."""
    values = np.asarray([s for s in scores if np.isfinite(s)], dtype=np.float64)
    if not len(values):
        return None
    return {"images": int(len(values)), "threshold": float(threshold), "quantiles": _quantiles(values),
            "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "refusal_rate": float(np.mean(values > threshold))}


def compute_baseline(probabilities: np.ndarray, labels: Sequence[str], projections: Sequence[str | None],
                     points: OperatingPoints | None = None, ood: Mapping[str, Any] | None = None,
                     source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The baseline of validation predictions: probabilities [N, labels], each image's routed
    projection, the repository's operating points (None: positive is probability > 0.5, as the
    pipeline's metrics count it) and the OOD record (`ood_baseline`) when there is a gate."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(labels))
    routed = np.asarray([x or "" for x in projections], dtype=object)
    if points is not None:
        decisions = points.decide(p, list(labels), list(projections))
        positive = np.where(decisions >= 0, decisions == 1, p > DEFAULT_DECISION)
    else:
        positive = p > DEFAULT_DECISION
    lateral = float(np.mean(routed == "lateral")) if len(routed) else 0.0
    return {
        "format": BASELINE_FORMAT, "images": int(len(p)),
        "decision": f"operating points ({points.policy})" if points is not None else f"probability > {DEFAULT_DECISION}",
        "findings": {label: finding_baseline(p[:, k], positive[:, k], routed) for k, label in enumerate(labels)},
        "projections": {"images": int(len(routed)), "lateral_fraction": lateral,
                        "counts": {x: int(np.sum(routed == x)) for x in PROJECTIONS}},
        "ood": dict(ood) if ood else None,
        "source": dict(source or {}),
    }


def repository_ood_baseline(repository: str | os.PathLike, data_csv: str | os.PathLike, split: str = "val",
                            release: int | None = None) -> dict[str, Any] | None:
    """The OOD record of a release's gate (default: the live one) on the label CSV's `split` images
    (the served embedding and score, in process), or None when the release has no gate."""
    from cxrlt.contract.ood_gate import load_gate
    from cxrlt.contract.releases import release_dir
    from evaluation.ood_sets import reference_images
    from exporters.ood_gate import Embedder
    from exporters.releases import release_number

    release = release_number(repository, release)
    gate = load_gate(release_dir(repository, release))
    if gate is None:
        return None
    embeddings, _ = Embedder(repository, release=release).embed_each(reference_images(data_csv, "train" if split == "train" else "val"))
    return ood_baseline(gate.score(embeddings), gate.threshold)


def write_baseline(repository: str | os.PathLike, baseline: Mapping[str, Any], release: int | None = None) -> dict[str, Any]:
    """Write the baseline into a release (default: the live one): MONITORING_BASELINE_FILE in its
    directory, recorded in its manifest, with its identity refreshed to cover it. Returns the record."""
    from cxrlt.contract.releases import release_dir
    from exporters.releases import release_number, update_release
    from networks.checkpoints import file_sha256

    number = release_number(repository, release)
    path = release_dir(repository, number) / MONITORING_BASELINE_FILE
    path.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
    record = {"file": MONITORING_BASELINE_FILE, "sha256": file_sha256(path), "images": baseline["images"],
              "ood": baseline.get("ood") is not None}
    record["repository_sha256"] = update_release(repository, number, fields={"monitoring_baseline": record})
    return record
