"""Synthetic CXR-like radiographs: the drawing behind the synthetic data set.

Frontal images are square with two dark lung fields either side of a bright mediastinum;
lateral ones are narrower (aspect 0.78) with one lung field and the spine at the back.
Each of the 36 classes of `cxrlt.contract.labels.ALL_LABELS` has a cell pair of a 6 x 6 grid
and a dark or bright shape (see `training.synth` for the data set built from them).
Numpy only, so the exporters' parity checks and the load tests can draw images without
the training stack.
"""

from __future__ import annotations

import numpy as np

from cxrlt.contract.labels import ALL_LABELS, NORMAL_INDEX

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


def synthetic_radiographs() -> dict[str, np.ndarray]:
    """A synthetic frontal and lateral radiograph (uint16) with cardiomegaly and an effusion drawn.

    Fixed examples for parity checks, tests and load tests.
    """
    findings = np.zeros(len(ALL_LABELS), dtype=np.float32)
    findings[[ALL_LABELS.index("cardiomegaly"), ALL_LABELS.index("pleural effusion")]] = 1
    return {p: render_image(findings, p, np.random.default_rng(seed)) for seed, p in enumerate(("frontal", "lateral"))}
