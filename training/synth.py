"""A synthetic, CXR-like, long-tailed data set for tests and smoke training runs.

What it is for: exercising the whole training -> export -> serving path without real
radiographs, with signals a small CNN can learn at 64 px:

* projection: frontal images are square with two dark lung fields either side of a bright
  mediastinum; lateral images are narrower (aspect 0.78, so `fit_square` pads them with
  black bars) with one lung field and the spine at the back;
* classes: the 6 x 6 grid over the chest is read as 18 mirror pairs of cells (same row,
  columns c and 5 - c), and each pair is shared by two of the 36 classes of
  `cxrlt.labels.ALL_LABELS`: one draws a dark shape, the other the same shape bright (blob,
  ring or square, by pair). An image draws a present class in one cell of its pair, left or
  right at random (two present classes of a pair take one side each, so nothing overlaps),
  the way a finding has its place in the chest but may sit in either lung. Presence is
  visible after downsampling to 64 px, and every label survives a horizontal flip (the grid
  is centred and every shape is mirror-symmetric), so the paper's flip augmentation and
  flip TTA stay truthful;
* labels: PadChest prevalences from `padchest_cxrlt2026_counts.csv` (a counts column
  divided by the number of PadChest images), so the tail is real. 'Normal' excludes every
  other class, every non-normal image has at least one finding, and every class gets at
  least `min_positives` images (Infarction has count 0 in PadChest) so per-class metrics
  such as mAP are defined.

Output: 16-bit PNGs (Pillow mode 'I;16') and a CXR-LT CSV `labels.csv` next to them:
`ImageID, PatientID, Projection` then one 0/1 column per class in contract order. The
image root for `training.data` is the CSV's folder.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxrlt.labels import ALL_LABELS, NORMAL_INDEX

# PadChest's released label file holds 160,868 images; the counts CSV gives positives per
# class, so count / this = prevalence.
PADCHEST_IMAGES = 160_868
CSV_NAME = "labels.csv"
LATERAL_ASPECT = 0.78  # width / height of lateral images (frontal ones are square)
GRID = 6  # 6 x 6 cells = 18 mirror pairs, two classes each
SHAPES = ("blob", "ring", "square")


def class_pattern(index: int) -> tuple[str, int, tuple[int, int]]:
    """(pattern kind, grid row, the mirror pair of columns) of class `index`.

    The kind is 'bright_<shape>' or 'dark_<shape>'; the three pairs of a row have three
    different shapes, and the shape order shifts per row.
    """
    pair, slot = divmod(index, 2)
    row, column = divmod(pair, GRID // 2)
    shape = SHAPES[(column + row) % len(SHAPES)]
    # Dark first: the pair that holds 'Normal' (index 0, drawn nowhere) sits in the top
    # corners, outside the body, where only a bright shape shows.
    return f"{('dark', 'bright')[slot]}_{shape}", row, (column, GRID - 1 - column)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    # Soft-edged ellipse mask in [0, 1]; soft edges avoid aliasing when downsampled.
    r = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / 0.04, -50, 50)))


def _anatomy(projection: str, height: int, width: int) -> np.ndarray:
    """The noiseless body of one projection, float32 [H, W] in [0, 1]."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (u + 0.5) / width, (v + 0.5) / height
    image = np.full((height, width), 0.05, dtype=np.float32)
    if projection == "frontal":
        image += 0.50 * _ellipse(u, v, 0.50, 0.55, 0.46, 0.52)  # thorax
        for centre in (0.29, 0.71):  # lung fields
            image -= 0.30 * _ellipse(u, v, centre, 0.45, 0.17, 0.31)
        image += 0.20 * _ellipse(u, v, 0.50, 0.50, 0.05, 0.50)  # mediastinum / spine
    else:
        image += 0.50 * _ellipse(u, v, 0.50, 0.52, 0.44, 0.50)  # thorax seen side-on
        image -= 0.25 * _ellipse(u, v, 0.47, 0.45, 0.28, 0.30)  # one superimposed lung field
        image += 0.25 * _ellipse(u, v, 0.82, 0.55, 0.06, 0.45)  # spine, posterior
        image += 0.15 * _ellipse(u, v, 0.14, 0.45, 0.02, 0.25)  # sternum, anterior
    return np.clip(image, 0.0, 1.0)


