"""Training data: label files, images, the patient-level split, augmentation, a Dataset.

Two label sources are read into one `LabelTable`:

* the CXR-LT 2026 CSV (`ImageID, PatientID, ...,` one 0/1 column per class in the
  contract order of `cxrlt.contract.labels`; extra columns are ignored);
* the original PadChest label file (a `Labels` column such as
  "['cardiomegaly', 'pleural effusion']" and a `Projection` column PA/AP/L/...), mapped
  to the 30 + 6 challenge classes by the editable YAML `training/data/padchest_label_map.yaml`.

Images go through `cxrlt.contract.preprocessing` (the one implementation shared with serving):
`prepare_square` -> augmentation on the [S, S] image in [0, 1] -> `normalize`.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import io
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import yaml
from PIL import Image

from cxrlt.contract.labels import ALL_LABELS, PROJECTIONS
from cxrlt.contract.preprocessing import PreprocessConfig, normalize, prepare_square

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The packaged copy comes first so the package works outside this checkout; the shared
# folder next to the repository is the project's original of the same file.
COUNTS_CSV_CANDIDATES: tuple[Path, ...] = (
    PACKAGE_DATA / "padchest_cxrlt2026_counts.csv",
    REPO_ROOT.parent / "shared" / "data" / "padchest_cxrlt2026_counts.csv",
)
COUNTS_CSV_ENV = "CXRLT_PADCHEST_COUNTS"
DEFAULT_LABEL_MAP = PACKAGE_DATA / "padchest_label_map.yaml"

# Projection terms of PadChest (`Projection`), DICOM ViewPosition and our own CSVs.
# PadChest's COSTAL (rib views), EXCLUDE and UNK map to None: not a chest PA/AP/lateral.
_PROJECTION_TERMS = {
    "frontal": "frontal", "pa": "frontal", "ap": "frontal", "ap_horizontal": "frontal",
    "lateral": "lateral", "l": "lateral", "ll": "lateral", "rl": "lateral",
}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # PadChest rows carry long report fields


# ----------------------------------------------------------------------------- counts


@dataclasses.dataclass(frozen=True)
class ClassCounts:
    """One row of the PadChest counts CSV, keyed by the contract label name."""

    label: str
    set: str  # "ID" (Task 1) or "OOD" (Task 2)
    core: tuple[str, ...]  # PadChest terms that define the class
    ext: tuple[str, ...]  # extra PadChest terms (subtypes) of the extended definition
    counts: Mapping[str, int]  # core_all, core_frontal, ..., ext_lateral


def find_counts_csv(path: str | os.PathLike | None = None) -> Path:
    """The PadChest counts CSV: `path`, else $CXRLT_PADCHEST_COUNTS, else the packaged copy,
    else `../shared/data/` next to the repository."""
    if path is None and os.environ.get(COUNTS_CSV_ENV):
        path = os.environ[COUNTS_CSV_ENV]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PadChest counts CSV {path} does not exist; pass an existing file")
        return path
    for candidate in COUNTS_CSV_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "PadChest counts CSV not found in "
        + ", ".join(str(c) for c in COUNTS_CSV_CANDIDATES)
        + f"; pass its path or set ${COUNTS_CSV_ENV}"
    )


def _split_terms(cell: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (cell or "").split("|") if t.strip())


def load_padchest_counts(path: str | os.PathLike | None = None) -> dict[str, ClassCounts]:
    """Read the counts CSV into {contract label: ClassCounts}, in ALL_LABELS order.

    The CSV's `cls` names are matched to the contract case-insensitively (it spells
    'Goiter' where the contract says 'goiter').
    """
    csv_path = find_counts_csv(path)
    by_lower = {label.lower(): label for label in ALL_LABELS}
    rows: dict[str, ClassCounts] = {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            label = by_lower.get(row["cls"].strip().lower())
            if label is None:
                continue  # not a challenge class
            counts = {k: int(v) for k, v in row.items() if k.split("_")[0] in ("core", "ext") and "_" in k}
            rows[label] = ClassCounts(label, row["set"], _split_terms(row["core"]), _split_terms(row["ext"]), counts)
    missing = [label for label in ALL_LABELS if label not in rows]
    if missing:
        raise ValueError(f"counts CSV {csv_path} lacks the classes {missing}; use the project's file")
    return {label: rows[label] for label in ALL_LABELS}


def class_counts(column: str = "core_all", labels: Sequence[str] = ALL_LABELS,
                 path: str | os.PathLike | None = None) -> np.ndarray:
    """PadChest image counts of `labels` from one counts column, as int64 [C]."""
    table = load_padchest_counts(path)
    try:
        return np.array([table[label].counts[column] for label in labels], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(
            f"unknown counts column or label {exc.args[0]!r}; columns are "
            f"{sorted(next(iter(table.values())).counts)}"
        ) from None


# ------------------------------------------------------------------------- label map

_LABEL_MAP_HEADER = """\
# PadChest term -> CXR-LT 2026 class mapping (editable).
#
# Derived from the `core` / `ext` columns of padchest_cxrlt2026_counts.csv by
# training.data.write_padchest_label_map(). An image is positive for a class when any of
# its PadChest `Labels` terms (compared lower-case, stripped) is listed under `core`, or,
# with include_ext (the default), under `ext` (sub-types such as "rib fracture").
# One term may feed several classes (e.g. central venous catheter -> Support Devices and
# central venous catheter). Infarction has no PadChest term: it is never positive here.
"""


def label_map_from_counts(path: str | os.PathLike | None = None) -> dict[str, dict[str, list[str]]]:
    """{class: {"core": [...], "ext": [...]}} from the counts CSV."""
    return {label: {"core": list(c.core), "ext": list(c.ext)} for label, c in load_padchest_counts(path).items()}


def write_padchest_label_map(out: str | os.PathLike = DEFAULT_LABEL_MAP,
                             counts_csv: str | os.PathLike | None = None) -> Path:
    """(Re)generate the YAML mapping from the counts CSV; edit the YAML by hand afterwards."""
    out = Path(out)
    body = yaml.safe_dump({"classes": label_map_from_counts(counts_csv)}, sort_keys=False,
                          allow_unicode=True, width=100)
    out.write_text(_LABEL_MAP_HEADER + body, encoding="utf-8")
    return out


def load_padchest_label_map(path: str | os.PathLike | None = None, include_ext: bool = True,
                            labels: Sequence[str] = ALL_LABELS) -> dict[str, frozenset[str]]:
    """{class: lower-case PadChest terms} for `labels`, from the YAML mapping."""
    path = Path(path) if path is not None else DEFAULT_LABEL_MAP
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    classes = data.get("classes", {})
    missing = [label for label in labels if label not in classes]
    if missing:
        raise ValueError(
            f"label map {path} has no entry for {missing}; add them (an empty `core: []` is "
            "allowed) or regenerate it with training.data.write_padchest_label_map()"
        )
    keys = ("core", "ext") if include_ext else ("core",)
    return {
        label: frozenset(str(t).strip().lower() for k in keys for t in (classes[label] or {}).get(k) or [])
        for label in labels
    }


# ---------------------------------------------------------------------------- tables


def normalize_projection(value: str | None) -> str | None:
    """'PA' / 'AP' / 'AP_horizontal' / 'frontal' -> 'frontal'; 'L' / 'LL' / 'RL' / 'lateral'
    -> 'lateral'; anything else (COSTAL, EXCLUDE, UNK, empty) -> None."""
    if value is None:
        return None
    return _PROJECTION_TERMS.get(value.strip().lower())


@dataclasses.dataclass
class LabelTable:
    """Images with their labels. `image_paths` are relative to an image root."""

    image_ids: list[str]
    patient_ids: list[str]
    projections: list[str | None]  # "frontal", "lateral" or None (unknown)
    labels: np.ndarray  # [N, C] float32 of 0/1
    label_names: tuple[str, ...]
    image_paths: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, indices: Iterable[int]) -> "LabelTable":
        idx = np.asarray(list(indices), dtype=np.int64)
        pick = lambda values: [values[i] for i in idx]  # noqa: E731
        return LabelTable(pick(self.image_ids), pick(self.patient_ids), pick(self.projections),
                          self.labels[idx], self.label_names, pick(self.image_paths))

    def projection_indices(self) -> np.ndarray:
        """0 frontal, 1 lateral, -1 unknown, as int64 [N]."""
        return np.array([PROJECTIONS.index(p) if p in PROJECTIONS else -1 for p in self.projections],
                        dtype=np.int64)

    def positives(self) -> np.ndarray:
        """Positive images per class, int64 [C] (the training counts for losses/metrics)."""
        return self.labels.sum(axis=0).astype(np.int64)

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """Label columns in the order of `names`."""
        missing = [n for n in names if n not in self.label_names]
        if missing:
            raise ValueError(f"the table has no label columns {missing}; it has {list(self.label_names)}")
        return self.labels[:, [self.label_names.index(n) for n in names]]


def _open_text(path: Path):
    # PadChest ships its label file gzip-compressed; accept both.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, newline="", encoding="utf-8")


def _require_columns(fieldnames: Sequence[str] | None, required: Sequence[str], path: Path) -> None:
    missing = [c for c in required if c not in (fieldnames or [])]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; it has {list(fieldnames or [])}")


def read_cxrlt_csv(path: str | os.PathLike, labels: Sequence[str] = ALL_LABELS) -> LabelTable:
    """Read a CXR-LT 2026 label CSV.

    Requires `ImageID`, `PatientID` and one 0/1 column per class of `labels` (exact name,
    else case-insensitive). `Projection` (frontal/lateral or PA/AP/L...) and `ImageDir`
    (prefixed to ImageID) are used when present; any other column is ignored. Blank label
    cells count as 0.
    """
    path = Path(path)
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        _require_columns(fields, ("ImageID", "PatientID"), path)
        by_lower = {f.lower(): f for f in fields}
        columns, missing = [], []
        for label in labels:
            column = label if label in fields else by_lower.get(label.lower())
            (columns if column else missing).append(column or label)
        if missing:
            raise ValueError(
                f"{path} lacks the class column(s) {missing}; a CXR-LT CSV needs one 0/1 column per "
                "class in cxrlt.contract.labels order (pass labels=TASK1_LABELS for a Task-1-only file)"
            )
        ids, patients, projections, dirs, rows = [], [], [], [], []
        for line, row in enumerate(reader, start=2):
            ids.append(row["ImageID"])
            patients.append(row["PatientID"])
            projections.append(normalize_projection(row.get("Projection")))
            dirs.append(row.get("ImageDir") or "")
            values = []
            for column in columns:
                cell = (row.get(column) or "").strip()
                value = float(cell) if cell else 0.0
                if value not in (0.0, 1.0):
                    raise ValueError(f"{path} line {line}: column {column!r} holds {cell!r}; labels must be 0 or 1")
                values.append(value)
            rows.append(values)
    matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(columns))
    paths = [str(Path(d) / i) if d else i for d, i in zip(dirs, ids)]
    return LabelTable(ids, patients, projections, matrix, tuple(labels), paths)


def parse_padchest_labels(cell: str | None) -> list[str]:
    """"['cardiomegaly', ' pleural effusion']" -> ['cardiomegaly', 'pleural effusion'].

    Blank / 'nan' cells mean no label. Terms are stripped and lower-cased.
    """
    text = (cell or "").strip()
    if not text or text.lower() in ("nan", "none", "[]"):
        return []
    value = ast.literal_eval(text)  # safe: literals only
    if isinstance(value, str):
        value = [value]
    return [str(term).strip().lower() for term in value if str(term).strip()]


def read_padchest_csv(path: str | os.PathLike, label_map: str | os.PathLike | Mapping | None = None,
                      include_ext: bool = True, labels: Sequence[str] = ALL_LABELS,
                      drop_unknown_projection: bool = True) -> LabelTable:
    """Read the original PadChest label file and map its terms to the challenge classes.

    label_map: a YAML path, an already loaded {class: terms} mapping, or None for the
    packaged `padchest_label_map.yaml`. Rows whose Projection is not PA/AP/AP_horizontal/L
    (COSTAL, EXCLUDE, UNK) are dropped unless `drop_unknown_projection` is False.
    """
    path = Path(path)
    if isinstance(label_map, Mapping):
        term_map = {label: frozenset(t.lower() for t in label_map[label]) for label in labels}
    else:
        term_map = load_padchest_label_map(label_map, include_ext=include_ext, labels=labels)
    # Invert once: term -> class indices, so each row costs one dict lookup per term.
    term_to_classes: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        for term in term_map[label]:
            term_to_classes.setdefault(term, []).append(index)

    ids, patients, projections, paths, rows = [], [], [], [], []
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        _require_columns(reader.fieldnames, ("ImageID", "PatientID", "Projection", "Labels"), path)
        for line, row in enumerate(reader, start=2):
            projection = normalize_projection(row["Projection"])
            if projection is None and drop_unknown_projection:
                continue
            try:
                terms = parse_padchest_labels(row["Labels"])
            except (ValueError, SyntaxError):
                raise ValueError(
                    f"{path} line {line}: cannot parse Labels {row['Labels']!r}; expected a "
                    "Python-list-like string such as \"['cardiomegaly', 'pleural effusion']\""
                ) from None
            vector = np.zeros(len(labels), dtype=np.float32)
            for term in terms:
                for index in term_to_classes.get(term, ()):
                    vector[index] = 1.0
            ids.append(row["ImageID"])
            patients.append(row["PatientID"])
            projections.append(projection)
            directory = (row.get("ImageDir") or "").strip()
            paths.append(str(Path(directory) / row["ImageID"]) if directory else row["ImageID"])
            rows.append(vector)
    matrix = np.stack(rows) if rows else np.zeros((0, len(labels)), dtype=np.float32)
    return LabelTable(ids, patients, projections, matrix, tuple(labels), paths)


# ---------------------------------------------------------------------------- images


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as handle:  # DICOM Part 10: 128-byte preamble then "DICM"
        head = handle.read(132)
    return head[128:132] == b"DICM"


def load_image(path: str | os.PathLike) -> np.ndarray:
    """A grayscale radiograph as a 2-D uint8 or uint16 array (MONOCHROME2 meaning).

    8/16-bit PNG (and anything else Pillow reads) or DICOM (via cxrlt.io.images).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the image root and the CSV's ImageID")
    if _is_dicom(path):
        from cxrlt.io.images import load_image as load_dicom  # lazy: optional heavy deps

        return np.asarray(load_dicom(path).pixels)
    with Image.open(path) as image:
        mode = image.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(image).astype(np.uint16, copy=False)
        if mode == "L":
            return np.asarray(image, dtype=np.uint8)
        if mode == "I":  # some 16-bit PNG writers come back as 32-bit integers
            pixels = np.asarray(image)
            if pixels.min() < 0 or pixels.max() > 65535:
                raise ValueError(f"{path}: 32-bit pixel values outside 0..65535; convert it to a 16-bit PNG")
            return pixels.astype(np.uint16)
        if mode in ("RGB", "RGBA", "LA", "P", "1"):
            return np.asarray(image.convert("L"), dtype=np.uint8)
    raise ValueError(f"{path}: unsupported image mode {mode!r}; save it as an 8- or 16-bit grayscale PNG")


