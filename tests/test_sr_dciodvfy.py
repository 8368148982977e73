"""Every SR the product writes is valid against its IOD: dicom3tools' dciodvfy finds no error."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cxrlt.io import reports
from tests.test_reports import make_result, source_dataset  # noqa: F401 (a fixture)


@pytest.mark.parametrize("random_weights", [False, True])
def test_dciodvfy_finds_no_error_in_the_sr(tmp_path, source_dataset, random_weights):  # noqa: F811
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy is missing: apt-get install dicom3tools (.ci/run installs it)"
    result = make_result(source_dataset.SOPInstanceUID, random_weights=random_weights)
    sr = reports.build_sr(result, source_dataset, uids=reports.derived_uids(source_dataset, "ab" * 32))
    path = reports.save_sr(sr, tmp_path / "sr.dcm")
    output = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    text = output.stdout + output.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, text
    assert "ComprehensiveSR" in text, text  # it checked the IOD the SR claims
