"""The synthetic data set: deterministic, exact CSV format, long-tailed, 16-bit, projections differ."""

import csv

import numpy as np
import pytest
from PIL import Image

from cxrlt.labels import ALL_LABELS, NORMAL_INDEX
from training.synth import (
    GRID,
    _prevalence,
    class_pattern,
    main_synth,
    render_image,
    synthetic_labels,
    write_synthetic_dataset,
)

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


@pytest.mark.parametrize("index", [1, 11, 33])
def test_class_pattern_drawn_in_its_cell(index):
    size = 128
    empty, with_class = np.zeros(len(ALL_LABELS)), np.zeros(len(ALL_LABELS))
    with_class[index] = 1
    base = render_image(empty, "frontal", np.random.default_rng(3), size).astype(float)
    drawn = render_image(with_class, "frontal", np.random.default_rng(3), size).astype(float)
    _, row, col = class_pattern(index)
    cell = 0.8 * size / GRID
    top, left = int(0.1 * size + row * cell), int(0.1 * size + col * cell)
    diff = np.abs(drawn - base)  # same seed: same exposure and noise, only the pattern differs
    inside = diff[top : int(top + cell), left : int(left + cell)].mean()
    margin = int(0.1 * cell) + 1  # the pattern centre is jittered by up to 5 % of a cell
    diff[max(0, top - margin) : int(top + cell) + margin, max(0, left - margin) : int(left + cell) + margin] = 0
    assert inside > 3000  # about 5 % of the 16-bit range on average over the cell
    assert diff.max() == 0  # nothing drawn outside the class's cell
    assert len({class_pattern(i)[1:] for i in range(len(ALL_LABELS))}) == len(ALL_LABELS)


def test_main_synth_returns_csv(tmp_path):
    path = main_synth(tmp_path, 6, seed=1)
    assert path.name == "labels.csv" and len(read_rows(path)) == 7
