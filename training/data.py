"""Training data: label files, images, the patient-level split, augmentation, a Dataset.

Two label sources are read into one `LabelTable`:

* the CXR-LT 2026 CSV (`ImageID, PatientID, ...,` one 0/1 column per class in the
  contract order of `cxrlt.contract.labels`; extra columns are ignored);
* the original PadChest label file (a `Labels` column such as
  "['cardiomegaly', 'pleural effusion']" and a `Projection` column PA/AP/L/...), mapped
  to the 30 + 6 challenge classes by the editable YAML `training/data/padchest_label_map.yaml`.

Images are read with `cxrlt.io.images.load_pixels` (the client's loader, so training sees the
pixels a client sends) and go through `cxrlt.contract.preprocessing` (shared with serving):
`prepare_square` -> augmentation on the [S, S] image in [0, 1] -> `normalize`.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from cxrlt.contract.labels import ALL_LABELS, PROJECTIONS
from cxrlt.contract.preprocessing import PreprocessConfig, normalize, prepare_square
from cxrlt.contract.resources import package_file
from cxrlt.io.images import load_pixels

PACKAGE_DATA = package_file("training", "data")
# The package's own copy of the PadChest counts (nothing outside the installed package is read).
PACKAGED_COUNTS_CSV = PACKAGE_DATA / "padchest_cxrlt2026_counts.csv"
COUNTS_CSV_ENV = "CXRLT_PADCHEST_COUNTS"
DEFAULT_LABEL_MAP = PACKAGE_DATA / "padchest_label_map.yaml"

# Projection terms of PadChest (`Projection`), DICOM ViewPosition and our own CSVs.
_PROJECTION_TERMS = {
    "frontal": "frontal", "pa": "frontal", "ap": "frontal", "ap_horizontal": "frontal",
    "lateral": "lateral", "l": "lateral", "ll": "lateral", "rl": "lateral",
}

# Projection cells that mean "not a chest PA/AP/lateral" (PadChest's COSTAL rib views,
# EXCLUDE, UNK) or "not known" (empty): read as None. Any other unknown term is an error.
_UNKNOWN_PROJECTION_TERMS = frozenset({"", "costal", "exclude", "unk", "unknown"})
_PROJECTION_ADVICE = ("use frontal or lateral (or PA, AP, AP_horizontal, L, LL, RL); write COSTAL, EXCLUDE "
                      "or UNK, or leave it empty, for an image that is not a chest PA/AP/lateral")

# How every CSV here is read: each cell a str exactly as written, never NaN (no type
# guessing; an empty or missing cell is '', the literal "NA" stays 'NA'); blank lines stay
# as rows of '' so that a row's position gives its line (see _line); gzip etc. by suffix.
_READ_CSV = dict(dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False, encoding="utf-8")
_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_OPEN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")


# ------------------------------------------------------------------------ CSV reading


def _read_csv(path: Path) -> pd.DataFrame:
    """The whole CSV as str cells, index = row position (blank lines included)."""
    try:
        frame = pd.read_csv(path, **_READ_CSV)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; a CSV starts with a header line of column names") from None
    except pd.errors.ParserError as exc:
        raise ValueError(_parser_error(path, str(exc))) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took the first field for an index
        raise ValueError(f"{path} line 2: {frame.shape[1] + 1} fields but the header has "
                         f"{frame.shape[1]}; quote cells that contain commas")
    return frame


def _parser_error(path: Path, message: str) -> str:
    """pandas' tokenizer error, with the line an editor shows in place of pandas' record count."""
    if found := _FIELD_COUNT.search(message):  # "line" is the record, header = 1
        expected, record, saw = map(int, found.groups())
        position, problem = record - 2, f"{saw} fields but the header has {expected}; quote cells that contain commas"
    elif found := _OPEN_QUOTE.search(message):  # "row" is the record, header = 0
        position, problem = int(found.group(1)) - 1, 'a quoted cell is never closed; check its " characters'
    else:
        return f"{path} is not a readable CSV: {message}"
    if position < 0:
        return f"{path} line 1: the header is not readable CSV: {message}"
    above = pd.read_csv(path, nrows=position, **_READ_CSV)  # the rows before the bad one
    return f"{path} line {_line(above, position)}: {problem}"


def _line(frame: pd.DataFrame, position: int) -> int:
    """The line an editor shows (header = line 1) where row `position` of `_read_csv`'s frame
    starts, counting the line breaks inside quoted cells above it (only called for errors)."""
    breaks = sum(str(name).count("\n") for name in frame.columns)
    breaks += sum("".join(frame.iloc[:position, j].tolist()).count("\n") for j in range(frame.shape[1]))
    return 2 + position + breaks


def _require_columns(fieldnames: Sequence[str], required: Sequence[str], path: Path) -> None:
    missing = [c for c in required if c not in fieldnames]
    if missing:
        raise ValueError(f"{path} line 1: the header lacks the column(s) {missing}; it has {list(fieldnames)}")


def _data_rows(path: Path, frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """`frame` without blank lines (the index keeps each row's position); a row with content
    but an empty `key` cell is an error."""
    empty = frame[key].str.strip().eq("")
    if not empty.any():
        return frame
    blank = frame[empty].apply(lambda column: column.str.strip().eq("")).all(axis=1)
    if not blank.all():
        position = blank.index[~blank.to_numpy()][0]
        raise ValueError(f"{path} line {_line(frame, position)}: column {key!r} is empty; every row needs one")
    return frame[~empty]


def _parse_cells(path: Path, frame: pd.DataFrame, rows: pd.DataFrame, columns: Sequence[str],
                 parse: Callable[[str], object], advice: str) -> list[tuple[np.ndarray, list]]:
    """Parse each distinct cell of each of `columns` once.

    Returns per column (codes, parsed): row i of `rows` holds parsed[codes[i]]. A cell that
    `parse` rejects (ValueError, SyntaxError or TypeError) fails the read with a message that
    names the file, the line, the column and the value of the first such cell in file order.
    """
    decoded, rejected = [], []
    for j, column in enumerate(columns):
        codes, uniques = pd.factorize(rows[column])
        parsed, bad = [], []
        for k, cell in enumerate(uniques):
            try:
                parsed.append(parse(cell))
            except (ValueError, SyntaxError, TypeError):
                parsed.append(None)
                bad.append(k)
        if bad:
            where = np.flatnonzero(np.isin(codes, bad))
            rejected.append((int(where[0]), j, where.size))
        decoded.append((codes, parsed))
    if rejected:
        row, j, _ = min(rejected)
        more = sum(count for _, _, count in rejected) - 1
        cell = rows[columns[j]].iloc[row]
        shown = repr(cell if len(cell) <= 80 else cell[:80] + "...")
        after = f" ({more} more bad cell{'s' if more > 1 else ''} after it)" if more else ""
        raise ValueError(f"{path} line {_line(frame, rows.index[row])}: column {columns[j]!r} has {shown}; "
                         f"{advice}{after}")
    return decoded


def _zero_one(cell: str) -> float:
    """A label cell: 0 or 1 ('1', ' 1', '1.0'...); an empty cell is 0."""
    text = cell.strip()
    value = float(text) if text else 0.0
    if value not in (0.0, 1.0):
        raise ValueError(cell)
    return value


def _projection(cell: str) -> str | None:
    term = cell.strip().lower()
    if term not in _PROJECTION_TERMS and term not in _UNKNOWN_PROJECTION_TERMS:
        raise ValueError(cell)
    return _PROJECTION_TERMS.get(term)


def _projections(path: Path, frame: pd.DataFrame, rows: pd.DataFrame) -> list[str | None]:
    """`Projection` per row as 'frontal', 'lateral' or None; all None without the column."""
    if "Projection" not in rows.columns:
        return [None] * len(rows)
    [(codes, parsed)] = _parse_cells(path, frame, rows, ["Projection"], _projection, _PROJECTION_ADVICE)
    return [parsed[c] for c in codes]


def _image_paths(rows: pd.DataFrame) -> list[str]:
    """ImageID, under ImageDir where the CSV has that column and the cell is not empty."""
    ids = rows["ImageID"].tolist()
    if "ImageDir" not in rows.columns:
        return ids
    return [str(Path(d) / i) if d else i for d, i in zip(rows["ImageDir"].str.strip().tolist(), ids)]


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
    """The PadChest counts CSV: `path`, else $CXRLT_PADCHEST_COUNTS, else the packaged copy."""
    if path is None and os.environ.get(COUNTS_CSV_ENV):
        path = os.environ[COUNTS_CSV_ENV]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PadChest counts CSV {path} does not exist; pass an existing file")
        return path
    if PACKAGED_COUNTS_CSV.is_file():
        return PACKAGED_COUNTS_CSV
    raise FileNotFoundError(f"PadChest counts CSV not found at {PACKAGED_COUNTS_CSV}; pass its path or set ${COUNTS_CSV_ENV}")


def _split_terms(cell: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (cell or "").split("|") if t.strip())


def load_padchest_counts(path: str | os.PathLike | None = None) -> dict[str, ClassCounts]:
    """Read the counts CSV into {contract label: ClassCounts}, in ALL_LABELS order.

    The CSV's `cls` names are matched to the contract case-insensitively (it spells
    'Goiter' where the contract says 'goiter'); rows of other classes are skipped.
    """
    csv_path = find_counts_csv(path)
    frame = _read_csv(csv_path)
    _require_columns(list(frame.columns), ("cls", "set", "core", "ext"), csv_path)
    rows = _data_rows(csv_path, frame, "cls")
    labels = rows["cls"].str.strip().str.lower().map({label.lower(): label for label in ALL_LABELS})
    rows = rows[labels.notna()]  # challenge classes only
    count_columns = [k for k in frame.columns if k.split("_")[0] in ("core", "ext") and "_" in k]
    decoded = _parse_cells(csv_path, frame, rows, count_columns, int, "use a whole number of images")
    table: dict[str, ClassCounts] = {}
    for i, (label, task_set, core, ext) in enumerate(zip(labels.dropna(), rows["set"], rows["core"], rows["ext"])):
        counts = {k: parsed[codes[i]] for k, (codes, parsed) in zip(count_columns, decoded)}
        table[label] = ClassCounts(label, task_set, _split_terms(core), _split_terms(ext), counts)
    missing = [label for label in ALL_LABELS if label not in table]
    if missing:
        raise ValueError(f"counts CSV {csv_path} lacks the classes {missing}; use the project's file")
    return {label: table[label] for label in ALL_LABELS}


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


def read_cxrlt_csv(path: str | os.PathLike, labels: Sequence[str] = ALL_LABELS) -> LabelTable:
    """Read a CXR-LT 2026 label CSV (gzip etc. by suffix).

    Requires `ImageID`, `PatientID` and one 0/1 column per class of `labels` (exact name,
    else case-insensitive). `Projection` (frontal/lateral or PA/AP/L...; empty, COSTAL,
    EXCLUDE or UNK for unknown) and `ImageDir` (prefixed to ImageID) are used when present;
    any other column is ignored. Blank label cells count as 0; blank lines are skipped.
    """
    path = Path(path)
    frame = _read_csv(path)
    fields = list(frame.columns)
    _require_columns(fields, ("ImageID", "PatientID"), path)
    by_lower = {f.lower(): f for f in fields}
    columns = [label if label in fields else by_lower.get(label.lower()) for label in labels]
    missing = [label for label, column in zip(labels, columns) if not column]
    if missing:
        raise ValueError(
            f"{path} lacks the class column(s) {missing}; a CXR-LT CSV needs one 0/1 column per "
            "class in cxrlt.contract.labels order (pass labels=TASK1_LABELS for a Task-1-only file)"
        )
    rows = _data_rows(path, frame, "ImageID")
    decoded = _parse_cells(path, frame, rows, columns, _zero_one, "use 0 or 1 (an empty cell counts as 0)")
    matrix = np.zeros((len(rows), len(columns)), dtype=np.float32)
    for j, (codes, parsed) in enumerate(decoded):
        matrix[:, j] = np.asarray(parsed, dtype=np.float32)[codes]
    return LabelTable(rows["ImageID"].tolist(), rows["PatientID"].tolist(), _projections(path, frame, rows),
                      matrix, tuple(labels), _image_paths(rows))


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
    """Read the original PadChest label file (plain or .gz) and map its terms to the challenge classes.

    label_map: a YAML path, an already loaded {class: terms} mapping, or None for the
    packaged `padchest_label_map.yaml`. Rows whose Projection is COSTAL, EXCLUDE, UNK or
    empty are dropped unless `drop_unknown_projection` is False; any other term than those
    and PA/AP/AP_horizontal/L is an error.
    """
    path = Path(path)
    if isinstance(label_map, Mapping):
        term_map = {label: frozenset(t.lower() for t in label_map[label]) for label in labels}
    else:
        term_map = load_padchest_label_map(label_map, include_ext=include_ext, labels=labels)
    frame = _read_csv(path)
    _require_columns(list(frame.columns), ("ImageID", "PatientID", "Projection", "Labels"), path)
    rows = _data_rows(path, frame, "ImageID")
    projections = _projections(path, frame, rows)
    if drop_unknown_projection:
        rows = rows[np.array([p is not None for p in projections], dtype=bool)]
        projections = [p for p in projections if p is not None]
    [(codes, terms)] = _parse_cells(
        path, frame, rows, ["Labels"], parse_padchest_labels,
        "use a Python-list-like string such as \"['cardiomegaly', 'pleural effusion']\"",
    )
    vectors = np.zeros((len(terms), len(labels)), dtype=np.float32)  # one per distinct Labels cell
    for k, cell_terms in enumerate(terms):
        vectors[k] = [not term_map[label].isdisjoint(cell_terms) for label in labels]
    return LabelTable(rows["ImageID"].tolist(), rows["PatientID"].tolist(), projections, vectors[codes],
                      tuple(labels), _image_paths(rows))


def read_labels(path: str | os.PathLike, labels: Sequence[str] = ALL_LABELS) -> LabelTable:
    """A CXR-LT label CSV, or PadChest's own label file (a `Labels` column of terms and no class
    columns), whose terms the packaged map turns into the classes (`read_padchest_csv`)."""
    try:
        columns = {str(c).lower() for c in pd.read_csv(path, nrows=0).columns}
    except (ValueError, UnicodeDecodeError):  # empty, unparsable: read_cxrlt_csv names the problem
        columns = set()
    if "labels" in columns and not {label.lower() for label in labels} & columns:
        return read_padchest_csv(path, labels=labels)
    return read_cxrlt_csv(path, labels=labels)


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
                 loader: Callable[[Path], np.ndarray] = load_pixels) -> None:
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
