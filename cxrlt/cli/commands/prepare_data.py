"""Resize every image of a label CSV once into a cache that training reads instead of the
sources (training/image_cache.py): UINT16 `.npy` files under OUT/<S>/, resized with the client's
loader and resize (what serving receives), on a process pool, with a progress bar. A second run
writes only what is missing or older than its source, so an interrupted run resumes. Training
uses the cache by default when it sits at `resized/` next to the CSV (the default --out), or
with `cxrlt train --cache OUT`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, metavar="CSV", help="CXR-LT label CSV or PadChest label file (images are found next to it)")
    parser.add_argument("--images", type=Path, metavar="DIR", help="image folder (default: the CSV's folder)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="cache folder (default: resized/ next to the CSV, where `cxrlt train` looks)")
    parser.add_argument("--size", required=True, type=int, nargs="+", metavar="S",
                        help="long side(s) in pixels: the recipes' image size (e.g. 512 for the paper's networks, 224 for CLIP)")
    parser.add_argument("--workers", type=int, metavar="N", help="processes (default: one per CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _write(job: tuple[str, str, int]) -> tuple[str, bool]:
    from training.image_cache import write_entry

    source, target, size = job
    return source, write_entry(Path(source), Path(target), size)


def _workers(args: argparse.Namespace) -> int:
    return max(1, args.workers or os.cpu_count() or 1)


def cache_size(args: argparse.Namespace, images: list[str], image_root: Path, out: Path, size: int) -> tuple[int, list[str]]:
    """Write one size's cache; (images written now, images that could not be cached)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from training.image_cache import entry_path, pending

    todo = pending(image_root, out, size, images)
    jobs = [(str(image_root / image), str(entry_path(out, size, image)), size) for image in todo]
    uncached: list[str] = []
    bar = tqdm(total=len(jobs), desc=f"resizing to {size} px", unit="img", disable=True if args.no_progress else None)
    with ProcessPoolExecutor(max_workers=_workers(args)) as pool:
        for source, written in pool.map(_write, jobs, chunksize=max(1, min(64, len(jobs) // (8 * _workers(args)) or 1))):
            bar.update(1)
            if not written:
                uncached.append(str(Path(source).relative_to(image_root)))
    bar.close()
    return len(jobs), uncached


def run(args: argparse.Namespace) -> int:
    import time

    from cxrlt.cli.console import console
    from training.data import read_labels
    from training.image_cache import default_root, write_manifest

    if not args.data.is_file():
        console.print(f"[red]{args.data} does not exist[/]; make one with `cxrlt synth-data --out DIR --n 600`")
        return 2
    if min(args.size) < 24:
        console.print("[red]--size must be at least 24 pixels[/]")
        return 2
    table = read_labels(args.data)
    images = list(dict.fromkeys(table.image_paths))
    image_root = args.images or args.data.parent
    out = args.out or default_root(args.data)
    for size in args.size:
        started = time.perf_counter()
        written, uncached = cache_size(args, images, image_root, out, size)
        manifest = write_manifest(out, size, len(images), uncached, args.data)
        console.print(f"{size} px: {written} written, {len(images) - written} already cached, {len(uncached)} read from "
                      f"their sources (not cacheable) in {time.perf_counter() - started:.1f}s; {manifest}")
    console.print(f"train on it with: cxrlt train --data {args.data} --config ..."
                  + ("" if args.out is None else f" --cache {out}"))
    return 0
