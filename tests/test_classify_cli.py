"""`cxrlt classify` and `cxrlt demo` end to end, against real tritonservers."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrlt.cli.main import main
from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS
from cxrlt.io.reports import read_sr_findings
from cxrlt.server.launcher import free_port
from tests.phi_sentinels import leaks, write_identified_dicom
from tests.serve_process import children

pytestmark = pytest.mark.e2e

UNCR_UID = str(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True).SOPInstanceUID)
J2KR_UID = str(pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"), stop_before_pixels=True).SOPInstanceUID)
STUDY_UID = str(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True).StudyInstanceUID)


def _ct_dicom(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((64, 64), 1000, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, synthetic_cxrs) -> Path:
    """Two good DICOMs (one without extension, one nested), a good PNG, and six bad inputs."""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copyfile(get_testdata_file("RG1_UNCR.dcm"), folder / "rg1_uncr")  # PACS exports often lack extensions
    (folder / "nested").mkdir()
    shutil.copyfile(get_testdata_file("RG1_J2KR.dcm"), folder / "nested" / "RG1_J2KR.dcm")
    Image.fromarray(synthetic_cxrs["frontal"]).save(folder / "frontal.png")
    (folder / "notes.txt").write_text("not an image\n")
    data = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    _ct_dicom(folder / "ct.dcm")
    # a real CR that is not a chest: pydicom-data's extremity radiograph (BodyPartExamined EXTREMITY)
    shutil.copyfile(get_testdata_file("RG3_UNCR.dcm"), folder / "extremity.dcm")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "tiny.png")  # the server refuses it
    (folder / ".DS_Store").write_bytes(b"\0\1junk")  # hidden: skipped, not reported
    return folder


GOOD = {"rg1_uncr", "RG1_J2KR.dcm", "frontal.png"}
BAD = {
    "notes.txt": "not a DICOM file",
    "truncated.dcm": "truncated",
    "ct.dcm": "modality CT",
    "extremity.dcm": "body part 'EXTREMITY' is not a chest",
    "tiny.png": "too small",
}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `cxrlt classify ARGV` in process: exit code, stdout, stderr with whitespace collapsed."""
    code = main(["classify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


@pytest.fixture(scope="module")
def json_run(url, mixed_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("json") / "results.json"
    code = main(["classify", str(mixed_folder), "--url", url, "--format", "json", "--out", str(out), "--concurrency", "3"])
    return code, _results(json.loads(out.read_text()))


def _results(entries: list[dict]) -> list[dict]:
    """The classified images of a JSON output (failed inputs are entries with an "error")."""
    return [entry for entry in entries if "error" not in entry]


def test_json_good_files_classified_bad_ones_reported(url, mixed_folder, capsys, tmp_path):
    code, _, err = _cli(capsys, str(mixed_folder), "--url", url, "--out", str(tmp_path / "r.json"))
    assert code == 2
    entries = json.loads((tmp_path / "r.json").read_text())
    assert {Path(r["source"]).name for r in _results(entries)} == GOOD
    failed = {Path(e["source"]).name: e["error"] for e in entries if "error" in e}
    assert set(failed) == set(BAD) and all(reason in failed[name] for name, reason in BAD.items())
    for name, reason in BAD.items():
        assert f"FAILED {mixed_folder / name}" in err, name
        assert reason in err.split(f"FAILED {mixed_folder / name}: ")[1].split(" FAILED ")[0], name
    assert ".DS_Store" not in err
    assert "classified 3 of 8 files" in err and "5 failed" in err
    assert "NOT FOR CLINICAL USE" in err  # the tiny repository has random weights


def test_json_content(json_run):
    code, results = json_run
    assert code == 2
    by_name = {Path(r["source"]).name: r for r in results}
    uncr, j2kr, png = by_name["rg1_uncr"], by_name["RG1_J2KR.dcm"], by_name["frontal.png"]
    assert list(uncr["probabilities"]) == list(ALL_LABELS)
    assert uncr["probabilities"] == j2kr["probabilities"]  # lossless twin
    assert (uncr["image_id"], j2kr["image_id"], png["image_id"]) == (UNCR_UID, J2KR_UID, "frontal")
    assert (uncr["hint"], uncr["projection"], uncr["hint_used"]) == ("PA", "frontal", True)
    assert png["hint"] is None and png["hint_used"] is False
    assert all(r["random_weights"] is True and r["model_name"] == "cxr_findings" for r in results)


def test_shared_memory_gives_the_same_results(url, mixed_folder, json_run, capsys, tmp_path):
    out = tmp_path / "shm.json"
    code, _, err = _cli(capsys, str(mixed_folder), "--url", url, "--out", str(out), "--concurrency", "3", "--shared-memory")
    assert code == 2 and "classified 3 of 8 files" in err  # the same files fail, for the same reasons
    by_source = {r["source"]: r["probabilities"] for r in json_run[1]}
    assert {r["source"]: r["probabilities"] for r in _results(json.loads(out.read_text()))} == by_source


def test_send_size_gives_nearly_the_same_results(url, mixed_folder, json_run, capsys, tmp_path):
    out = tmp_path / "small.json"
    code, _, err = _cli(capsys, str(mixed_folder), "--url", url, "--out", str(out), "--send-size")
    assert code == 2 and "classified 3 of 8 files" in err
    full = {r["source"]: np.array(list(r["probabilities"].values())) for r in json_run[1]}
    small = {r["source"]: np.array(list(r["probabilities"].values())) for r in _results(json.loads(out.read_text()))}
    assert set(small) == set(full)
    assert max(np.abs(full[k] - small[k]).max() for k in full) < 0.005
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(mixed_folder), "--url", url, "--send-size", "half"])
    assert exit_info.value.code == 2
    assert "--send-size takes a number of pixels or 'served', not 'half'" in capsys.readouterr().err


def test_csv_matches_the_challenge_format(url, mixed_folder, json_run, capsys, tmp_path):
    out = tmp_path / "submission.csv"
    code, _, _ = _cli(capsys, str(mixed_folder), "--url", url, "--format", "csv", "--out", str(out))
    assert code == 2
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ImageID", *ALL_LABELS]
    assert out.read_text().splitlines()[0] == "ImageID," + ",".join(ALL_LABELS)
    assert len(rows) == 1 + len(GOOD)
    expected = {r["image_id"]: r["probabilities"] for r in json_run[1]}
    assert {row[0] for row in rows[1:]} == set(expected)
    for row in rows[1:]:
        assert [float(v) for v in row[1:]] == [expected[row[0]][label] for label in ALL_LABELS]


def test_csv_task1_to_stdout_with_file_names(url, mixed_folder, capsys):
    code, out, _ = _cli(capsys, str(mixed_folder / "frontal.png"), str(mixed_folder / "rg1_uncr"), "--url", url,
                        "--format", "csv", "--task", "task1", "--image-id", "name")
    assert code == 0
    rows = list(csv.reader(out.splitlines()))
    assert rows[0] == ["ImageID", *TASK1_LABELS]
    assert [row[0] for row in rows[1:]] == ["frontal.png", "rg1_uncr"]


def test_sr_output_reads_back(url, mixed_folder, json_run, capsys, tmp_path):
    out = tmp_path / "sr"
    code, _, err = _cli(capsys, str(mixed_folder), "--url", url, "--format", "sr", "--out", str(out))
    assert code == 2
    assert f"FAILED {mixed_folder / 'frontal.png'}: SR output needs DICOM input" in err
    srs = sorted(out.iterdir())
    assert len(srs) == 2
    expected = {r["image_id"]: r["probabilities"] for r in json_run[1]}
    referenced = set()
    for path in srs:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "SR" and ds.StudyInstanceUID == STUDY_UID
        source_uid = str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                         .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        referenced.add(source_uid)
        findings = read_sr_findings(path)
        assert list(findings) == list(ALL_LABELS)
        assert findings == pytest.approx(expected[source_uid], abs=1e-12)
    assert referenced == {UNCR_UID, J2KR_UID}
    # The SRs' UIDs are the ones the DICOM node and `--dicomweb --store` derive: a second run rewrites the same UIDs.
    from cxrlt.client import CxrltClient
    from cxrlt.io.reports import derived_uids

    with CxrltClient(url) as client:
        sha256 = client.repository().sha256
    for path in srs:
        ds = pydicom.dcmread(path)
        source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm" if _references(ds) == UNCR_UID else "RG1_J2KR.dcm"),
                                 stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == derived_uids(source, sha256).sop_instance


def _references(ds) -> str:
    return str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def test_all_good_exits_zero_and_prints_json(url, capsys):
    code, out, err = _cli(capsys, get_testdata_file("RG1_UNCR.dcm"), "--url", url)
    assert code == 0
    [result] = json.loads(out)
    assert result["image_id"] == UNCR_UID and len(result["probabilities"]) == 36
    assert "classified 1 of 1 file" in err


def test_unreachable_server_exits_one_and_says_how_to_start_it(capsys):
    url = f"127.0.0.1:{free_port()}"
    code, out, err = _cli(capsys, get_testdata_file("RG1_UNCR.dcm"), "--url", url, "--retries", "1")
    assert code == 1 and out == ""
    assert url in err and "cxrlt serve" in err


def test_nothing_to_do_exits_one(url, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, str(tmp_path / "empty"), "--url", url)
    assert code == 1 and "no input files" in err
    code, _, err = _cli(capsys, str(tmp_path / "missing.dcm"), "--url", url)
    assert code == 1 and "no such file" in err
    code, _, err = _cli(capsys, str(tmp_path), "--url", url, "--model", "cxr_classifier", "--task", "all")
    assert code == 1 and "--model cxr_findings" in err
    code, _, err = _cli(capsys, str(tmp_path), "--url", url, "--format", "sr")
    assert code == 1 and "--out DIRECTORY" in err


# ----------------------------------------------------------------------------- demo


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_end_to_end(tmp_path):
    """`cxrlt demo --image` builds the tiny repository, starts its own server, classifies a real
    radiograph (RG1_UNCR carrying sentinel identifiers), stops; no identifier in its output or logs."""
    image = write_identified_dicom(tmp_path / "study" / "image.dcm")
    env = dict(os.environ, COLUMNS="160")
    completed = subprocess.run(
        [sys.executable, "-m", "cxrlt", "demo", "--image", str(image), "--keep"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=280,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    kept = re.findall(r"kept (\S+) \(repository and server log\)", " ".join(output.split()))
    try:
        logs = [log for folder in kept for log in Path(folder).rglob("*.log")]
        assert logs, output[-2000:]
        for text in (output, *(log.read_text(errors="replace") for log in logs)):
            assert not leaks(text), leaks(text)
    finally:
        for folder in kept:
            shutil.rmtree(folder, ignore_errors=True)
    assert "projection: frontal" in output and "ViewPosition PA" in output and "hint used: yes" in output
    assert "NOT DIAGNOSTIC" in output and "random weights" in output
    assert all(label in completed.stdout for label in ALL_LABELS)
    assert "latency:" in output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_stops_its_server_on_ctrl_c(tmp_path, tiny_repository):
    """On the session's repository (--repo): building is the other demo test's business."""
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    # A job started in the background by a shell without job control (as CI runners may start
    # the tests) inherits SIGINT ignored, and Python then leaves it ignored: give the demo the
    # disposition a terminal's Ctrl-C meets.
    demo = subprocess.Popen([sys.executable, "-m", "cxrlt", "demo", "--repo", str(tiny_repository)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        server_pid = None
        while server_pid is None and time.monotonic() < deadline and demo.poll() is None:
            server_pid = next((pid for pid, cmd in children(demo.pid).items() if "tritonserver" in cmd), None)
            time.sleep(0.2)
        assert server_pid is not None, "the demo never started tritonserver"
        time.sleep(1.0)
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, output[-2000:]
    assert "interrupted" in output
    assert not Path(f"/proc/{server_pid}").exists() or "zombie" in Path(f"/proc/{server_pid}/status").read_text()
    assert not list(tmp_path.glob("cxrlt-demo-*"))  # the temporary folder is removed too
