"""`cxrlt tune-weights`: search the ensemble's logit weights per projection on validation data.

1. Every validation image goes once through the served pipeline code
   (python_backends.classifier via evaluation.reference, with the repository's settings and its
   ONNX or PyTorch networks); the member outputs are captured on their way, so each member's
   TTA-averaged logits [30] and the ensemble it was routed to are known per image.
2. Weights (pcam, cait, swin) run over a simplex grid (step `grid`; the three single members
   are its corners). The objective is the validation mAP of the gated probabilities
   (cxrlt.contract.ensemble.ensemble_probabilities, the served math) over all images, frontal and
   lateral weights chosen jointly: exhaustively when the grid is small (step 0.1: 66 x 66
   pairs), else by coordinate ascent from the best of the corners and the current weights.
   The current weights and every pair of single members are always candidates, so the result
   is never below the best single member nor below the weights it replaces.
3. The chosen weights are written into cxr_classifier/config.pbtxt and cxr_findings/config.pbtxt
   (weights_frontal, weights_lateral; reload the models to apply) and recorded in manifest.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
from typing import Any, Callable, Mapping

import numpy as np

from cxrlt.contract import ensemble
from cxrlt.contract.labels import PROJECTIONS, TASK1_LABELS
from cxrlt.contract.operating_points import OPERATING_POINTS_FILE
from cxrlt.contract.releases import files_of, read_release, release_number
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ensemble_model_name

from evaluation.evaluate import evaluation_images, predict
from training.job import load_split
from training.metrics import evaluate_predictions

log = logging.getLogger(__name__)

EXHAUSTIVE_LIMIT = 20_000  # joint (frontal, lateral) pairs searched exhaustively
Weights = dict[str, float]


# ----------------------------------------------------------------------------- metric


def fast_mean_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro average precision over the evaluable classes (both positives and negatives):
    the same value as sklearn's average_precision_score per class, vectorised over classes."""
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    positives = y.sum(axis=0)
    keep = (positives > 0) & (positives < y.shape[0])
    if not keep.any():
        return float("nan")
    y, s, positives = y[:, keep], s[:, keep], positives[keep]
    order = np.argsort(-s, axis=0, kind="mergesort")
    s_sorted = np.take_along_axis(s, order, axis=0)
    y_sorted = np.take_along_axis(y, order, axis=0).astype(np.float64)
    tps = np.cumsum(y_sorted, axis=0)
    ranks = np.arange(1, y.shape[0] + 1, dtype=np.float64)[:, None]
    # a threshold sits at the last of each run of equal scores
    last = np.vstack([s_sorted[1:] != s_sorted[:-1], np.ones((1, s.shape[1]), dtype=bool)])
    at_threshold = np.where(last, tps, 0.0)
    previous = np.vstack([np.zeros((1, s.shape[1])), np.maximum.accumulate(at_threshold, axis=0)[:-1]])
    recall_step = np.where(last, tps - previous, 0.0) / positives
    precision = tps / ranks
    return float((recall_step * precision).sum(axis=0).mean())


def simplex_grid(step: float) -> list[Weights]:
    """Every (pcam, cait, swin) with entries in multiples of `step` summing to 1 (corners included)."""
    if not 0 < step <= 1:
        raise ValueError(f"grid step must be in (0, 1], not {step}")
    n = round(1.0 / step)
    if abs(n * step - 1.0) > 1e-6:
        raise ValueError(f"grid step {step} must divide 1 (e.g. 0.1, 0.05, 0.2)")
    decimals = max(1, len(f"{step:g}".partition(".")[2]))
    return [{m: round(v / n, decimals + 2) for m, v in zip(ensemble.MEMBERS, (i, j, n - i - j))}
            for i in range(n + 1) for j in range(n + 1 - i)]


def corner(member: str) -> Weights:
    return {m: 1.0 if m == member else 0.0 for m in ensemble.MEMBERS}


# ---------------------------------------------------------------------------- logits


@dataclasses.dataclass
class MemberLogits:
    """Per validation image: the ensemble it went to and each member's TTA-averaged logits."""

    image_ids: list[str]
    labels: np.ndarray  # [N, 30]
    projections: list[str]  # the ensemble each image was routed to (as served)
    logits: dict[str, np.ndarray]  # member -> [N, 30] float64 (mean over the TTA views)
    served_probabilities: np.ndarray  # [N, 30] with the repository's current weights
    gating_alpha: float
    current: dict[str, Weights]  # projection -> weights in the repository

    def rows(self, projection: str) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.projections) if p == projection], dtype=np.int64)


