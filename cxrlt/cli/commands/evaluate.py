"""Evaluate the served Task 1 pipeline on labelled images: mAP (primary), mAUC, mF1 at 0.5 and
mECE (15 bins), per class, macro and by head/medium/tail training frequency, with the
repository's TTA, ensemble weights and normal gating.

Sources: a running server (--url, through the gRPC client), a built repository in process
(--repo: the same pipeline code with the PyTorch networks rebuilt from its checkpoints, or
--engine onnxruntime on its ONNX files), or a checkpoint folder (--checkpoints: a repository
is built from it in a temporary folder first). By default only the patient-level validation
split that `cxrlt train` held out is evaluated (--split all for every image).
When the repository (--repo, also with --url) has operating points (`cxrlt operating-points`),
the sensitivity and specificity of the decisions at them and the mECE after its calibration are
reported too (metrics.json: operating_points).
Writes OUT/metrics.json, OUT/per_class.csv and OUT/predictions.csv (challenge layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_engine_argument, add_hints_argument, add_repo_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="CXR-LT label CSV or PadChest label file (images next to it)")
    source = parser.add_argument_group("source (one of)")
    source.add_argument("--url", help="gRPC HOST:PORT of a running server (its cxr_classifier is evaluated)")
    add_repo_argument(source, "a built repository: evaluated in process unless --url is given")
    source.add_argument("--checkpoints", type=Path, help="a checkpoint folder: build a temporary repository and evaluate it in process")
    parser.add_argument("--profile", default="tiny", choices=["tiny", "paper"], help="profile of --checkpoints (default tiny)")
    parser.add_argument("--allow-random", action="store_true", help="--checkpoints: random weights for missing networks")
    add_engine_argument(parser, "torch", "in process: the repository's ONNX files with onnxruntime, or its PyTorch "
                                         "networks rebuilt from the checkpoints")
    parser.add_argument("--split", default="val", choices=["val", "all"], help="val: the patient-level validation split (default)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction of the split (default 0.1, as trained)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split (default 0, as trained)")
    add_hints_argument(parser, False, "send each image's CSV projection as a DICOM hint (PA/LL); "
                                      "--no-hints: the router decides")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url (default 4)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default runs/eval-<time>)")
    parser.add_argument("--no-per-class", action="store_true", help="print only the macro and group rows")


def run(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from cxrlt.cli.console import console, counting
    from evaluation.evaluate import evaluate, metrics_table, reference_classifier, server_classifier, write_outputs
    from evaluation.operating_points import repository_decision_metrics

    if not (args.url or args.repo or args.checkpoints):
        raise ValueError("give a source: --url HOST:PORT, --repo DIR or --checkpoints DIR")
    if args.checkpoints and (args.url or args.repo):
        raise ValueError("--checkpoints builds its own repository; do not combine it with --url or --repo")
    out = args.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    client = None
    with tempfile.TemporaryDirectory(prefix="cxrlt-eval-") as scratch:
        if args.url:
            classify, client = server_classifier(args.url)
            source = {"source": "server", "url": args.url, "repo": str(args.repo) if args.repo else None}
            concurrency = max(1, args.concurrency)
        else:
            repo = args.repo
            if args.checkpoints:
                from exporters.build_repo import BuildOptions, build_repository

                repo = Path(scratch) / "repo"
                # fp32: the evaluation runs in process (onnxruntime FP32 or PyTorch), never a served
                # setting, so auto's choice would only add its parity gate to the build
                with console.status(f"building a {args.profile} repository from {args.checkpoints}"):
                    build_repository(repo, BuildOptions(profile=args.profile, checkpoints=args.checkpoints,
                                                        allow_random=args.allow_random, precision="fp32"))
            classify = reference_classifier(repo, args.engine)
            source = {"source": "in process", "engine": args.engine, "repo": str(args.repo) if args.repo else None,
                      "checkpoints": str(args.checkpoints) if args.checkpoints else None}
            concurrency = 1
        started = time.perf_counter()
        try:
            with counting() as tick:
                predictions, metrics = evaluate(args.data, classify=classify, split=args.split, val_fraction=args.val_fraction,
                                                split_seed=args.split_seed, use_hints=args.hints, concurrency=concurrency,
                                                on_image=tick)
        finally:
            if client is not None:
                client.close()
    meta = {**source, "data": str(args.data), "split": args.split, "hints": args.hints,
            "seconds": time.perf_counter() - started}
    decisions = repository_decision_metrics(args.repo, predictions) if args.repo else None
    if decisions is not None:
        metrics["operating_points"] = decisions
    paths = write_outputs(out, predictions, metrics, meta)
    title = (f"{metrics['images']} {args.split} images, {metrics['n_evaluable']} evaluable classes "
             f"({source['source']}{', ' + args.url if args.url else ''})")
    console.print(metrics_table(metrics, title, per_class=not args.no_per_class))
    console.print(f"mAP {metrics['mAP']:.4f}  mAUC {metrics['mAUC']:.4f}  mF1 {metrics['mF1']:.4f}  "
                  f"mECE {metrics['mECE']:.4f}  projection accuracy {metrics['projection_accuracy']:.3f}")
    if decisions is not None:
        print_decisions(console, decisions)
    console.print(f"written: {paths['json']}  {paths['per_class']}  {paths['predictions']}")
    return 0


def print_decisions(console, decisions: dict) -> None:
    """mECE before and after the repository's calibration, and what its operating points decide."""
    line = (f"operating points ({decisions['policy']}) on {len(decisions['per_class'])} findings: mean sensitivity "
            f"{decisions['mean_sensitivity']:.3f}, mean specificity {decisions['mean_specificity']:.3f}")
    if decisions["calibrated"]:
        line += (f"; mECE {decisions['mECE_uncalibrated']:.4f} uncalibrated, "
                 f"{decisions['mECE_calibrated']:.4f} calibrated")
    console.print(line)
    if decisions["stale"]:
        console.print("[yellow]the operating points were chosen for other weights or settings than the repository now "
                      "has: rerun `cxrlt operating-points`[/]")
