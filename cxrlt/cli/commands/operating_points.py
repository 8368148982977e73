"""Choose each finding's operating point (the threshold that turns its probability into a
decision) and its Platt calibration on validation data, and write them into a repository.

The served pipeline classifies the validation images (the repository in process, its ONNX files
by default, or a running server with --url); per finding a threshold is chosen by --policy on all
images and, for Task 1 findings with at least 5 positives and 5 negatives of a projection, on that
projection's images, with bootstrap 95 % intervals of sensitivity and specificity (patients
resampled). Task 2 (zero-shot) findings get points when the CSV has their columns.
Writes REPO/operating_points.json, the pipeline configs' `operating_points` and `calibrated`
parameters, the monitoring baseline REPO/monitoring_baseline.json (per-finding positive rates at
these points and probability distributions, the projection mix, and with a gate the OOD scores of
the same images: the reference of `cxrlt monitoring-rules`) and a new repository_sha256; reload cxr_classifier, cxr_zeroshot and cxr_findings
(or restart the server) to serve them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cxrlt.cli.options import add_engine_argument, add_hints_argument, add_option, add_repo_argument


def policy_argument(value: str):
    from cxrlt.contract.operating_points import parse_policy

    try:
        return parse_policy(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_argument(parser, "a repository written by `cxrlt build-repo`: the points are written into it", required=True)
    add_option(parser, "--data", "--labels", required=True, type=Path, help="CXR-LT label CSV or PadChest label file (images next to it, or under --images)")
    parser.add_argument("--images", type=Path, metavar="DIR", help="folder the CSV's image paths are relative to "
                                                                   "(default: the CSV's folder)")
    parser.add_argument("--policy", type=policy_argument, default="youden", metavar="POLICY",
                        help="youden (max sensitivity + specificity - 1), f1 (max F1), sensitivity=X (the highest "
                             "threshold reaching sensitivity X) or ppv=X (the lowest threshold reaching PPV X)")
    parser.add_argument("--url", help="gRPC HOST:PORT of a running server serving REPO: classify with it instead of in process")
    add_engine_argument(parser, "onnxruntime", "in process: the repository's ONNX files with onnxruntime (what is "
                                               "served) or its PyTorch networks rebuilt from the checkpoints")
    parser.add_argument("--split", default="val", choices=["val", "all"], help="images to choose on (default: the validation split)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction of the split (default 0.1, as trained)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split (default 0, as trained)")
    add_hints_argument(parser, False, "route by the CSV projection (as a PA/LL hint) instead of the router")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url (default 4)")
    parser.add_argument("--release", type=int, metavar="N", help="the release to choose for (default: the live one; "
                                                                   "with --url, the server must be serving it)")
    parser.add_argument("--dry-run", action="store_true", help="report the points, change nothing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report (points, findings without, mECE) here")


def run(args: argparse.Namespace) -> int:
    import json

    from cxrlt.cli.console import console, counting
    from evaluation.evaluate import csv_labels, server_classifier
    from cxrlt.contract.releases import files_of
    from evaluation.operating_points import operating_points_from_data, write_operating_points

    client = classify = None
    if args.url:
        classify, client = server_classifier(args.url, labels=csv_labels(args.data))
    try:
        with counting() as tick:
            choice = operating_points_from_data(
                args.repo, args.data, args.policy, classify=classify, engine=args.engine, split=args.split,
                val_fraction=args.val_fraction, split_seed=args.split_seed, image_root=args.images,
                use_hints=args.hints, concurrency=max(1, args.concurrency) if args.url else 1, on_image=tick,
                resamples=args.resamples, seed=args.seed, release=args.release,
                source={"classified_by": f"server {args.url}" if args.url else f"in process ({args.engine})"})
    finally:
        if client is not None:
            client.close()
    print_choice(console, choice, args.split)
    _warn_if_random(args.repo, args.release)
    report = choice_report(choice)
    if args.dry_run:
        console.print("dry run: the repository is unchanged")
    else:
        record = write_operating_points(args.repo, choice.points, args.release)
        report["written"] = record
        report["monitoring_baseline"] = baseline = write_monitoring_baseline(args, choice)
        console.print(f"wrote {files_of(args.repo, args.release) / record['file']}, the release's operating points and "
                      f"{baseline['file']} ({baseline['images']} images{', with OOD scores' if baseline['ood'] else ''}); "
                      f"repository_sha256 {baseline['repository_sha256'][:12]}...; reload the pipeline models to serve them")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


def _warn_if_random(repository: Path, release: int | None = None) -> None:
    """Thresholds of random networks are as random as their probabilities: say so, as serve does."""
    from cxrlt.cli.console import warn_random_weights
    from cxrlt.contract.manifest import read_manifest

    if read_manifest(repository, release).get("random_weights"):
        warn_random_weights(f"{repository} holds randomly initialised networks: these operating points, sensitivities "
                            "and specificities describe RANDOM outputs and are NOT DIAGNOSTIC")


def write_monitoring_baseline(args: argparse.Namespace, choice: Any) -> dict[str, Any]:
    """The monitoring baseline of the predictions the points were chosen on, written into the repository."""
    from evaluation.baseline import compute_baseline, repository_ood_baseline, write_baseline

    predictions = choice.predictions
    ood = repository_ood_baseline(args.repo, args.data, args.split, args.release)
    baseline = compute_baseline(predictions.probabilities, predictions.label_names, predictions.projections_used,
                                choice.points, ood, source={**choice.points.source, "labels": list(predictions.label_names)})
    return write_baseline(args.repo, baseline, args.release)


def print_choice(console: Any, choice: Any, split: str) -> None:
    """The points as a table, the findings without one, and mECE before and after calibration."""
    from rich.table import Table

    from cxrlt.contract.labels import ALL_LABELS, TASK2_LABELS

    points = choice.points
    table = Table(title=f"operating points ({points.policy}) on {choice.images} {split} images, "
                        f"95 % intervals from {points.source['bootstrap']['resamples']} resamples of "
                        f"{choice.units} {choice.grouped_by}s")
    for column in ("finding", "projection", "threshold", "sensitivity [95 % CI]", "specificity [95 % CI]", "n+/n-", "calibrated"):
        table.add_column(column, justify="left" if column in ("finding", "projection") else "right")
    for label in (label for label in ALL_LABELS if label in points.points):
        for projection, point in points.points[label].items():
            table.add_row(label, projection, f"{point.threshold:.4f}",
                          f"{point.sensitivity:.3f} [{point.sensitivity_ci[0]:.3f}, {point.sensitivity_ci[1]:.3f}]",
                          f"{point.specificity:.3f} [{point.specificity_ci[0]:.3f}, {point.specificity_ci[1]:.3f}]",
                          f"{point.positives}/{point.negatives}", "yes" if label in points.calibration else "")
    console.print(table)
    for label, why in choice.missing.items():
        console.print(f"no operating point for {label}: {why}")
    absent = [label for label in TASK2_LABELS if label not in points.source.get("labels", ())]
    if absent:
        console.print(f"no operating points for the zero-shot findings {', '.join(absent)}: the CSV has no column for them")
    before, after = choice.mECE
    console.print(f"mECE over {len(choice.ece)} evaluable findings: {before:.4f} uncalibrated, {after:.4f} calibrated "
                  f"({len(points.calibration)} findings calibrated)")


def choice_report(choice: Any) -> dict[str, Any]:
    before, after = choice.mECE
    return {"operating_points": choice.points.to_dict(), "missing": choice.missing,
            "ece": {label: {"uncalibrated": b, "calibrated": a} for label, (b, a) in choice.ece.items()},
            "mECE": {"uncalibrated": before, "calibrated": after}}
