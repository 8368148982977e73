"""Evaluation metrics of the challenge: mAP (primary), mAUC, mF1 at 0.5, mECE.

Per class, then macro-averaged over the classes that are *evaluable*: those with at
least one positive and one negative in the evaluation set. A class without both is
reported with NaN for every metric and left out of every average, so a rare class
missing from a small validation split never crashes an evaluation.

ECE per class (binary probabilities, 15 equal-width bins on [0, 1], bin b = (lo, hi] with
0 in the first bin): ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|, i.e. the
gap between the observed positive rate and the mean predicted probability, weighted by
bin occupancy.

Head / medium / tail groups by training frequency: the classes are ranked by their
training positive count (descending, ties by class order) and cut into thirds - the top
third is head, the middle third medium, the bottom third tail. Rank thirds adapt to any
label set (30 or 36 classes) and any data set size, where fixed count thresholds (e.g.
> 1000) would only suit one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

METRICS = ("AP", "AUC", "F1", "ECE")
GROUPS = ("head", "medium", "tail")


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """Binned ECE of one class's binary probabilities (see the module docstring)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    bins = np.clip(np.ceil(p * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=y, minlength=n_bins) - np.bincount(bins, weights=p, minlength=n_bins))
    # sum_b (n_b/N) |acc_b - conf_b| == sum_b |sum y_b - sum p_b| / N
    return float(gap[counts > 0].sum() / y.size)


def frequency_groups(train_counts: Sequence[float], labels: Sequence[str]) -> dict[str, str]:
    """{label: "head" | "medium" | "tail"} by rank thirds of the training counts."""
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.shape != (len(labels),):
        raise ValueError(f"train_counts has {counts.size} entries for {len(labels)} labels; give one count per label")
    order = np.argsort(-counts, kind="stable")
    groups: dict[str, str] = {}
    for group, members in zip(GROUPS, np.array_split(order, len(GROUPS))):
        for index in members:
            groups[labels[index]] = group
    return groups


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def evaluate_predictions(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str],
                         train_counts: Sequence[float] | None = None, threshold: float = 0.5,
                         n_bins: int = 15) -> dict:
    """Per-class and macro metrics of probabilities y_prob [N, C] against 0/1 y_true [N, C].

    Returns {"mAP", "mAUC", "mF1", "mECE": macro floats (NaN if no class is evaluable),
    "per_class": {label: {"AP", "AUC", "F1", "ECE", "positives", "evaluable", "group"?}},
    "excluded": [labels without both positives and negatives], "n_evaluable": int,
    "groups": {"head"|"medium"|"tail": {"mAP", "mAUC", "mF1", "mECE", "classes"}} (only
    with train_counts)}.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_prob = y_true[:, None], y_prob.reshape(-1, 1)
    if y_true.shape != y_prob.shape or y_true.shape[1] != len(labels):
        raise ValueError(f"y_true {list(y_true.shape)} and y_prob {list(y_prob.shape)} must both be "
                         f"[images, {len(labels)}] for {len(labels)} labels")
    if np.isnan(y_prob).any():
        raise ValueError("y_prob contains NaN; check the model outputs before evaluating")
    y_true = (y_true > 0.5).astype(np.int64)
    groups = frequency_groups(train_counts, labels) if train_counts is not None else None

    per_class: dict[str, dict] = {}
    excluded: list[str] = []
    for c, label in enumerate(labels):
        y, p = y_true[:, c], y_prob[:, c]
        positives = int(y.sum())
        evaluable = 0 < positives < len(y)
        row = {"positives": positives, "evaluable": evaluable}
        if evaluable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn's ill-defined-metric warnings
                row.update(AP=float(average_precision_score(y, p)), AUC=float(roc_auc_score(y, p)),
                           F1=float(f1_score(y, p >= threshold, zero_division=0)),
                           ECE=expected_calibration_error(y, p, n_bins))
        else:
            row.update({m: float("nan") for m in METRICS})
            excluded.append(label)
        if groups is not None:
            row["group"] = groups[label]
        per_class[label] = row

    def macro(names: Sequence[str]) -> dict[str, float]:
        return {f"m{m}": _nanmean([per_class[n][m] for n in names]) for m in METRICS}

    result: dict = {**macro(labels), "per_class": per_class, "excluded": excluded,
                    "n_evaluable": len(labels) - len(excluded)}
    if groups is not None:
        result["groups"] = {}
        for group in GROUPS:
            members = [label for label in labels if groups[label] == group]
            result["groups"][group] = {**macro(members), "classes": members}
    return result


def json_default(value: Any) -> Any:
    """`json.dumps`' default for the reports: numpy scalars and arrays, and paths."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
