"""A cache of pre-resized images (`cxrlt prepare-data`), read by training when it is present.

A radiograph of a few thousand pixels a side is decoded and resized on every epoch otherwise;
at 512 px that is most of the data loader's time. The cache holds each image once, resized the
way a client resizes before sending (cxrlt.contract.preprocessing.downscale_for_sending: the
serving resize, rounded back to the image's integers), as UINT16 `.npy`, under

    ROOT/<S>/<image path as in the CSV>.npy      ROOT/<S>/manifest.json (written when complete)

Training's preprocessing (prepare_square: resize to S, percentile clip or max scaling, pad)
then sees an image whose long side is already S, so its resize is the identity: an image that
was already small is stored unchanged (identical tensors), a larger one differs from the
on-the-fly path only by the rounding to integers (at most half a grey level before the clip).
An image whose max scaling (CLIP's) would change with the rounding is not cached and is read
from its source. A cached file older than its source is ignored and rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cxrlt.contract.preprocessing import downscale_for_sending, source_maximum
from cxrlt.io.atomic import atomic_path
from cxrlt.io.images import load_pixels

DEFAULT_DIRNAME = "resized"  # ROOT's default: next to the label CSV
MANIFEST = "manifest.json"


def size_dir(root: str | os.PathLike, size: int) -> Path:
    return Path(root) / str(int(size))


def entry_path(root: str | os.PathLike, size: int, image: str) -> Path:
    """Where the cached image of `image` (its path relative to the image folder) lives."""
    return size_dir(root, size) / f"{image}.npy"


def is_fresh(cached: Path, source: Path) -> bool:
    try:
        return cached.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def resized(image: np.ndarray, size: int) -> np.ndarray | None:
    """What the cache stores for `image` at size S (UINT16), or None when it cannot stand in for it."""
    small = downscale_for_sending(image, size).astype(np.uint16, copy=False)
    if small is not image and source_maximum(small) != source_maximum(image):
        return None  # max scaling would divide by another full scale
    return small


def write_entry(source: Path, target: Path, size: int) -> bool:
    """Resize one image into the cache (atomically); False when it is not cacheable."""
    image = resized(load_pixels(source), size)
    if image is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary, open(temporary, "wb") as handle:
        np.save(handle, image, allow_pickle=False)
    return True


def pending(image_root: Path, root: Path, size: int, images: Iterable[str]) -> list[str]:
    """The images without an up-to-date cached file (what a resumed run still has to write)."""
    return [image for image in images if not is_fresh(entry_path(root, size, image), image_root / image)]


def write_manifest(root: Path, size: int, images: int, uncached: list[str], data_csv: Path) -> Path:
    path = size_dir(root, size) / MANIFEST
    with atomic_path(path) as temporary:
        Path(temporary).write_text(json.dumps({
            "size": int(size), "images": int(images), "uncached": uncached, "data": str(data_csv),
            "resize": "cxrlt.contract.preprocessing.downscale_for_sending", "dtype": "uint16",
        }, indent=2) + "\n")
    return path


def default_root(data_csv: str | os.PathLike) -> Path:
    return Path(data_csv).parent / DEFAULT_DIRNAME


def find(root: str | os.PathLike | None, size: int) -> Path | None:
    """ROOT/<S> when it exists (a cache of that size is present), else None."""
    if root is None:
        return None
    folder = size_dir(root, size)
    return folder if folder.is_dir() else None


class ResizedLoader:
    """load_pixels through the cache: the cached image when present and fresh, else the source.

    Picklable (DataLoader workers)."""

    def __init__(self, folder: Path, image_root: Path, fallback: Callable[[Path], np.ndarray] = load_pixels) -> None:
        self.folder, self.image_root, self.fallback = Path(folder), Path(image_root), fallback

    def __call__(self, path: Path) -> np.ndarray:
        path = Path(path)
        try:
            relative = path.relative_to(self.image_root)
        except ValueError:
            return self.fallback(path)
        cached = self.folder / f"{relative}.npy"
        if is_fresh(cached, path):
            return np.load(cached, allow_pickle=False)
        return self.fallback(path)
