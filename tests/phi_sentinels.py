"""Sentinel patient identifiers: a real radiograph carrying them, and a check for where they leak."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

SENTINELS = {
    "PatientName": "Sentinel^Phiname",
    "PatientID": "SENTINELPID-4711",
    "AccessionNumber": "SENTACC0815",
    "PatientBirthDate": "19230417",
    "InstitutionName": "Sentinel General Hospital",
}


def write_identified_dicom(path: Path) -> Path:
    """RG1_UNCR (a real PA chest CR) with the sentinels in its identifying attributes."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    for keyword, value in SENTINELS.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def leaks(text: str) -> list[str]:
    """The sentinels found in `text` (also a person name with its ^ written as a space)."""
    return [f"{k}={v!r}" for k, v in SENTINELS.items() if v in text or v.replace("^", " ") in text]
