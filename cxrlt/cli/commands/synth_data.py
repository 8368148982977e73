"""Write a synthetic, CXR-like, long-tailed data set (16-bit PNGs and a CXR-LT labels.csv) for
smoke training runs and tests: one finding pattern per class (its own shape and sign in a
mirror pair of cells, drawn in either lung), PadChest prevalences, frontal and lateral
projections, several images per patient."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the images and labels.csv into")
    parser.add_argument("--n", required=True, type=int, help="number of images (e.g. 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0; the data set is deterministic for it)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image height in pixels (default 256; 64 is plenty for the tiny profile)")


def run(args: argparse.Namespace) -> int:
    import time

    from cxrlt.cli.console import console
    from training.data import read_cxrlt_csv
    from training.synth import write_synthetic_dataset

    started = time.perf_counter()
    with console.status(f"writing {args.n} synthetic images"):
        csv_path = write_synthetic_dataset(args.out, args.n, seed=args.seed, image_size=args.image_size)
    table = read_cxrlt_csv(csv_path)
    lateral = sum(p == "lateral" for p in table.projections)
    console.print(f"wrote {len(table)} images ({len(table) - lateral} frontal, {lateral} lateral) of "
                  f"{len(set(table.patient_ids))} patients in {time.perf_counter() - started:.1f}s")
    print(csv_path)
    console.print(f"train on it with: cxrlt train --config all --data {csv_path} --out runs/checkpoints")
    return 0