def collect_member_logits(repository: str | os.PathLike, data_csv: str | os.PathLike, *, engine: str = "onnxruntime",
                          split: str = "val", val_fraction: float = 0.1, split_seed: int = 0, use_hints: bool = False,
                          on_image: Callable[[], None] | None = None) -> MemberLogits:
    """Run the served pipeline once per image (evaluation.evaluate.predict), capturing every member's outputs on the way."""
    from python_backends.classifier import ClassifierPipeline

    from evaluation.reference import ReferencePipeline

    reference = ReferencePipeline(repository, engine=engine, threads=1)
    settings = reference.classifier_settings
    captured: dict[str, np.ndarray] = {}

    async def infer(model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        output = await reference.infer(model_name, pixel_values)
        captured[model_name] = output
        return output

    pipeline = ClassifierPipeline(settings, infer)
    logits: dict[str, list[np.ndarray]] = {m: [] for m in ensemble.MEMBERS}

    def classify(image: np.ndarray, hint: str | None, image_id: str) -> tuple[np.ndarray, str]:
        captured.clear()
        result = asyncio.run(pipeline.classify(image, hint))
        for member in ensemble.MEMBERS:
            views = captured[ensemble_model_name(result.projection, member)]
            logits[member].append(np.asarray(views, dtype=np.float64).mean(axis=0))
        return result.probabilities, result.projection

    data = load_split(data_csv, val_fraction, split_seed)
    served = predict(evaluation_images(data, split), data.image_root, classify, use_hints, on_image=on_image)
    return MemberLogits(
        image_ids=served.image_ids, labels=served.labels, projections=served.projections_used,
        logits={m: np.stack(v) if v else np.zeros((0, len(TASK1_LABELS))) for m, v in logits.items()},
        served_probabilities=served.probabilities,
        gating_alpha=float(settings.gating_alpha), current={p: dict(settings.weights[p]) for p in PROJECTIONS},
    )


def gated_probabilities(data: MemberLogits, rows: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
    """Served probabilities [len(rows), 30] of those images with these weights.

    cxrlt.contract.ensemble.ensemble_probabilities on a batch: each member's [1, N, 30] 'views' axis
    holds the already TTA-averaged logits, so its mean over views is those logits."""
    members = {m: data.logits[m][rows][None] for m in ensemble.MEMBERS}
    return ensemble.ensemble_probabilities(members, weights, data.gating_alpha)[1].astype(np.float64)


def probabilities_with(data: MemberLogits, weights: Mapping[str, Weights]) -> np.ndarray:
    out = np.zeros_like(data.labels, dtype=np.float64)
    for projection in PROJECTIONS:
        rows = data.rows(projection)
        if len(rows):
            out[rows] = gated_probabilities(data, rows, weights[projection])
    return out


# ---------------------------------------------------------------------------- search


@dataclasses.dataclass
class TuneResult:
    weights: dict[str, Weights]
    before: dict[str, Weights]
    mAP_before: float
    mAP_after: float
    single_member_mAP: dict[str, float]  # member -> mAP with that member alone on both projections
    best_single_member: str
    best_single_member_mAP: float
    per_projection: dict[str, dict[str, Any]]
    evaluated: int
    method: str
    grid: float
    images: int
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def search_weights(data: MemberLogits, grid: float = 0.1, exhaustive_limit: int = EXHAUSTIVE_LIMIT) -> TuneResult:
    recomputed = probabilities_with(data, data.current)
    if data.served_probabilities.size and not np.allclose(recomputed, data.served_probabilities, atol=1e-5, rtol=0):
        worst = float(np.abs(recomputed - data.served_probabilities).max())
        raise RuntimeError(f"the member logits do not reproduce the served probabilities (max difference {worst:.2e}); "
                           "the weight search would optimise something other than what is served")
    points = simplex_grid(grid)
    candidates = {p: _unique([data.current[p], *(corner(m) for m in ensemble.MEMBERS), *points]) for p in PROJECTIONS}
    rows = {p: data.rows(p) for p in PROJECTIONS}
    # per projection, the probabilities of each candidate (computed once)
    cache = {p: [gated_probabilities(data, rows[p], w) if len(rows[p]) else None for w in candidates[p]]
             for p in PROJECTIONS}
    evaluated = 0

    def objective(choice: Mapping[str, int]) -> float:
        nonlocal evaluated
        evaluated += 1
        probs = np.zeros_like(data.labels, dtype=np.float64)
        for p in PROJECTIONS:
            if len(rows[p]):
                probs[rows[p]] = cache[p][choice[p]]
        return fast_mean_ap(data.labels, probs)

    current = {p: 0 for p in PROJECTIONS}  # index 0 is the current weights
    best_choice, best_value = dict(current), objective(current)
    sizes = [len(candidates[p]) for p in PROJECTIONS]
    method = "exhaustive" if int(np.prod(sizes)) <= exhaustive_limit else "coordinate ascent"
    if method == "exhaustive":
        scan = [dict(zip(PROJECTIONS, indices)) for indices in itertools.product(*(range(n) for n in sizes))]
    else:  # coordinate ascent from the best of the current weights and the pairs of single members
        scan = [{p: candidates[p].index(corner(m)) for p, m in zip(PROJECTIONS, pair)}
                for pair in itertools.product(ensemble.MEMBERS, repeat=len(PROJECTIONS))]
    for choice in scan:
        value = objective(choice)
        if value > best_value + 1e-12:
            best_choice, best_value = choice, value
    improved = method == "coordinate ascent"
    while improved:
        improved = False
        for p in PROJECTIONS:
            for index in range(len(candidates[p])):
                choice = {**best_choice, p: index}
                value = objective(choice)
                if value > best_value + 1e-12:
                    best_choice, best_value, improved = choice, value, True

    chosen = {p: candidates[p][best_choice[p]] for p in PROJECTIONS}

    per_projection: dict[str, dict[str, Any]] = {}
    for p in PROJECTIONS:
        if not len(rows[p]):
            continue
        labels = data.labels[rows[p]]
        per_projection[p] = {
            "images": int(len(rows[p])),
            "mAP_before": fast_mean_ap(labels, cache[p][0]),
            "mAP_after": fast_mean_ap(labels, cache[p][best_choice[p]]),
            "single_member_mAP": {m: fast_mean_ap(labels, cache[p][candidates[p].index(corner(m))]) for m in ensemble.MEMBERS},
        }
    # The reported figures come from the challenge metric itself (sklearn), not the fast copy.
    def mAP(weights: Mapping[str, Weights]) -> float:
        return evaluate_predictions(data.labels, probabilities_with(data, weights), TASK1_LABELS)["mAP"]

    singles = {m: mAP({p: corner(m) for p in PROJECTIONS}) for m in ensemble.MEMBERS}
    best_member = max(singles, key=lambda m: (np.nan_to_num(singles[m], nan=-1.0), -ensemble.MEMBERS.index(m)))
    return TuneResult(
        weights=chosen, before={p: dict(w) for p, w in data.current.items()}, mAP_before=mAP(data.current), mAP_after=mAP(chosen),
        single_member_mAP=singles, best_single_member=best_member, best_single_member_mAP=singles[best_member],
        per_projection=per_projection, evaluated=evaluated, method=method, grid=grid, images=len(data.image_ids),
        changed=any(ensemble.validate_weights(chosen[p]) != ensemble.validate_weights(data.current[p]) for p in PROJECTIONS),
    )


def _unique(weights: list[Mapping[str, float]]) -> list[Weights]:
    unique: dict[tuple[float, ...], Weights] = {}
    for w in weights:  # the first of each weighting (to 9 decimals), in order
        unique.setdefault(tuple(round(float(w[m]), 9) for m in ensemble.MEMBERS), {m: float(w[m]) for m in ensemble.MEMBERS})
    return list(unique.values())


# ----------------------------------------------------------------------------- write


def write_weights(repository: str | os.PathLike, weights: Mapping[str, Mapping[str, float]],
                  record: Mapping[str, Any] | None = None, release: int | None = None) -> dict[str, str]:
    """Put the weights into a release's (default: the live one's) parameters of the models that run
    Task 1, cxr_classifier and cxr_findings, and its manifest's record of them, and recompute its
    identity, which covers them."""
    from exporters.releases import update_release

    number = release_number(repository, release)
    updates = {f"weights_{p}": ensemble.format_weights(ensemble.validate_weights(weights[p])) for p in PROJECTIONS}
    for p in PROJECTIONS:  # what the backend will parse back
        ensemble.parse_weights(updates[f"weights_{p}"])
    classifier = {**read_release(repository, number).get("classifier", {}), **updates}
    fields = {"classifier": classifier, **({"weight_search": record} if record is not None else {})}
    update_release(repository, number, {model: updates for model in (CLASSIFIER_MODEL, FINDINGS_MODEL)}, fields)
    if (files_of(repository, number) / OPERATING_POINTS_FILE).is_file():
        log.warning("%s: the operating points were chosen with the previous ensemble weights; rerun "
                    "`cxrlt operating-points --repo %s` to choose them for the new ones", repository, repository)
    return updates