# ----------------------------------------------------------------------------- split


def patient_split(patient_ids: Sequence[str], val_fraction: float = 0.1,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation image indices with no patient on both sides (9:1 by patients).

    GroupShuffleSplit draws the fraction over patients, so the image ratio is close to,
    not exactly, 9:1 when patients have different numbers of images.
    """
    from sklearn.model_selection import GroupShuffleSplit

    if len(set(patient_ids)) < 2:
        raise ValueError("a patient-level split needs at least two patients")
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(patient_ids)), groups=np.asarray(patient_ids)))
    return np.sort(train), np.sort(val)


# ---------------------------------------------------------------------- augmentation


def _clahe(image: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image) of an image in [0, 1]."""
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(image, clip_limit=0.01).astype(np.float32)


@dataclasses.dataclass
class Augment:
    """The paper's training augmentation on an [S, S] float image in [0, 1].

    Horizontal flip (p 0.5); one Pillow affine combining rotation (+-20 degrees), scale
    (0.9-1.1) and translation (up to 5 % of the side), filling with 0 like the padding;
    CLAHE (p 0.3, scikit-image).
    """

    hflip_p: float = 0.5
    max_rotation: float = 20.0
    scale: tuple[float, float] = (0.9, 1.1)
    max_translate: float = 0.05
    clahe_p: float = 0.3

    def __call__(self, square: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.asarray(square, dtype=np.float32)
        if rng.random() < self.hflip_p:
            out = out[:, ::-1]
        out = self._affine(out, rng)
        if self.clahe_p > 0 and rng.random() < self.clahe_p:
            out = _clahe(np.clip(out, 0.0, 1.0))
        return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)

    def _affine(self, square: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = square.shape
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        scale = rng.uniform(*self.scale)
        shift = rng.uniform(-self.max_translate, self.max_translate, size=2) * np.array([width, height])
        # Pillow's AFFINE maps each output pixel back to an input pixel, so give it the
        # inverse of "scale+rotate about the centre, then translate".
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        inverse = np.array([[cos, sin], [-sin, cos]])
        centre = np.array([width / 2.0, height / 2.0])
        offset = centre - inverse @ (centre + shift)
        data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
        image = Image.fromarray(np.ascontiguousarray(square, dtype=np.float32), mode="F")
        moved = image.transform((width, height), Image.AFFINE, data=data, resample=Image.BILINEAR, fillcolor=0.0)
        return np.asarray(moved, dtype=np.float32)


# --------------------------------------------------------------------------- dataset


class CxrDataset(torch.utils.data.Dataset):
    """(pixel_values FP32 [3, S, S], labels FP32 [C], projection int: 0 frontal, 1 lateral, -1 unknown).

    labels: which class columns to return (default: all of the table's, e.g. 36; pass
    cxrlt.contract.labels.TASK1_LABELS for 30). Augmentation randomness comes from torch's RNG,
    which DataLoader seeds per worker, so workers never repeat each other and a run is
    reproducible under torch.manual_seed.
    """

    def __init__(self, table: LabelTable, image_root: str | os.PathLike, config: PreprocessConfig,
                 augment: Augment | None = None, labels: Sequence[str] | None = None,
                 loader: Callable[[Path], np.ndarray] = load_image) -> None:
        self.table = table
        self.image_root = Path(image_root)
        self.config = config
        self.augment = augment
        self.label_names = tuple(labels) if labels is not None else table.label_names
        self.targets = torch.from_numpy(np.ascontiguousarray(table.columns(self.label_names), dtype=np.float32))
        self.projections = table.projection_indices()
        self.loader = loader

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.loader(self.image_root / self.table.image_paths[index])
        square = prepare_square(image, self.config)
        if self.augment is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
            square = self.augment(square, rng)
        pixels = torch.from_numpy(normalize(square[None], self.config)[0])
        return pixels, self.targets[index], int(self.projections[index])
