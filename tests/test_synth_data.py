"""The synthetic data set: deterministic, exact CSV format, long-tailed, 16-bit, projections differ."""

import csv

import numpy as np
import pytest
from PIL import Image

from cxrlt.contract.labels import ALL_LABELS, NORMAL_INDEX
from cxrlt.io.synthetic import GRID, class_pattern, render_image
from training.synth import _prevalence, synthetic_labels, write_synthetic_dataset

N = 48


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(out, N, seed=7, image_size=64)


def read_rows(csv_path):
    with open(csv_path, newline="") as handle:
        return list(csv.reader(handle))


def test_csv_format_exact(synth_dir):
    rows = read_rows(synth_dir)
    assert rows[0] == ["ImageID", "PatientID", "Projection", *ALL_LABELS]
    assert len(rows) == N + 1
    assert len(ALL_LABELS) == 36
    for row in rows[1:]:
        assert (synth_dir.parent / row[0]).is_file()
        assert row[2] in ("frontal", "lateral")
        assert all(v in ("0", "1") for v in row[3:])
    patients = {row[1] for row in rows[1:]}
    assert len(patients) < N  # several images per patient
    assert {row[2] for row in rows[1:]} == {"frontal", "lateral"}


def test_deterministic_for_a_seed(synth_dir, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", N, seed=7, image_size=64)
    assert read_rows(again) == read_rows(synth_dir)
    first = read_rows(synth_dir)[1][0]
    assert (again.parent / first).read_bytes() == (synth_dir.parent / first).read_bytes()
    other = write_synthetic_dataset(tmp_path / "other", N, seed=8, image_size=64)
    assert read_rows(other) != read_rows(synth_dir)


def test_images_are_16_bit(synth_dir):
    rows = read_rows(synth_dir)[1:]
    with Image.open(synth_dir.parent / rows[0][0]) as image:
        assert image.mode == "I;16"
        pixels = np.asarray(image)
    assert pixels.dtype == np.uint16 and pixels.max() > 255


def test_long_tail_at_400():
    prevalence, lateral_fraction = _prevalence(None, "core_all", 160_868)
    labels = synthetic_labels(400, np.random.default_rng(0), prevalence)
    counts = labels.sum(axis=0)
    assert counts.argmax() == NORMAL_INDEX  # Normal commonest
    assert counts.min() >= 4  # every class, Infarction included, has positives
    assert counts.max() > 10 * np.median(counts[counts > 4]) / 4  # a head well above the floor
    normal = labels[:, NORMAL_INDEX] == 1
    assert labels[normal].sum() == normal.sum()  # Normal excludes every other class
    assert (labels[~normal].sum(axis=1) >= 1).all()  # abnormal images show a finding
    assert 0.2 < lateral_fraction < 0.4


def test_frontal_and_lateral_differ():
    labels = np.zeros(len(ALL_LABELS))
    frontal = render_image(labels, "frontal", np.random.default_rng(0), 64)
    lateral = render_image(labels, "lateral", np.random.default_rng(0), 64)
    assert frontal.shape == (64, 64) and lateral.shape[0] == 64 and lateral.shape[1] < 56
    # Frontal: bright midline between two dark lungs; lateral: dark centre, spine at the back.
    f, lat = frontal.astype(float), lateral.astype(float)
    assert f[20:40, 30:34].mean() > f[20:40, 16:20].mean() + 5000
    assert lat[20:40, lat.shape[1] // 2 - 2 : lat.shape[1] // 2 + 2].mean() < lat[20:40, -10:-7].mean()


def _pattern_difference(labels, seed: int, size: int = 128, projection: str = "frontal") -> np.ndarray:
    # The same seed draws the same exposure and noise, so only the patterns differ.
    vector = np.zeros(len(ALL_LABELS))
    vector[list(labels)] = 1
    base = render_image(np.zeros(len(ALL_LABELS)), projection, np.random.default_rng(seed), size).astype(float)
    return np.abs(render_image(vector, projection, np.random.default_rng(seed), size).astype(float) - base)


def _drawn_cells(diff: np.ndarray) -> set[tuple[int, int]]:
    """(row, column) of the grid cells that hold a pattern."""
    cell_h, cell_w = 0.8 * diff.shape[0] / GRID, 0.8 * diff.shape[1] / GRID
    top, left = 0.1 * diff.shape[0], 0.1 * diff.shape[1]
    return {(r, c) for r in range(GRID) for c in range(GRID)
            if diff[int(top + r * cell_h) : int(top + (r + 1) * cell_h),
                    int(left + c * cell_w) : int(left + (c + 1) * cell_w)].mean() > 2000}


@pytest.mark.parametrize("projection", ["frontal", "lateral"])
def test_every_class_shows_in_either_cell_of_its_pair(projection):
    for index in range(len(ALL_LABELS)):
        if index == NORMAL_INDEX:
            assert not _drawn_cells(_pattern_difference([index], 0, projection=projection))
            continue
        _, row, columns = class_pattern(index)
        seen = set()
        for seed in range(8):
            diff = _pattern_difference([index], seed, projection=projection)
            cells = _drawn_cells(diff)  # at least 3 % of the 16-bit range on average over the cell
            assert len(cells) == 1 and next(iter(cells)) in {(row, c) for c in columns}, (index, cells)
            seen |= cells
        assert seen == {(row, c) for c in columns}, index  # left and right lung alike


@pytest.mark.parametrize("index", [1, 11, 33])
def test_nothing_is_drawn_outside_the_class_cell(index):
    size = 128
    cell_h, cell_w = 0.8 * size / GRID, 0.8 * size / GRID
    margin = int(0.1 * cell_h) + 1  # the pattern centre is jittered by up to 5 % of a cell
    for seed in range(4):
        diff = _pattern_difference([index], seed, size)
        ((row, col),) = _drawn_cells(diff)
        top, left = int(0.1 * size + row * cell_h), int(0.1 * size + col * cell_w)
        diff[max(0, top - margin) : int(top + cell_h) + margin, max(0, left - margin) : int(left + cell_w) + margin] = 0
        assert diff.max() == 0


def test_each_class_has_its_own_look_and_place():
    assert len({class_pattern(i) for i in range(len(ALL_LABELS))}) == len(ALL_LABELS)
    for index in range(0, len(ALL_LABELS), 2):  # the two classes of a pair: same shape, opposite sign
        (dark, row, columns), (bright, row2, columns2) = class_pattern(index), class_pattern(index + 1)
        assert (row, columns) == (row2, columns2) and columns[1] == GRID - 1 - columns[0]
        assert dark.startswith("dark_") and bright == "bright_" + dark.split("_")[1]


def test_both_classes_of_a_pair_take_one_side_each():
    for seed in range(5):
        cells = _drawn_cells(_pattern_difference([10, 11], seed))
        _, row, columns = class_pattern(10)
        assert cells == {(row, c) for c in columns}


def test_labels_survive_a_horizontal_flip():
    """A flipped image is an image of the same classes: hflip augmentation and TTA are truthful."""
    diff = _pattern_difference([3, 20], seed=4)
    assert _drawn_cells(diff[:, ::-1]) == {(r, GRID - 1 - c) for r, c in _drawn_cells(diff)}
    for index in (3, 20):  # the mirrored cell is the class's own other cell
        _, row, columns = class_pattern(index)
        assert len(_drawn_cells(diff[:, ::-1]) & {(row, c) for c in columns}) == 1
    # every shape is mirror-symmetric about its own centre (seen large, so the sub-pixel
    # jitter of the centre does not count)
    for index in (1, 3, 5):  # bright blob, ring and square
        pattern = _pattern_difference([index], seed=0, size=512)
        ys, xs = np.nonzero(pattern > 0.1 * pattern.max())
        patch = pattern[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert np.abs(patch - patch[:, ::-1]).mean() < 0.1 * patch.mean(), class_pattern(index)


def test_the_writer_returns_the_csv(tmp_path):
    path = write_synthetic_dataset(tmp_path, 6, seed=1)
    assert path.name == "labels.csv" and len(read_rows(path)) == 7
