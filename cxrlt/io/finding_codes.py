"""The coded concept of each finding, from the table shipped in the package.

``cxrlt/contract/data/finding_codes.yaml`` holds one entry per label of ``ALL_LABELS``: a SNOMED CT
concept (scheme ``SCT``) checked against the public source it names, or the private cxrlt scheme
(``99CXRLT``) where no SNOMED concept was found. The SR codes its findings with it and reads labels
back through it.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

import yaml

from cxrlt.contract.labels import ALL_LABELS

__all__ = ["PRIVATE_SCHEME", "SNOMED_SCHEME", "NO_SNOMED_CONCEPT", "FindingCode", "finding_codes", "label_for_code"]

PRIVATE_SCHEME = "99CXRLT"
SNOMED_SCHEME = "SCT"
NO_SNOMED_CONCEPT = "no SNOMED concept found"  # the note a private entry must carry
_TABLE = "finding_codes.yaml"


@dataclasses.dataclass(frozen=True)
class FindingCode:
    """One finding's code: scheme, value and meaning, and the public source it was checked against."""

    label: str
    scheme: str
    value: str
    meaning: str
    source: str
    url: str
    note: str = ""


@functools.lru_cache(maxsize=1)
def finding_codes() -> dict[str, FindingCode]:
    """label -> its code, in contract order (the table is checked: every label exactly once)."""
    text = resources.files("cxrlt.contract").joinpath("data", _TABLE).read_text(encoding="utf-8")
    entries = yaml.safe_load(text)["findings"]
    codes = [FindingCode(str(e["label"]), str(e["scheme"]), str(e["code"]), str(e["meaning"]), str(e["source"]),
                         str(e["url"]), str(e.get("note", ""))) for e in entries]
    return _checked(codes)


def _checked(codes: list[FindingCode]) -> dict[str, FindingCode]:
    labels = [code.label for code in codes]
    if sorted(labels) != sorted(ALL_LABELS):
        missing = sorted(set(ALL_LABELS) - set(labels))
        extra = sorted({label for label in labels if labels.count(label) > 1 or label not in ALL_LABELS})
        raise ValueError(f"{_TABLE}: each finding must appear once (missing {missing}, extra or repeated {extra})")
    for code in codes:
        if code.scheme not in (SNOMED_SCHEME, PRIVATE_SCHEME):
            raise ValueError(f"{_TABLE}: {code.label!r} has scheme {code.scheme!r}; use {SNOMED_SCHEME} or {PRIVATE_SCHEME}")
        if code.scheme == PRIVATE_SCHEME and NO_SNOMED_CONCEPT not in code.note:
            raise ValueError(f"{_TABLE}: {code.label!r} has a private code but no note saying {NO_SNOMED_CONCEPT!r}")
        if not (code.source and code.url.startswith("https://")):
            raise ValueError(f"{_TABLE}: {code.label!r} names no source (a name and an https URL)")
    pairs = [(code.scheme, code.value) for code in codes]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"{_TABLE}: two findings share a code; a code must map back to one label")
    by_label = {code.label: code for code in codes}
    return {label: by_label[label] for label in ALL_LABELS}


def label_for_code(scheme: str, value: str, meaning: str = "") -> str | None:
    """The label coded as (scheme, value); SRs written before the table (every finding private, its
    meaning the label) are read by meaning. None for a code that is no finding."""
    for code in finding_codes().values():
        if (code.scheme, code.value) == (scheme, value):
            return code.label
    if scheme == PRIVATE_SCHEME and meaning in ALL_LABELS:
        return meaning
    return None
