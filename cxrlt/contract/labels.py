"""The label space of the challenge. The order of each tuple is the contract."""

from __future__ import annotations

TASK1_LABELS: tuple[str, ...] = (
    "Normal", "aortic elongation", "cardiomegaly", "pleural effusion", "Nodule",
    "atelectasis", "pleural thickening", "aortic atheromatosis", "Support Devices",
    "alveolar pattern", "fracture", "Hernia", "Emphysema", "azygos lobe",
    "Hydropneumothorax", "Kyphosis", "Mass", "Pneumothorax", "Subcutaneous Emphysema",
    "pneumoperitoneo", "vascular hilar enlargement", "vertebral degenerative changes",
    "hyperinflated lung", "interstitial pattern", "central venous catheter",
    "hypoexpansion", "bronchiectasis", "hemidiaphragm elevation", "sternotomy",
    "calcified densities",
)
TASK2_LABELS: tuple[str, ...] = (
    "Scoliosis", "Osteopenia", "Bulla", "Infarction", "Adenopathy", "goiter",
)
ALL_LABELS: tuple[str, ...] = TASK1_LABELS + TASK2_LABELS
NORMAL_INDEX = TASK1_LABELS.index("Normal")

PROJECTIONS: tuple[str, ...] = ("frontal", "lateral")

# DICOM ViewPosition terms accepted as a projection hint.
_VIEW_POSITION_TO_PROJECTION = {
    "PA": "frontal",
    "AP": "frontal",
    "LL": "lateral",
    "RL": "lateral",
    "LATERAL": "lateral",
}
ACCEPTED_HINTS: tuple[str, ...] = tuple(_VIEW_POSITION_TO_PROJECTION)


def projection_from_hint(hint: str | bytes | None) -> str | None:
    """Map a DICOM ViewPosition term to a projection.

    An empty or missing hint means "no hint" (returns None); any other unknown term
    raises ValueError so a caller cannot silently lose a hint it meant to send.
    """
    if hint is None:
        return None
    if isinstance(hint, bytes):
        hint = hint.decode("utf-8", errors="replace")
    term = hint.strip().upper()
    if not term:
        return None
    try:
        return _VIEW_POSITION_TO_PROJECTION[term]
    except KeyError:
        raise ValueError(
            f"unknown projection hint {hint!r}; expected one of "
            f"{', '.join(ACCEPTED_HINTS)} or an empty string for no hint"
        ) from None


def label_file_text(labels: tuple[str, ...]) -> str:
    """Contents of a Triton `label_filename` file: one label a line, in output order."""
    return "\n".join(labels) + "\n"
