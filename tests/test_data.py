"""Label readers, the label map, image loading, the patient split, augmentation, the Dataset."""

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig, prepare_square, preprocess
from cxrlt.io.images import load_image
from training import data
from training.data import (
    Augment,
    CxrDataset,
    LabelTable,
    class_counts,
    find_counts_csv,
    load_padchest_counts,
    load_padchest_label_map,
    parse_padchest_labels,
    patient_split,
    read_cxrlt_csv,
    read_labels,
    read_padchest_csv,
    write_padchest_label_map,
)
from training.synth import write_synthetic_dataset


# ------------------------------------------------------------------ counts and label map


def test_counts_csv_packaged_copy_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv(data.COUNTS_CSV_ENV, raising=False)
    assert find_counts_csv() == data.PACKAGED_COUNTS_CSV
    # The design card's original, beside the checkout (tests only: the product never reads it).
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "padchest_cxrlt2026_counts.csv"
    if shared.is_file():  # the packaged copy is verbatim
        assert data.PACKAGED_COUNTS_CSV.read_bytes() == shared.read_bytes()
    copy = tmp_path / "counts.csv"
    copy.write_bytes(find_counts_csv().read_bytes())
    monkeypatch.setenv(data.COUNTS_CSV_ENV, str(copy))
    assert find_counts_csv() == copy
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_counts_csv(tmp_path / "missing.csv")


def test_counts_cover_the_contract():
    table = load_padchest_counts()
    assert tuple(table) == ALL_LABELS  # 'Goiter' in the file matched to 'goiter'
    counts = class_counts("core_all")
    assert counts[0] == 50616 and counts[ALL_LABELS.index("Infarction")] == 0


def test_shipped_label_map_matches_counts(tmp_path):
    regenerated = write_padchest_label_map(tmp_path / "map.yaml")
    assert load_padchest_label_map(regenerated) == load_padchest_label_map()
    mapping = load_padchest_label_map()
    assert "rib fracture" in mapping["fracture"]
    assert "rib fracture" not in load_padchest_label_map(include_ext=False)["fracture"]
    assert mapping["Infarction"] == frozenset()


# ------------------------------------------------------------------------------ readers


def test_parse_padchest_labels():
    assert parse_padchest_labels("['cardiomegaly', ' pleural effusion']") == ["cardiomegaly", "pleural effusion"]
    assert parse_padchest_labels("nan") == [] and parse_padchest_labels("['']") == []


def write_padchest(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "ImageDir", "PatientID", "Projection", "Report", "Labels"])
        writer.writerows(rows)


def test_read_padchest_csv(tmp_path):
    path = tmp_path / "padchest.csv"
    write_padchest(path, [
        ["a.png", "0", "p1", "PA", "cardiomegalia, derrame", "['cardiomegaly', ' pleural effusion']"],
        ["b.png", "0", "p1", "L", "normal", "['normal']"],
        ["c.png", "1", "p2", "AP_horizontal", "", "['rib fracture', 'unchanged']"],
        ["d.png", "1", "p3", "COSTAL", "", "['rib fracture']"],
        ["e.png", "2", "p4", "AP", "", "['central venous catheter via jugular vein']"],
        ["f.png", "2", "p5", "PA", "", "nan"],
    ])
    table = read_padchest_csv(path)
    assert table.image_ids == ["a.png", "b.png", "c.png", "e.png", "f.png"]  # COSTAL dropped
    assert table.projections == ["frontal", "lateral", "frontal", "frontal", "frontal"]
    assert table.image_paths[0].replace("\\", "/") == "0/a.png"
    assert table.labels.shape == (5, 36)
    positives = [{ALL_LABELS[i] for i in np.flatnonzero(row)} for row in table.labels]
    assert positives == [
        {"cardiomegaly", "pleural effusion"},
        {"Normal"},
        {"fracture"},  # an `ext` sub-type
        {"Support Devices", "central venous catheter"},  # one term, two classes
        set(),
    ]
    core_only = read_padchest_csv(path, include_ext=False)
    assert core_only.labels[2].sum() == 0
    keep = read_padchest_csv(path, drop_unknown_projection=False)
    assert len(keep) == 6 and keep.projection_indices().tolist() == [0, 1, 0, -1, 0, 0]


