"""`cxrlt operating-points`: per-finding thresholds and calibration chosen on validation data.

1. The served pipeline's probabilities of the validation images (evaluation.evaluate: the
   repository in process, or a running server), with the projection each image was routed to:
   the projection the served models decide with.
2. For every finding, a threshold by the policy (cxrlt.contract.operating_points.Policy: youden,
   f1, sensitivity=X, ppv=X) on all its images (projection ``any``, when the finding has at least
   MIN_ANY_EXAMPLES positives and negatives) and, for Task 1 findings, on each projection's images
   where that projection has at least MIN_PROJECTION_EXAMPLES positives and negatives. Task 2
   (zero-shot) findings get ``any`` points only: cxr_zeroshot does not route, so it could not tell
   which projection's point to use. A finding whose policy no threshold satisfies (``ppv=X`` above
   every reachable PPV) gets no point, and so no decision.
3. Each point's sensitivity and specificity with a bootstrap 95 % interval: BOOTSTRAP_RESAMPLES
   resamples of patients (of images when the label table names none), seeded, the threshold held.
4. Per finding, Platt scaling on logit(p) (Platt's smoothed targets, so separable data gives a
   finite fit). A fit is kept only when its slope is positive (decisions are then the same on
   either scale) and it lowers the finding's ECE on these images; else the finding keeps its
   probabilities.
5. ``write_operating_points``: the repository's operating_points.json, the pipeline configs'
   ``operating_points`` and ``calibrated`` parameters, the manifest's record, and the repository
   identity, which then covers the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve, roc_curve

from cxrlt.contract.labels import ALL_LABELS, PROJECTIONS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.manifest import read_manifest
from cxrlt.contract.operating_points import (ANY_PROJECTION, CONFIG_PARAMETER, OPERATING_POINTS_FILE, Calibration,
                                             OperatingPoint, OperatingPoints, Policy, load_operating_points)
from cxrlt.contract.releases import files_of, release_dir
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL

from training.metrics import expected_calibration_error

MIN_ANY_EXAMPLES = 1  # positives and negatives a finding needs for its `any` point
MIN_PROJECTION_EXAMPLES = 5  # ... of one projection's images, for that projection's own point
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
_BOOTSTRAP_CELLS = 4_000_000  # resamples x groups drawn at once (memory bound)
CALIBRATED_PARAMETER = "calibrated"
# The findings each pipeline config serves, and so the rows of its `operating_points` parameter.
CONFIG_LABELS = {CLASSIFIER_MODEL: TASK1_LABELS, ZEROSHOT_MODEL: TASK2_LABELS, FINDINGS_MODEL: ALL_LABELS}


# ---------------------------------------------------------------------------- thresholds


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, policy: Policy) -> float | None:
    """The threshold (positive when score >= threshold) that `policy` picks on these scores, or
    None when no threshold satisfies it. Needs positives and negatives."""
    y = np.asarray(y_true).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    if policy.name in ("youden", "sensitivity"):
        fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
        fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first threshold (+inf) calls nothing positive
        if policy.name == "youden":
            index = int(np.argmax(tpr - fpr))  # ties: the highest threshold
        else:  # descending thresholds, rising sensitivity: the first that reaches the target
            index = int(np.flatnonzero(tpr >= policy.target - 1e-12)[0])
    else:
        precision, recall, thresholds = precision_recall_curve(y, s)
        precision, recall = precision[:-1], recall[:-1]  # the last pair (recall 0) has no threshold
        if policy.name == "f1":
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
            index = len(f1) - 1 - int(np.argmax(f1[::-1]))  # ties: the highest threshold
        else:  # ascending thresholds: the lowest whose PPV reaches the target
            reached = np.flatnonzero(precision >= policy.target - 1e-12)
            if not reached.size:
                return None
            index = int(reached[0])
    return float(thresholds[index])


def rates(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of `score >= threshold`."""
    y = np.asarray(y_true).ravel() > 0.5
    called = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    return float(called[y].mean()), float((~called[~y]).mean())


# ----------------------------------------------------------------------------- bootstrap


def group_indices(patient_ids: Sequence[str] | None, n: int) -> tuple[np.ndarray, str]:
    """Each image's resampling unit (int [n]) and its name: its patient, or the image itself when
    the table names no patient (an image with an empty patient id is its own unit)."""
    if not patient_ids or not any(str(p).strip() for p in patient_ids):
        return np.arange(n, dtype=np.int64), "image"
    keys = [str(p).strip() or f"\0image {i}" for i, p in enumerate(patient_ids)]
    _, codes = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return codes.astype(np.int64).ravel(), "patient"


