"""`cxrlt evaluate`: the challenge metrics of the served Task 1 pipeline on labelled images.

The probabilities come from one of two places that compute the same thing:
* a running Triton server (`cxr_classifier` over gRPC with cxrlt.client.sdk), or
* the reference pipeline in process (evaluation.reference: the served pipeline code, with the
  repository's own settings, running the PyTorch networks rebuilt from the checkpoints; or
  the repository's ONNX files with engine onnxruntime).
So `evaluate --url` and `evaluate --repo` of one repository must agree, which the tests check.

Images are the patient-level validation split by default (the split `cxrlt train` holds
out), or every image of the CSV. Metrics: training.metrics.evaluate_predictions (mAP
primary, mAUC, mF1 at 0.5, mECE with 15 bins; per class, macro and head/medium/tail groups
by training frequency).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cxrlt.contract.labels import ALL_LABELS, PROJECTIONS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL
from cxrlt.io.images import load_pixels

from training.data import LabelTable
from training.job import SplitData, load_split
from training.metrics import GROUPS, METRICS, evaluate_predictions, json_default

SPLITS = ("val", "all")
# The DICOM ViewPosition term sent as a hint for a CSV projection (with hints on).
HINT_FOR_PROJECTION = {"frontal": "PA", "lateral": "LL"}


@dataclasses.dataclass
class Predictions:
    image_ids: list[str]
    probabilities: np.ndarray  # [N, L] float64, L = len(label_names) (Task 1: 30)
    labels: np.ndarray  # [N, L]
    projections_used: list[str]  # the ensemble each image went to
    projections_true: list[str | None]
    label_names: tuple[str, ...] = TASK1_LABELS
    patient_ids: list[str] = dataclasses.field(default_factory=list)


def evaluation_images(data: SplitData, split: str) -> LabelTable:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return data.table.subset(data.val) if split == "val" else data.table


def hint_for(projection: str | None, use_hints: bool) -> str | None:
    return HINT_FOR_PROJECTION.get(projection) if use_hints and projection else None


def csv_labels(data_csv: str | os.PathLike) -> tuple[str, ...]:
    """The findings a label CSV can score: Task 1 (required) and the Task 2 columns it has."""
    header = {str(c).strip().lower() for c in pd.read_csv(data_csv, nrows=0, dtype=str).columns}
    return TASK1_LABELS + tuple(label for label in TASK2_LABELS if label.lower() in header)


def needs_zeroshot(labels: Sequence[str]) -> bool:
    return any(label in TASK2_LABELS for label in labels)


Classify = Callable[[np.ndarray, str | None, str], tuple[np.ndarray, str]]


def reference_classifier(repository: str | os.PathLike, engine: str = "torch",
                         labels: Sequence[str] = TASK1_LABELS, release: int | None = None) -> Classify:
    """In-process classification with a release's settings (evaluation.reference; default: the live
    release): the probabilities of `labels` (Task 2 ones through the zero-shot pipeline)."""
    from evaluation.reference import ReferencePipeline

    pipeline = ReferencePipeline(repository, engine=engine, threads=1, release=release)
    columns = [ALL_LABELS.index(label) for label in labels]

    def classify(image: np.ndarray, hint: str | None, image_id: str) -> tuple[np.ndarray, str]:
        if needs_zeroshot(labels):
            probabilities, result = pipeline.findings(image, hint)
        else:
            result = pipeline.classify(image, hint)
            probabilities = result.probabilities
        return np.asarray(probabilities, dtype=np.float64)[columns], result.projection

    return classify


def server_classifier(url: str, timeout_s: float = 60.0, labels: Sequence[str] = TASK1_LABELS):
    """Classification by a running server through the client SDK: its cxr_classifier, or its
    cxr_findings when `labels` include Task 2 findings."""
    from cxrlt.client.sdk import CxrltClient

    model = FINDINGS_MODEL if needs_zeroshot(labels) else CLASSIFIER_MODEL
    client = CxrltClient(url, model=model, timeout_s=timeout_s)
    client.wait_until_ready(timeout_s)

    def classify(image: np.ndarray, hint: str | None, image_id: str) -> tuple[np.ndarray, str]:
        result = client.classify(image, hint=hint, image_id=image_id)
        return np.array([result.probabilities[label] for label in labels], dtype=np.float64), result.projection

    return classify, client


def predict(table: LabelTable, image_root: Path, classify: Classify, use_hints: bool = False,
            concurrency: int = 1, on_image: Callable[[], None] | None = None,
            labels: Sequence[str] = TASK1_LABELS) -> Predictions:
    """Every image of `table` through `classify` (which answers the probabilities of `labels`)."""
    def one(index: int) -> tuple[np.ndarray, str]:
        image = load_pixels(image_root / table.image_paths[index])  # what a client sends
        out = classify(image, hint_for(table.projections[index], use_hints), table.image_ids[index])
        if on_image:
            on_image()
        return out

    if concurrency > 1:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            outputs = list(pool.map(one, range(len(table))))
    else:
        outputs = [one(i) for i in range(len(table))]
    probabilities = np.stack([p for p, _ in outputs]) if outputs else np.zeros((0, len(labels)))
    return Predictions(list(table.image_ids), probabilities, table.columns(labels),
                       [projection for _, projection in outputs], list(table.projections),
                       tuple(labels), list(table.patient_ids))


def summarize(predictions: Predictions, train_counts: Sequence[float]) -> dict[str, Any]:
    metrics = evaluate_predictions(predictions.labels, predictions.probabilities, predictions.label_names, train_counts)
    known = [(u, t) for u, t in zip(predictions.projections_used, predictions.projections_true) if t in PROJECTIONS]
    metrics["images"] = len(predictions.image_ids)
    metrics["projection_accuracy"] = float(np.mean([u == t for u, t in known])) if known else float("nan")
    metrics["by_projection"] = {}
    for projection in PROJECTIONS:
        rows = [i for i, used in enumerate(predictions.projections_used) if used == projection]
        if rows:
            sub = evaluate_predictions(predictions.labels[rows], predictions.probabilities[rows], predictions.label_names)
            metrics["by_projection"][projection] = {"images": len(rows), "mAP": sub["mAP"], "mAUC": sub["mAUC"]}
    return metrics


def write_outputs(out_dir: Path, predictions: Predictions, metrics: dict[str, Any], meta: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "metrics.json", "per_class": out_dir / "per_class.csv",
             "predictions": out_dir / "predictions.csv"}
    paths["json"].write_text(json.dumps({**meta, **metrics}, indent=2, default=json_default, allow_nan=True) + "\n")
    per_class = pd.DataFrame(
        [[label, row.get("group", ""), row["positives"], row["evaluable"], *(float(row[m]) for m in METRICS)]
         for label, row in metrics["per_class"].items()],
        columns=["class", "group", "positives", "evaluable", *METRICS],
    )
    # The challenge's submission layout: ImageID, the Task 1 classes in contract order, then the
    # ensemble that classified the image.
    submission = pd.DataFrame(np.asarray(predictions.probabilities, dtype=np.float64).reshape(-1, len(predictions.label_names)),
                              columns=list(predictions.label_names))
    submission.insert(0, "ImageID", list(predictions.image_ids))
    submission["Projection"] = list(predictions.projections_used)
    for frame, path in ((per_class, paths["per_class"]), (submission, paths["predictions"])):
        # Floats to 6 decimals and CRLF line ends, as the csv module wrote them before.
        frame.to_csv(path, index=False, float_format="%.6f", na_rep="nan", lineterminator="\r\n")
    return paths


def metrics_table(metrics: dict[str, Any], title: str, per_class: bool = True):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("classes")
    for column in ("mAP", "mAUC", "mF1", "mECE", "n"):
        table.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"  # noqa: E731
    table.add_row("[bold]macro[/]", *(f"[bold]{fmt(metrics[f'm{m}'])}[/]" for m in METRICS), str(metrics["n_evaluable"]))
    for group in GROUPS:
        values = metrics.get("groups", {}).get(group)
        if values:
            evaluable = sum(metrics["per_class"][c]["evaluable"] for c in values["classes"])
            table.add_row(group, *(fmt(values[f"m{m}"]) for m in METRICS), str(evaluable))
    if per_class:
        table.add_section()
        for label, row in metrics["per_class"].items():
            table.add_row(f"{label} ({row.get('group', '')}, {row['positives']}+)", *(fmt(row[m]) for m in METRICS), "")
    return table


def evaluate(data_csv: str | os.PathLike, *, classify: Classify, split: str = "val", val_fraction: float = 0.1,
             split_seed: int = 0, use_hints: bool = False, concurrency: int = 1,
             on_image: Callable[[], None] | None = None) -> tuple[Predictions, dict[str, Any]]:
    """The Task 1 metrics of `classify` on the split's images (and their predictions)."""
    data = load_split(data_csv, val_fraction, split_seed)
    predictions = predict(evaluation_images(data, split), data.image_root, classify, use_hints, concurrency, on_image)
    return predictions, summarize(predictions, data.table.subset(data.train).positives())