def test_read_padchest_csv_bad_labels_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    write_padchest(path, [["a.png", "0", "p1", "PA", "", "['cardiomegaly'"]])
    with pytest.raises(ValueError, match="line 2"):
        read_padchest_csv(path)


def write_cxrlt(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_read_cxrlt_csv_tolerates_extra_columns_and_names_missing(tmp_path):
    path = tmp_path / "cxrlt.csv"
    header = ["ImageID", "PatientID", "Extra", "Projection", *ALL_LABELS[:-1], "GOITER"]
    write_cxrlt(path, header, [["x.png", "p1", "?", "PA", *([0] * 35), 1]])
    table = read_cxrlt_csv(path)
    assert table.labels.shape == (1, 36) and table.labels[0, -1] == 1
    assert table.projections == ["frontal"]
    missing = tmp_path / "missing.csv"
    write_cxrlt(missing, ["ImageID", "PatientID", *TASK1_LABELS], [["x.png", "p1", *([0] * 30)]])
    with pytest.raises(ValueError, match="Scoliosis"):
        read_cxrlt_csv(missing)
    assert read_cxrlt_csv(missing, labels=TASK1_LABELS).labels.shape == (1, 30)


def read_error(reader, path, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        reader(path, *args, **kwargs)
    return str(caught.value)


def test_read_cxrlt_csv_bad_cells_name_file_line_column_and_value(tmp_path):
    path = tmp_path / "labels.csv"
    header = ["ImageID", "PatientID", "Note", "Projection", *TASK1_LABELS]
    zeros = ["0"] * 30
    write_cxrlt(path, header, [
        ["a.png", "p1", "two\nlines", "PA", *zeros],  # a quoted cell over lines 2-3
        [],  # a blank line (4), skipped
        ["b.png", "p2", "", "L", *zeros[:-1], "x"],  # line 5
        ["c.png", "p3", "", "PA", "2", *zeros[1:]],
    ])
    message = read_error(read_cxrlt_csv, path, labels=TASK1_LABELS)
    assert message.startswith(f"{path} line 5: column 'calcified densities' has 'x'; use 0 or 1")
    assert "1 more bad cell" in message
    path.write_text("ImageID,PatientID,Projection,Normal\nb.png,p2,PA,NA\n")  # NA is a bad value, not NaN
    assert read_error(read_cxrlt_csv, path, labels=["Normal"]) == (
        f"{path} line 2: column 'Normal' has 'NA'; use 0 or 1 (an empty cell counts as 0)")
    path.write_text("ImageID,PatientID,Projection,Normal\na.png,p1,PA,\nb.png,p2,sideways,1\n")
    message = read_error(read_cxrlt_csv, path, labels=["Normal"])
    assert message.startswith(f"{path} line 3: column 'Projection' has 'sideways'; use frontal or lateral")
    path.write_text("ImageID,PatientID,Projection,Normal\na.png,p1,UNK, 1.0\n\n")  # UNK: unknown, not an error
    table = read_cxrlt_csv(path, labels=["Normal"])
    assert table.projections == [None] and table.labels.tolist() == [[1.0]]


def test_read_cxrlt_csv_names_a_missing_column_and_a_malformed_row(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageID,Normal\na.png,1\n")
    assert read_error(read_cxrlt_csv, path, labels=["Normal"]) == (
        f"{path} line 1: the header lacks the column(s) ['PatientID']; it has ['ImageID', 'Normal']")
    path.write_text("ImageID,PatientID,Normal\na.png,p1,1\nb.png,p2,1,extra\n")
    assert read_error(read_cxrlt_csv, path, labels=["Normal"]).startswith(
        f"{path} line 3: 4 fields but the header has 3")
    path.write_text("ImageID,PatientID,Normal\na.png,p1,1\n,p2,0\n")
    assert read_error(read_cxrlt_csv, path, labels=["Normal"]) == (
        f"{path} line 3: column 'ImageID' is empty; every row needs one")


def test_read_padchest_csv_gzip_errors_name_file_line_column_and_value(tmp_path):
    path = tmp_path / "padchest.csv.gz"
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "PatientID", "Projection", "Report", "Labels"])
        writer.writerow(["a.png", "p1", "PA", "a long\nreport " + "x" * 200_000, "['normal']"])  # lines 2-3
        writer.writerow(["b.png", "p2", "COSTAL", "", "['not parsed: the row is dropped'"])
        writer.writerow(["c.png", "p3", "L", "", "['cardiomegaly'"])  # line 5
    message = read_error(read_padchest_csv, path)
    assert message.startswith(f"{path} line 5: column 'Labels' has \"['cardiomegaly'\"; use a Python-list-like")
    with gzip.open(path, "wt", newline="") as handle:
        handle.write("ImageID,PatientID,Projection,Labels\na.png,p1,PA,['normal']\nb.png,p2,OBLIQUE,[]\n")
    assert read_error(read_padchest_csv, path).startswith(f"{path} line 3: column 'Projection' has 'OBLIQUE'")
    with gzip.open(path, "wt", newline="") as handle:
        handle.write("ImageID,PatientID,Labels\na.png,p1,['normal']\n")
    assert read_error(read_padchest_csv, path).startswith(f"{path} line 1: the header lacks the column(s) ['Projection']")


def test_load_padchest_counts_names_a_bad_count(tmp_path):
    lines = find_counts_csv().read_text(encoding="utf-8").splitlines(keepends=True)
    bad = tmp_path / "counts.csv"
    bad.write_text(lines[0] + lines[1] + lines[2].replace(",10824,", ",1O824,") + "".join(lines[3:]))
    assert read_error(load_padchest_counts, bad) == (
        f"{bad} line 3: column 'core_all' has '1O824'; use a whole number of images")


# ------------------------------------------------------------------------------- images


def test_training_reads_the_pixels_a_client_sends_from_png_jpeg_and_dicom(tmp_path, monkeypatch):
    """One 8-bit picture as PNG, JPEG and DICOM: the Dataset preprocesses exactly the array the
    client sends (cxrlt.io.images.load_image), so training and serving see the same input."""
    from tests.test_dicom_io import make_dicom

    rows, cols = np.mgrid[0:40, 0:56]
    disc = ((rows - 20) ** 2 + (cols - 30) ** 2) < 80
    picture = np.clip(30 + 3 * cols + 2 * rows + 40 * disc, 0, 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "x.png")
    Image.fromarray(picture).save(tmp_path / "x.jpg", quality=100)
    make_dicom(tmp_path / "x.dcm", picture, photometric="MONOCHROME2")
    names = ["x.png", "x.jpg", "x.dcm"]
    table = LabelTable(names, ["p1"] * 3, ["frontal"] * 3, np.zeros((3, len(TASK1_LABELS)), np.float32),
                       TASK1_LABELS, names)
    fed = []

    def recording_prepare_square(image, config):
        fed.append(image)
        return prepare_square(image, config)

    monkeypatch.setattr(data, "prepare_square", recording_prepare_square)
    config = PreprocessConfig(size=32)
    dataset = CxrDataset(table, tmp_path, config, labels=TASK1_LABELS)  # the default loader, no augmentation
    tensors = {name: dataset[i][0] for i, name in enumerate(names)}

    sent = {name: load_image(tmp_path / name).pixels for name in names}
    for name, image in zip(names, fed):  # (a) training preprocesses exactly what the client sends
        assert image.dtype == np.uint16 and np.array_equal(image, sent[name]), name
    np.testing.assert_array_equal(sent["x.png"], picture.astype(np.uint16) * 257)
    np.testing.assert_array_equal(sent["x.dcm"], sent["x.png"])  # (b) the same picture, the same pixels
    assert torch.equal(tensors["x.dcm"], tensors["x.png"])
    assert np.abs(sent["x.jpg"].astype(np.int64) - sent["x.png"]).max() <= 2 * 257  # JPEG: within 2 grey levels
    served = preprocess(sent["x.png"], config, ("identity",))[0]  # (c) what serving feeds the network
    np.testing.assert_allclose(tensors["x.png"].numpy(), served, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------- split


def test_patient_split_no_leakage_and_nine_to_one():
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in range(300) for _ in range(int(rng.integers(1, 5)))]
    train, val = patient_split(patients, seed=1)
    assert len(train) + len(val) == len(patients) and not set(train) & set(val)
    assert not {patients[i] for i in train} & {patients[i] for i in val}
    assert 0.06 < len(val) / len(patients) < 0.14
    again, _ = patient_split(patients, seed=1)
    other, _ = patient_split(patients, seed=2)
    assert again.tolist() == train.tolist() and other.tolist() != train.tolist()


# -------------------------------------------------------------------------- augmentation


def test_augment_keeps_shape_and_range():
    rng = np.random.default_rng(0)
    square = rng.random((48, 48)).astype(np.float32)
    augment = Augment(clahe_p=0.0)
    for _ in range(20):
        out = augment(square, rng)
        assert out.shape == (48, 48) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(augment(square, rng), square)


def test_augment_identity_and_flip():
    square = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    still = Augment(hflip_p=0.0, max_rotation=0, scale=(1, 1), max_translate=0, clahe_p=0)
    assert np.allclose(still(square, np.random.default_rng(0)), square, atol=1e-5)
    flip = Augment(hflip_p=1.0, max_rotation=0, scale=(1, 1), max_translate=0, clahe_p=0)
    assert np.allclose(flip(square, np.random.default_rng(0)), square[:, ::-1], atol=1e-5)


def test_clahe_equalises_a_low_contrast_image():
    low_contrast = 0.45 + 0.1 * np.random.default_rng(2).random((64, 64)).astype(np.float32)
    augment = Augment(hflip_p=0.0, max_rotation=0, scale=(1, 1), max_translate=0, clahe_p=1.0)
    out = augment(low_contrast, np.random.default_rng(0))
    assert out.shape == low_contrast.shape and 0 <= out.min() and out.max() <= 1
    assert out.std() > 1.5 * low_contrast.std()  # contrast was stretched


# ------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def synth_table(tmp_path_factory):
    csv_path = write_synthetic_dataset(tmp_path_factory.mktemp("ds"), 8, seed=0, image_size=48)
    return read_cxrlt_csv(csv_path), csv_path.parent


def test_dataset_items(synth_table):
    table, root = synth_table
    config = PreprocessConfig(size=32)
    torch.manual_seed(0)
    dataset = CxrDataset(table, root, config, augment=Augment(clahe_p=0.0))
    pixels, labels, projection = dataset[0]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert labels.shape == (36,) and labels.dtype == torch.float32
    assert projection in (0, 1)
    task1 = CxrDataset(table, root, config, labels=TASK1_LABELS)
    assert task1[0][1].shape == (30,)
    assert {task1[i][2] for i in range(len(task1))} == {0, 1}
    batch = next(iter(torch.utils.data.DataLoader(task1, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].shape == (4, 30) and batch[2].dtype == torch.int64


def test_training_reads_a_padchest_label_file_as_it_reads_a_cxrlt_csv(tmp_path):
    from training.job import load_split

    path = tmp_path / "padchest.csv"
    write_padchest(path, [[f"{i}.png", "0", f"p{i}", "PA", "", "['cardiomegaly']" if i % 2 else "['normal']"] for i in range(10)])
    split = load_split(path, resized=None)
    assert split.table.labels.shape == (10, len(TASK1_LABELS))
    assert split.table.labels[:, TASK1_LABELS.index("cardiomegaly")].tolist() == [float(i % 2) for i in range(10)]
    assert len(split.train) + len(split.val) == 10
    assert read_labels(path).labels.shape == (10, len(ALL_LABELS))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty; a CSV starts with a header line"):
        read_labels(tmp_path / "empty.csv")
