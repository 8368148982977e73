"""What the service accepts as a chest radiograph from a DICOM header: the one rule set.

Every DICOM path (`cxrlt classify`, the DICOM node, the DICOMweb backfill, anything calling
`cxrlt.io.images.load_image`) applies these rules before a pixel is decoded; the server then
checks the pixels (docs/contract.md) and, in a repository with a fitted gate, how far the image
lies from the training images (docs/gate.md). Plain values only, so the contract stays free of
pydicom: callers hand in the header's strings.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["ACCEPTED_MODALITIES", "CHEST_BODY_PARTS", "RADIOGRAPHY_SOP_CLASSES", "SECONDARY_CAPTURE_SOP_CLASSES",
           "IMAGE_SOP_CLASSES", "NotAChestRadiograph", "check_header", "body_part_problem", "modality_problem"]

# Projection radiography.
ACCEPTED_MODALITIES = ("CR", "DX")
# BodyPartExamined values taken as a chest (upper case, matched as substrings); an empty or absent
# BodyPartExamined is accepted (many CR/DX exports leave it empty). Local terms exist (TORAX, PECHO).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "TORAX", "LUNG", "PECHO", "TORACE")
# CR and DX SOP classes: accepted for files that omit Modality (Type 1, but PACS exports vary).
RADIOGRAPHY_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
)
# Secondary Capture: exported or scanned films arrive with Modality OT (or anything else), so these
# are accepted by SOP class whatever Modality says (the multi-frame grey ones holding one frame).
SECONDARY_CAPTURE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
)
# The SOP classes a radiograph can arrive in: what the backfill retrieves from a study.
IMAGE_SOP_CLASSES = RADIOGRAPHY_SOP_CLASSES + SECONDARY_CAPTURE_SOP_CLASSES


class NotAChestRadiograph(ValueError):
    """The header says the object is not a chest radiograph; the message says which tag and why."""


def modality_problem(modality: str, sop_class: str) -> str | None:
    """Why (modality, SOP class) is not a radiograph, or None when it is one."""
    modality = (modality or "").strip().upper()
    sop_class = (sop_class or "").strip()
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES or modality in ACCEPTED_MODALITIES:
        return None
    if not modality and sop_class in RADIOGRAPHY_SOP_CLASSES:
        return None
    return (f"modality {modality or 'unknown'} (SOP class {sop_class or 'unknown'}) is not a chest radiograph; "
            f"only {', '.join(ACCEPTED_MODALITIES)} and Secondary Capture images are accepted")


def body_part_problem(body_part: str, body_parts: Sequence[str] | None = None) -> str | None:
    """Why BodyPartExamined is not a chest (``body_parts``: the accepted terms, default
    CHEST_BODY_PARTS), or None when it is one or is empty."""
    terms = CHEST_BODY_PARTS if body_parts is None else tuple(t.strip().upper() for t in body_parts if t.strip())
    part = (body_part or "").strip().upper()
    if not part or any(term in part for term in terms):
        return None
    return f"body part {part!r} is not a chest (accepted: {', '.join(terms)}); only chest radiographs are classified"


def check_header(modality: str, sop_class: str, body_part: str, body_parts: Sequence[str] | None = None) -> None:
    """Raise NotAChestRadiograph when the header's modality, SOP class or body part rules the image out."""
    problem = body_part_problem(body_part, body_parts) or modality_problem(modality, sop_class)
    if problem:
        raise NotAChestRadiograph(problem)
