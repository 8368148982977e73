"""Every SR the product writes is valid against its IOD: dicom3tools' dciodvfy finds no error, and the
only coded concepts it does not recognise are the private codes of findings SNOMED has no concept for."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pydicom
import pytest

from cxrlt.io import reports
from cxrlt.io.finding_codes import PRIVATE_SCHEME, finding_codes
from tests.test_reports import (REPOSITORY, make_result, make_study, source_dataset, study_points,  # noqa: F401
                                study_sources, with_decisions)

PRIVATE_WARNING = f"Unrecognized defined term <{PRIVATE_SCHEME}>"


def _dciodvfy(path) -> str:
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy is missing: apt-get install dicom3tools (.ci/run installs it)"
    output = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return output.stdout + output.stderr


def _private_codes(dataset) -> list[str]:
    """CodeMeaning of every 99CXRLT-coded item in the SR (content tree and headers; '' for the scheme's
    own identification item)."""
    return [str(item.get("CodeMeaning", "")) for item in _walk(dataset)
            if item.get("CodingSchemeDesignator") == PRIVATE_SCHEME]


def _walk(dataset):
    yield dataset
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _check(path, codes_per_group: int) -> None:
    """codes_per_group: how often a group names its finding (finding type, NUM concept, and the present/absent
    evaluation when there are decisions)."""
    text = _dciodvfy(path)
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, text
    assert "ComprehensiveSR" in text, text  # it checked the IOD the SR claims
    warnings = [line for line in text.splitlines() if line.startswith("Warning")]
    assert not [line for line in warnings if "<SCT>" in line or "<UCUM>" in line or "<DCM>" in line], text
    private_warnings = [line for line in warnings if PRIVATE_WARNING in line]
    meanings = _private_codes(pydicom.dcmread(path))
    # Every private-code warning is a private code in the SR, and every private code is a finding the
    # table has no SNOMED concept for (or the coding scheme's own identification, which has no meaning).
    assert len(private_warnings) == len(meanings), text
    private_labels = {label for label, code in finding_codes().items() if code.scheme == PRIVATE_SCHEME}
    assert {meaning for meaning in meanings if meaning} == private_labels
    assert len(private_warnings) == codes_per_group * len(private_labels) + 1  # + the scheme's identification
    # What is left is the source's own header (its Referring Physician's Name).
    assert all(PRIVATE_WARNING in line or "Referring Physician" in line for line in warnings), text


@pytest.mark.parametrize(("random_weights", "decisions"), [(False, False), (True, False), (False, True)])
def test_dciodvfy_finds_no_error_in_the_image_sr(tmp_path, source_dataset, random_weights, decisions):  # noqa: F811
    result = make_result(source_dataset.SOPInstanceUID, random_weights=random_weights)
    # with decisions, also a release (its number joins the algorithm parameters)
    result = dataclasses.replace(with_decisions(result), release=2) if decisions else result
    sr = reports.build_sr(result, source_dataset, uids=reports.derived_uids(source_dataset, REPOSITORY))
    _check(reports.save_sr(sr, tmp_path / "sr.dcm"), 3 if decisions else 2)


def test_dciodvfy_finds_no_error_in_the_study_sr(tmp_path, source_dataset):  # noqa: F811
    sources = study_sources(source_dataset, tmp_path)
    study = make_study(sources, study_points())
    uids = reports.derived_study_uids(study.study_instance_uid, REPOSITORY)
    _check(reports.save_sr(reports.build_study_sr(study, sources, uids=uids), tmp_path / "study.dcm"), 3)
