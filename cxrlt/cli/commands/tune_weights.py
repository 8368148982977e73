"""Search the ensemble's per-projection logit weights (pcam, cait, swin) on validation data and
write them into the repository's cxr_classifier/config.pbtxt (weights_frontal, weights_lateral).

Member logits are collected once per image through the served pipeline code (the repository's
ONNX files by default, or the PyTorch networks); the weights run over a simplex grid whose
corners are the single members; the objective is the mAP of the gated probabilities over all
validation images. The result is never below the best single member nor the current weights.
Reload cxr_classifier (or restart the server) to serve the new weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_engine_argument, add_hints_argument, add_repo_argument
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_argument(parser, "a repository written by `cxrlt build-repo`", required=True)
    parser.add_argument("--data", required=True, type=Path, help="CXR-LT label CSV (images next to it)")
    parser.add_argument("--grid", type=float, default=0.1, help="simplex grid step (default 0.1: 66 weight triples per projection)")
    add_engine_argument(parser, "onnxruntime", "networks: the repository's ONNX files with onnxruntime (what is "
                                               "served) or PyTorch from its checkpoints")
    parser.add_argument("--split", default="val", choices=["val", "all"], help="images to tune on (default: the validation split)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    add_hints_argument(parser, False, "route by the CSV projection (as a PA/LL hint) instead of the router")
    parser.add_argument("--dry-run", action="store_true", help="report the search, change nothing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the search report here (default REPO/weight_search.json)")


def run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from cxrlt.cli.console import console, counting
    from cxrlt.contract.ensemble import MEMBERS, format_weights
    from cxrlt.contract.labels import PROJECTIONS
    from evaluation.tune import collect_member_logits, search_weights, write_weights

    with counting("member logits of", "images") as tick:
        data = collect_member_logits(args.repo, args.data, engine=args.engine, split=args.split,
                                     val_fraction=args.val_fraction, split_seed=args.split_seed,
                                     use_hints=args.hints, on_image=tick)
    with console.status("searching weights"):
        result = search_weights(data, grid=args.grid)
    report = result.to_dict()
    report.update({"repo": str(args.repo), "data": str(args.data), "engine": args.engine, "split": args.split})

    table = Table(title=f"ensemble weights on {result.images} {args.split} images ({result.method}, grid {result.grid:g}, "
                        f"{result.evaluated} evaluations)")
    for column in ("projection", "before", "after", "images", "mAP before", "mAP after",
                   *(f"{m} alone" for m in MEMBERS)):
        table.add_column(column)
    for projection in PROJECTIONS:
        stats = result.per_projection.get(projection)
        if stats is None:
            continue
        table.add_row(projection, format_weights(result.before[projection]), format_weights(result.weights[projection]),
                      str(stats["images"]), f"{stats['mAP_before']:.4f}", f"{stats['mAP_after']:.4f}",
                      *(f"{stats['single_member_mAP'][m]:.4f}" for m in MEMBERS))
    console.print(table)
    console.print(f"validation mAP: before {result.mAP_before:.4f}, after {result.mAP_after:.4f}; best single member "
                  f"{result.best_single_member} {result.best_single_member_mAP:.4f} "
                  f"({', '.join(f'{m} {v:.4f}' for m, v in result.single_member_mAP.items())})")
    json_path = args.json or args.repo / "weight_search.json"
    if args.dry_run:
        console.print("dry run: the repository is unchanged")
    elif not result.changed:
        console.print("the current weights are already the best on the grid: the repository is unchanged")
    else:
        written = write_weights(args.repo, result.weights, report)
        console.print(f"wrote {', '.join(f'{k}={v}' for k, v in written.items())} into "
                      f"{args.repo / CLASSIFIER_MODEL / 'config.pbtxt'} and {FINDINGS_MODEL}'s; reload both to serve them")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0
