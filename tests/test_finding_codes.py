"""The findings' code table (cxrlt/contract/data/finding_codes.yaml): complete, checked against DICOM PS3.16."""

from __future__ import annotations

import re

import pytest
from pydicom.sr import _concepts_dict
from pydicom.sr.codedict import codes

from cxrlt.contract.labels import ALL_LABELS
from cxrlt.io import finding_codes as table
from cxrlt.io.finding_codes import NO_SNOMED_CONCEPT, PRIVATE_SCHEME, SNOMED_SCHEME, FindingCode, finding_codes


def _pydicom_sct() -> dict[str, tuple[set[str], set[int]]]:
    """SNOMED code -> (its meanings, the PS3.16 context groups that list it), from pydicom's PS3.16 dictionary."""
    found: dict[str, tuple[set[str], set[int]]] = {}
    for by_code in _concepts_dict.concepts["SCT"].values():
        for code, (meaning, cids) in by_code.items():
            meanings, groups = found.setdefault(code, (set(), set()))
            meanings.add(meaning)
            groups.update(cids)
    return found


PYDICOM_SCT = _pydicom_sct()


def test_every_finding_is_coded_once_in_contract_order():
    codes_ = finding_codes()
    assert list(codes_) == list(ALL_LABELS)
    assert all(code.label == label for label, code in codes_.items())
    pairs = [(code.scheme, code.value) for code in codes_.values()]
    assert len(set(pairs)) == len(ALL_LABELS)


def test_snomed_entries_equal_dicom_ps3_16():
    """Each SCT code is in pydicom's PS3.16 dictionary with the same meaning, and the context group the
    entry names as its source lists it."""
    snomed = [code for code in finding_codes().values() if code.scheme == SNOMED_SCHEME]
    assert len(snomed) >= 8, "most common chest findings have a SNOMED concept"
    for code in snomed:
        if "not in DICOM PS3.16" in code.note:  # checked on the page it names instead
            assert code.value not in PYDICOM_SCT and code.value in code.source and code.url.startswith("https://")
            continue
        assert code.value in PYDICOM_SCT, f"{code.label}: {code.value} is not in DICOM PS3.16"
        meanings, cids = PYDICOM_SCT[code.value]
        assert code.meaning in meanings, f"{code.label}: {code.meaning!r} is not PS3.16's meaning {sorted(meanings)}"
        cid = int(re.search(r"CID (\d+)", code.source).group(1))
        assert cid in cids and code.url.endswith(f"sect_CID_{cid}.html"), code.label
    for label, value in (("Pneumothorax", "36118008"), ("pleural effusion", "60046008"), ("Nodule", "27925004"),
                         ("Mass", "4147007"), ("cardiomegaly", "287272002"), ("Emphysema", "87433001"),
                         ("bronchiectasis", "12295008"), ("fracture", "125605004")):
        assert (finding_codes()[label].scheme, finding_codes()[label].value) == (SNOMED_SCHEME, value)


def test_private_codes_only_where_no_snomed_concept_was_found():
    for code in finding_codes().values():
        assert code.source and code.url.startswith("https://"), code.label
        if code.scheme == PRIVATE_SCHEME:
            assert NO_SNOMED_CONCEPT in code.note, code.label
            assert code.meaning == code.label
            # No PS3.16 concept carries the finding's name: it would have been used.
            same_name = [value for value, (meanings, _) in PYDICOM_SCT.items()
                         if code.label.lower() in {m.lower() for m in meanings}]
            assert not same_name, f"{code.label}: PS3.16 has {same_name}"


def test_present_and_absent_are_dicom_cid_240():
    assert (codes.SCT.Present.value, codes.SCT.Present.meaning) == ("52101004", "Present")
    assert (codes.SCT.Absent.value, codes.SCT.Absent.meaning) == ("272519000", "Absent")
    assert {240, 241} <= PYDICOM_SCT["52101004"][1] and {240, 241} <= PYDICOM_SCT["272519000"][1]


def test_codes_map_back_to_labels():
    assert table.label_for_code("SCT", "36118008") == "Pneumothorax"
    assert table.label_for_code(PRIVATE_SCHEME, "T1-02") == "aortic elongation"
    # SRs written before the table coded every finding privately with the label as meaning.
    assert table.label_for_code(PRIVATE_SCHEME, "T1-03", "cardiomegaly") == "cardiomegaly"
    assert table.label_for_code("SCT", "0000", "cardiomegaly") is None
    assert table.label_for_code("DCM", "121071", "Finding") is None


def _entries() -> list[FindingCode]:
    return list(finding_codes().values())


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e[1:], "each finding must appear once"),
    (lambda e: [*e, e[0]], "each finding must appear once"),
    (lambda e: [FindingCode(e[0].label, PRIVATE_SCHEME, "X", e[0].label, "s", "https://x"), *e[1:]], "no note saying"),
    (lambda e: [FindingCode(e[0].label, "RADLEX", "X", "m", "s", "https://x", "n"), *e[1:]], "use SCT or 99CXRLT"),
    (lambda e: [FindingCode(e[0].label, "SCT", "1", "m", "", "https://x"), *e[1:]], "names no source"),
    (lambda e: [e[0], FindingCode(e[1].label, e[0].scheme, e[0].value, "m", "s", "https://x"), *e[2:]], "share a code"),
])
def test_a_bad_table_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        table._checked(change(_entries()))
