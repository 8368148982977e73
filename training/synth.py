"""A synthetic, CXR-like, long-tailed data set for tests and smoke training runs.

What it is for: exercising the whole training -> export -> serving path without real
radiographs, with signals a small CNN can learn at 64 px:

* projection: frontal images are square with two dark lung fields either side of a bright
  mediastinum; lateral images are narrower (aspect 0.78, so `prepare_square` pads them with
  black bars) with one lung field and the spine at the back;
* classes: the 6 x 6 grid over the chest is read as 18 mirror pairs of cells (same row,
  columns c and 5 - c), and each pair is shared by two of the 36 classes of
  `cxrlt.contract.labels.ALL_LABELS`: one draws a dark shape, the other the same shape bright (blob,
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

from cxrlt.contract.labels import ALL_LABELS, NORMAL_INDEX
from cxrlt.io.synthetic import render_image

# PadChest's released label file holds 160,868 images; the counts CSV gives positives per
# class, so count / this = prevalence.
PADCHEST_IMAGES = 160_868
CSV_NAME = "labels.csv"


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
    from training.data import load_padchest_counts  # the one reader of the counts CSV

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