def _draw_pattern(image: np.ndarray, index: int, col: int, rng: np.random.Generator) -> None:
    """Add class `index`'s pattern into column `col` of its grid row (in place)."""
    height, width = image.shape
    kind, row, _ = class_pattern(index)
    # The grid covers the chest, [0.1, 0.9] of each side.
    cell_h, cell_w = 0.8 * height / GRID, 0.8 * width / GRID
    cy = 0.1 * height + (row + 0.5) * cell_h + rng.uniform(-0.05, 0.05) * cell_h
    cx = 0.1 * width + (col + 0.5) * cell_w + rng.uniform(-0.05, 0.05) * cell_w
    top, bottom = max(0, int(cy - cell_h / 2)), min(height, int(np.ceil(cy + cell_h / 2)))
    left, right = max(0, int(cx - cell_w / 2)), min(width, int(np.ceil(cx + cell_w / 2)))
    y, x = np.mgrid[top:bottom, left:right].astype(np.float32)
    dy, dx = (y + 0.5 - cy) / cell_h, (x + 0.5 - cx) / cell_w  # cell units, centre 0
    r = np.sqrt(dx**2 + dy**2)
    sign, shape = kind.split("_")
    if shape == "blob":
        pattern = np.exp(-(r**2) / (2 * 0.2**2))
    elif shape == "ring":
        pattern = np.exp(-((r - 0.32) ** 2) / (2 * 0.06**2))
    else:  # square
        pattern = ((np.abs(dx) < 0.3) & (np.abs(dy) < 0.3)).astype(np.float32)
    amplitude = 0.25 * rng.uniform(0.8, 1.2) * (1.0 if sign == "bright" else -1.0)
    image[top:bottom, left:right] += amplitude * pattern


def render_image(labels: np.ndarray, projection: str, rng: np.random.Generator,
                 image_size: int = 256, _anatomy_cache: dict | None = None) -> np.ndarray:
    """One synthetic radiograph as uint16 [H, W]: height `image_size`, width `image_size`
    (frontal) or `LATERAL_ASPECT * image_size` (lateral)."""
    height = image_size
    width = image_size if projection == "frontal" else max(8, round(LATERAL_ASPECT * image_size))
    key = (projection, height, width)
    cache = _anatomy_cache if _anatomy_cache is not None else {}
    if key not in cache:
        cache[key] = _anatomy(projection, height, width)
    # Per-image exposure and noise so no two images are identical. Both are drawn before
    # the patterns, so one seed gives the same background whatever the labels.
    # The body is mapped into [0.3, 0.7] so a bright shape on the spine and a dark one on a
    # lung field or beside the body stay as visible as anywhere else (no clipping).
    image = 0.3 + 0.4 * cache[key] * rng.uniform(0.85, 1.15) + rng.uniform(-0.03, 0.03)
    image += 0.02 * rng.standard_normal((height, width), dtype=np.float32)
    findings = [int(i) for i in np.flatnonzero(labels) if i != NORMAL_INDEX]
    for row, columns in sorted({class_pattern(index)[1:] for index in findings}):
        sides = rng.permutation(2)  # left or right; the pair's two classes never share a cell
        in_pair = (i for i in findings if class_pattern(i)[1:] == (row, columns))
        for index, side in zip(in_pair, sides):
            _draw_pattern(image, index, columns[side], rng)
    return np.round(np.clip(image, 0.0, 1.0) * 60000).astype(np.uint16)