def bootstrap_intervals(positive: np.ndarray, negative: np.ndarray, called: np.ndarray, groups: np.ndarray,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap intervals of sensitivity and specificity ([K, 2] each) of K decision columns.

    positive, negative, called: bool [n, K] (an image outside column k's subset is neither
    positive nor negative there). The units of `groups` ([n] ints: patients, or images) are drawn
    with replacement, as many as there are, `resamples` times (multinomial counts per unit, in
    chunks); every column sees the same draws. A resample without positives (negatives) of a
    column does not count for its sensitivity (specificity): NaN when none has any."""
    positive, negative, called = (np.asarray(a, dtype=bool).reshape(len(groups), -1) for a in (positive, negative, called))
    k = positive.shape[1]
    if not len(groups) or not k:
        return np.full((k, 2), np.nan), np.full((k, 2), np.nan)
    n_groups = int(groups.max()) + 1
    per_group = np.zeros((n_groups, 4 * k))
    np.add.at(per_group, groups, np.hstack([positive & called, positive, negative & ~called, negative]).astype(np.float64))
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n_groups, 1))
    totals = []
    for start in range(0, resamples, chunk):
        draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=min(chunk, resamples - start))
        totals.append(draws @ per_group)
    tp, p, tn, n = np.split(np.vstack(totals), 4, axis=1)
    tail = 100 * (1 - level) / 2
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column without positives in every resample
        sensitivity = np.nanpercentile(np.where(p > 0, tp / p, np.nan), [tail, 100 - tail], axis=0).T
        specificity = np.nanpercentile(np.where(n > 0, tn / n, np.nan), [tail, 100 - tail], axis=0).T
    return sensitivity, specificity


# --------------------------------------------------------------------------- calibration


def fit_calibration(y_true: np.ndarray, probabilities: np.ndarray) -> Calibration | None:
    """Platt scaling on logit(p): logistic regression of the labels on the logit, unpenalised,
    with Platt's smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) as sample weights.
    None without both positives and negatives."""
    y = np.asarray(y_true).ravel() > 0.5
    if y.all() or not y.any():
        return None
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    x = np.log(p / (1 - p))
    target = np.where(y, (y.sum() + 1) / (y.sum() + 2), 1 / ((~y).sum() + 2))
    features = np.concatenate([x, x])[:, None]
    classes = np.concatenate([np.ones_like(x), np.zeros_like(x)])
    model = LogisticRegression(C=np.inf, max_iter=1000).fit(features, classes, sample_weight=np.concatenate([target, 1 - target]))
    return Calibration(float(model.coef_[0, 0]), float(model.intercept_[0]))


def calibrate_findings(y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str]
                       ) -> tuple[dict[str, Calibration], dict[str, tuple[float, float]]]:
    """The calibrations kept (see the module docstring, step 4) and every evaluable finding's ECE
    (uncalibrated, calibrated: the same when its fit was not kept)."""
    kept: dict[str, Calibration] = {}
    ece: dict[str, tuple[float, float]] = {}
    for column, label in enumerate(labels):
        y, p = y_true[:, column] > 0.5, probabilities[:, column]
        if y.all() or not y.any():
            continue
        before = expected_calibration_error(y, p)
        fit = fit_calibration(y, p)  # not None: y has positives and negatives
        after = expected_calibration_error(y, fit.apply(p))
        keep = fit.slope > 0 and after < before
        if keep:
            kept[label] = fit
        ece[label] = (before, after if keep else before)
    return kept, ece


# ------------------------------------------------------------------------------ choosing


@dataclasses.dataclass
class Choice:
    """What `choose_operating_points` found."""

    points: OperatingPoints
    missing: dict[str, str]  # label -> why it has no point at all
    ece: dict[str, tuple[float, float]]  # evaluable label -> (ECE uncalibrated, calibrated)
    images: int
    units: int  # patients (or images) the bootstrap resampled
    grouped_by: str  # "patient" or "image"
    predictions: Any = None  # evaluation.evaluate.Predictions they were chosen on (operating_points_from_data)

    @property
    def mECE(self) -> tuple[float, float]:
        """Macro ECE over the evaluable findings (training.metrics' mECE), before and after calibration."""
        if not self.ece:
            return float("nan"), float("nan")
        before, after = np.mean(list(self.ece.values()), axis=0)
        return float(before), float(after)


def _subsets(y: np.ndarray, labels: Sequence[str], projections: Sequence[str | None]
             ) -> tuple[list[tuple[str, str, np.ndarray]], dict[str, str]]:
    """(label, projection, image mask) of every point the data supports, and why others have none."""
    slots, missing = [], {}
    routed = np.asarray([p if p is not None else "" for p in projections], dtype=object)
    for column, label in enumerate(labels):
        positives = int(y[:, column].sum())
        if min(positives, len(y) - positives) < MIN_ANY_EXAMPLES:
            missing[label] = f"{positives} positive(s) of {len(y)} images: no threshold to choose"
            continue
        slots.append((label, ANY_PROJECTION, np.ones(len(y), dtype=bool)))
        if label not in TASK1_LABELS:
            continue  # zero-shot: cxr_zeroshot does not route, so `any` only
        for projection in PROJECTIONS:
            mask = routed == projection
            positives = int(y[mask, column].sum())
            if min(positives, int(mask.sum()) - positives) >= MIN_PROJECTION_EXAMPLES:
                slots.append((label, projection, mask))
    return slots, missing


def choose_operating_points(y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str],
                            projections: Sequence[str | None], patient_ids: Sequence[str] | None = None,
                            policy: Policy = Policy("youden"), *, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED, source: Mapping[str, Any] | None = None) -> Choice:
    """Operating points and calibration of `labels` from validation labels and probabilities
    ([images, labels]) and each image's routed projection (see the module docstring)."""
    y = np.asarray(y_true).reshape(-1, len(labels)) > 0.5
    p = np.asarray(probabilities, dtype=np.float64).reshape(y.shape)
    slots, missing = _subsets(y, labels, projections)
    chosen = []
    for label, projection, mask in slots:
        column = labels.index(label)
        threshold = choose_threshold(y[mask, column], p[mask, column], policy)
        if threshold is not None:
            chosen.append((label, column, projection, mask, threshold))
        elif projection == ANY_PROJECTION:
            missing[label] = f"no threshold reaches {policy}"
    groups, grouped_by = group_indices(patient_ids, len(y))
    columns = [column for _, column, *_ in chosen]
    masks = np.stack([mask for *_, mask, _ in chosen], axis=1) if chosen else np.zeros((len(y), 0), dtype=bool)
    called = p[:, columns] >= np.asarray([t for *_, t in chosen])
    sens_ci, spec_ci = bootstrap_intervals(y[:, columns] & masks, ~y[:, columns] & masks, called, groups, resamples, seed, CI_LEVEL)
    points: dict[str, dict[str, OperatingPoint]] = {}
    for k, (label, column, projection, mask, threshold) in enumerate(chosen):
        sensitivity, specificity = rates(y[mask, column], p[mask, column], threshold)
        points.setdefault(label, {})[projection] = OperatingPoint(
            threshold, sensitivity, specificity, _interval(sens_ci[k], sensitivity), _interval(spec_ci[k], specificity),
            int(y[mask, column].sum()), int((~y[mask, column]).sum()))
    calibration, ece = calibrate_findings(y, p, labels)
    units = int(groups.max()) + 1 if len(groups) else 0
    record = {**(source or {}), "policy": str(policy), "images": int(len(y)), "labels": list(labels),
              "projection": "as routed by the served pipeline",
              "min_examples": {"any": MIN_ANY_EXAMPLES, "projection": MIN_PROJECTION_EXAMPLES},
              "bootstrap": {"resamples": resamples, "seed": seed, "level": CI_LEVEL, "resampled": grouped_by, "units": units}}
    choice = Choice(OperatingPoints(policy, points, calibration, record), missing, ece, len(y), units, grouped_by)
    before, after = choice.mECE
    record["mECE"] = {"uncalibrated": before, "calibrated": after}
    return choice


def _interval(bounds: np.ndarray, estimate: float) -> tuple[float, float]:
    low, high = (float(b) for b in bounds)
    if np.isnan(low) or np.isnan(high):  # no resample held the class: nothing to say beyond the estimate
        return estimate, estimate
    return low, high


# ------------------------------------------------------------------------- the pipeline


def operating_points_from_data(repository: str | os.PathLike, data_csv: str | os.PathLike, policy: Policy, *,
                               classify: Callable | None = None, engine: str = "onnxruntime", split: str = "val",
                               val_fraction: float = 0.1, split_seed: int = 0, image_root: str | os.PathLike | None = None,
                               use_hints: bool = False, concurrency: int = 1, on_image: Callable[[], None] | None = None,
                               resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                               source: Mapping[str, Any] | None = None, release: int | None = None) -> Choice:
    """The served pipeline's predictions of the split's images (`classify`: evaluation.evaluate's
    reference or server classifier answering `csv_labels(data_csv)`; default: the repository in
    process with `engine`), then `choose_operating_points`."""
    from evaluation.evaluate import csv_labels, evaluation_images, predict, reference_classifier
    from exporters.releases import repository_identity
    from training.job import load_split

    labels = csv_labels(data_csv)
    data = load_split(data_csv, val_fraction, split_seed, labels=labels, image_root=image_root)
    table = evaluation_images(data, split)
    classify = classify or reference_classifier(repository, engine, labels, release)
    predictions = predict(table, data.image_root, classify, use_hints, concurrency, on_image, labels)
    record = {"data": str(data_csv), "split": split, "val_fraction": val_fraction, "split_seed": split_seed,
              "hints": use_hints, "chosen_for_repository_sha256": repository_identity(read_manifest(repository, release)),
              **(source or {})}
    choice = choose_operating_points(predictions.labels, predictions.probabilities, list(labels),
                                     predictions.projections_used, predictions.patient_ids, policy,
                                     resamples=resamples, seed=seed, source=record)
    choice.predictions = predictions  # the monitoring baseline is computed from the same predictions
    return choice


# ------------------------------------------------------------------------------ writing


def served_table(points: OperatingPoints, labels: Sequence[str]) -> OperatingPoints:
    """The rows of `labels` (what one pipeline config serves), without the bulky `source`."""
    return OperatingPoints(points.policy, {k: v for k, v in points.points.items() if k in labels},
                           {k: v for k, v in points.calibration.items() if k in labels})


def write_operating_points(repository: str | os.PathLike, points: OperatingPoints, release: int | None = None) -> dict[str, Any]:
    """Write `points` into a release (default: the live one): operating_points.json in its directory;
    in its pipeline parameters `operating_points` (compact JSON of the rows of the findings each
    config serves: CONFIG_LABELS) and `calibrated`; its manifest's `operating_points` record; and its
    identity (`repository_sha256`), which then covers the file. Returns the record."""
    from exporters.releases import release_number, update_release
    from networks.checkpoints import file_sha256

    number = release_number(repository, release)
    path = release_dir(repository, number) / OPERATING_POINTS_FILE
    path.write_text(points.to_json())
    parameters = {}
    for model, labels in CONFIG_LABELS.items():
        table = served_table(points, labels)
        parameters[model] = {CONFIG_PARAMETER: json.dumps(table.to_dict(), sort_keys=True, separators=(",", ":")),
                             CALIBRATED_PARAMETER: "true" if table.calibrated else "false"}
    record = {"file": OPERATING_POINTS_FILE, "sha256": file_sha256(path), "policy": str(points.policy),
              "findings": sorted(points.points), "calibrated": sorted(points.calibration)}
    record["repository_sha256"] = update_release(repository, number, parameters, {"operating_points": record})
    return record


# ------------------------------------------------------------------------------ measuring


def decision_metrics(y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str],
                     projections: Sequence[str | None], points: OperatingPoints) -> dict[str, Any]:
    """What the repository's operating points and calibration do on these images: per finding the
    sensitivity and specificity of its decisions (each image at its projection's point), and the
    mECE of the probabilities and of the calibrated ones (evaluable findings)."""
    y = np.asarray(y_true).reshape(-1, len(labels)) > 0.5
    p = np.asarray(probabilities, dtype=np.float64).reshape(y.shape)
    decisions = points.decide(p, labels, projections)
    calibrated = points.calibrate(p, labels)
    per_class: dict[str, dict[str, Any]] = {}
    ece = []
    for column, label in enumerate(labels):
        yc, decided = y[:, column], decisions[:, column] >= 0
        if yc.any() and not yc.all():
            ece.append((expected_calibration_error(yc, p[:, column]), expected_calibration_error(yc, calibrated[:, column])))
        if not decided.any():
            continue
        called, positive, negative = decisions[:, column] == 1, yc & decided, ~yc & decided
        per_class[label] = {
            "sensitivity": float(called[positive].mean()) if positive.any() else float("nan"),
            "specificity": float((~called[negative]).mean()) if negative.any() else float("nan"),
            "positives": int(positive.sum()), "negatives": int(negative.sum()), "calibrated": label in points.calibration}
    before, after = np.mean(ece, axis=0) if ece else (float("nan"), float("nan"))
    sens = [r["sensitivity"] for r in per_class.values() if not np.isnan(r["sensitivity"])]
    spec = [r["specificity"] for r in per_class.values() if not np.isnan(r["specificity"])]
    return {"policy": str(points.policy), "calibrated": points.calibrated, "mECE_uncalibrated": float(before),
            "mECE_calibrated": float(after), "mean_sensitivity": float(np.mean(sens)) if sens else float("nan"),
            "mean_specificity": float(np.mean(spec)) if spec else float("nan"), "per_class": per_class}


def repository_decision_metrics(repository: str | os.PathLike, predictions: Any) -> dict[str, Any] | None:
    """`decision_metrics` of evaluation.evaluate's predictions at the repository's operating
    points, or None when it has none. ``stale``: the points were chosen for other weights or
    settings than the repository now has (rerun `cxrlt operating-points`)."""
    from exporters.releases import repository_identity

    points = load_operating_points(files_of(repository))
    if points is None:
        return None
    result = decision_metrics(predictions.labels, predictions.probabilities, predictions.label_names,
                              predictions.projections_used, points)
    chosen_for = points.source.get("chosen_for_repository_sha256")
    result["stale"] = bool(chosen_for) and chosen_for != repository_identity(read_manifest(repository))
    return result
