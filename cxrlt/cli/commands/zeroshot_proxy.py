"""Leak-free proxy validation of zero-shot fine-tuning: hold out groups of seen Task 1 findings
as pseudo-unseen (three groups of three, chosen deterministically from the data unless
--groups is given), train the dual-branch CLIP recipe on the rest (reports never mention a
held-out finding, the ASL head does not have them), and report the zero-shot mAP of each
held-out group on the patient-level validation split, with prompt-ensembled text
embeddings of prompts synthesised from the class names."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="CXR-LT label CSV (images next to it)")
    parser.add_argument("--config", default="clip_dual_branch", help="the clip recipe (default clip_dual_branch)")
    parser.add_argument("--groups", help="held-out groups, e.g. 'cardiomegaly,Nodule,fracture;Mass,Hernia,Kyphosis;...'")
    parser.add_argument("--epochs", type=int, help="epochs per group (overrides the recipe)")
    parser.add_argument("--out", type=Path, default=Path("runs/zeroshot_proxy"), metavar="DIR", help="output folder (default runs/zeroshot_proxy)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from cxrlt.cli.console import console
    from training.recipes import load_recipe
    from training.zeroshot_proxy import parse_groups, run_proxy

    recipe = load_recipe(args.config, assignments=args.assignments)
    groups = parse_groups(args.groups) if args.groups else None
    report = run_proxy(recipe, args.data, args.out, groups=groups, epochs=args.epochs, device=args.device,
                       progress=False if args.no_progress else None, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    table = Table(title=f"zero-shot proxy: {report['val_images']} validation images, {report['clip_model']}")
    for column in ("group", "held-out classes (val positives)", "zero-shot mAP", "mAUC", "chance mAP", "seen head mAP", "time"):
        table.add_column(column)
    for group in report["groups"]:
        classes = "\n".join(f"{c} ({group['val_positives'][c]})" for c in group["classes"])
        table.add_row(str(group["group"]), classes, f"{group['zeroshot_mAP']:.4f}", f"{group['zeroshot_mAUC']:.4f}",
                      f"{group['chance_mAP']:.4f}", f"{group['seen_head_mAP']:.4f}", f"{group['seconds']:.0f}s")
    console.print(table)
    console.print(f"mean zero-shot mAP {report['mean_zeroshot_mAP']:.4f} (chance {report['mean_chance_mAP']:.4f}); "
                  f"report: {args.out / 'zeroshot_proxy.json'}")
    return 0