def synthetic_labels(n: int, rng: np.random.Generator, prevalence: np.ndarray,
                     min_positives: int = 4) -> np.ndarray:
    """[n, 36] 0/1 labels with exactly max(min_positives, round(prevalence * n)) images per
    class (bounded by what fits), Normal exclusive, each non-normal image with a finding."""
    labels = np.zeros((n, len(ALL_LABELS)), dtype=np.uint8)
    targets = np.maximum(min_positives, np.round(prevalence * n)).astype(int)
    order = rng.permutation(n)
    n_normal = min(targets[NORMAL_INDEX], max(0, n - 1))
    labels[order[:n_normal], NORMAL_INDEX] = 1
    abnormal = order[n_normal:]
    for index in range(len(ALL_LABELS)):
        if index == NORMAL_INDEX or len(abnormal) == 0:
            continue
        chosen = rng.choice(abnormal, size=min(targets[index], len(abnormal)), replace=False)
        labels[chosen, index] = 1
    # A non-normal image without any finding would look exactly like a normal one.
    others = np.delete(np.arange(len(ALL_LABELS)), NORMAL_INDEX)
    weights = prevalence[others] / prevalence[others].sum() if prevalence[others].sum() > 0 else None
    for image in abnormal[labels[abnormal].sum(axis=1) == 0]:
        labels[image, rng.choice(others, p=weights)] = 1
    return labels


def _prevalence(counts_csv: str | os.PathLike | None, count_column: str, total_images: int) -> tuple[np.ndarray, float]:
    from .data import load_padchest_counts  # the one reader of the counts CSV

    table = load_padchest_counts(counts_csv)
    counts = np.array([table[label].counts[count_column] for label in ALL_LABELS], dtype=np.float64)
    prefix = count_column.split("_")[0]
    lateral = sum(c.counts[f"{prefix}_lateral"] for c in table.values())
    everything = sum(c.counts[f"{prefix}_all"] for c in table.values())
    return counts / total_images, (lateral / everything if everything else 0.3)


def write_synthetic_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, image_size: int = 256,
                            counts_csv: str | os.PathLike | None = None, count_column: str = "core_all",
                            total_images: int = PADCHEST_IMAGES, min_positives: int = 4,
                            max_images_per_patient: int = 4) -> Path:
    """Write `n` synthetic images and `labels.csv` into `out_dir`; return the CSV path.

    Deterministic for a seed. counts_csv: the PadChest counts file (default: the packaged
    copy, see training.data.find_counts_csv); count_column: `core_all` or `ext_all`.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 (one normal and one abnormal image), not {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 so the class patterns stay visible, not {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prevalence, lateral_fraction = _prevalence(counts_csv, count_column, total_images)
    labels = synthetic_labels(n, rng, prevalence, min_positives)

    # Exactly round(fraction * n) lateral images (at least one), at random positions.
    n_lateral = min(n - 1, max(1, round(lateral_fraction * n)))
    projections = np.array(["frontal"] * n, dtype=object)
    projections[rng.permutation(n)[:n_lateral]] = "lateral"

    # Patients own 1..max_images_per_patient consecutive images (labels are already random).
    patient_ids: list[str] = []
    while len(patient_ids) < n:
        patient_ids += [f"P{len(set(patient_ids)):05d}"] * int(rng.integers(1, max_images_per_patient + 1))
    patient_ids = patient_ids[:n]

    width = len(str(n - 1))
    cache: dict = {}
    csv_path = out / CSV_NAME
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "PatientID", "Projection", *ALL_LABELS])
        for i in range(n):
            image_id = f"synth_{i:0{width}d}.png"
            pixels = render_image(labels[i], projections[i], rng, image_size, cache)
            Image.fromarray(pixels).save(out / image_id, compress_level=1)  # uint16 -> mode 'I;16'
            writer.writerow([image_id, patient_ids[i], projections[i], *(int(v) for v in labels[i])])
    return csv_path


def main_synth(out: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """`cxrlt synth-data`: write the data set and return the CSV path."""
    return write_synthetic_dataset(out, n, seed=seed)


def synthetic_radiographs() -> dict[str, np.ndarray]:
    """A synthetic frontal and lateral radiograph (uint16) with cardiomegaly and an effusion drawn.

    Fixed examples for parity checks, tests and load tests.
    """
    findings = np.zeros(len(ALL_LABELS), dtype=np.float32)
    findings[[ALL_LABELS.index("cardiomegaly"), ALL_LABELS.index("pleural effusion")]] = 1
    return {p: render_image(findings, p, np.random.default_rng(seed)) for seed, p in enumerate(("frontal", "lateral"))}
