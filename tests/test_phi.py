"""No patient identifiers in logs or outputs: only the DICOM SR carries the patient module.

A real radiograph gets sentinel values in the identifying attributes; after classifying it in
every format (verbose) against a server at --log-verbose 1, no sentinel may appear in any
stdout, stderr, server log, JSON or CSV (the demo is checked the same way in
test_classify_cli.py). The SR, which belongs to the study,
must carry them; the request the client sends holds the pixels and the hint only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.phi_sentinels import SENTINELS, leaks, write_identified_dicom

@pytest.fixture(scope="module")
def identified_dicom(tmp_path_factory) -> Path:
    return write_identified_dicom(tmp_path_factory.mktemp("phi") / "study" / "image.dcm")


def _cxrlt(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrlt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


@pytest.mark.timeout(900)
def test_no_identifier_reaches_logs_or_outputs_only_the_sr(serve, identified_dicom, tmp_path):
    log = tmp_path / "tritonserver.log"
    server = serve("--log-verbose", "1", "--log-file", str(log))
    outputs = {"json": tmp_path / "out.json", "csv": tmp_path / "out.csv", "sr": tmp_path / "sr"}
    texts = []
    for fmt, out in outputs.items():
        run = _cxrlt("-v", "classify", str(identified_dicom), "--url", server.url, "--format", fmt, "--out", str(out),
                     cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        texts += [run.stdout, run.stderr]
    texts += [outputs["json"].read_text(), outputs["csv"].read_text(), server.output]
    server.stop()
    texts.append(log.read_text(errors="replace"))
    assert "HTTP request" in texts[-1] or "infer" in texts[-1].lower(), "the server log is not verbose"
    for text in texts:
        assert not leaks(text), leaks(text)
    (sr_path,) = list(outputs["sr"].glob("*.dcm"))
    sr = pydicom.dcmread(sr_path)
    assert str(sr.PatientName) == SENTINELS["PatientName"] and sr.PatientID == SENTINELS["PatientID"]
    assert sr.AccessionNumber == SENTINELS["AccessionNumber"]


def test_the_client_sends_pixels_the_hint_and_a_hashed_study_only(monkeypatch, identified_dicom, url):
    """Everything the SDK hands tritonclient for an inference: no header, no request parameter, no UID.
    (CxrltClient runs AsyncCxrltClient, which calls tritonclient.grpc.aio.)"""
    import tritonclient.grpc.aio as aioclient

    from cxrlt.client import CxrltClient
    from cxrlt.contract.releases import study_key

    sent = []
    original = aioclient.InferenceServerClient.infer

    async def record(self, model_name, inputs, *args, **kwargs):
        sent.append((model_name, {i.name(): i for i in inputs}, kwargs))
        return await original(self, model_name, inputs, *args, **kwargs)

    monkeypatch.setattr(aioclient.InferenceServerClient, "infer", record)
    with CxrltClient(url) as client:
        result = client.classify_file(identified_dicom)
    assert result.projection == "frontal"
    ((model, inputs, kwargs),) = sent
    assert set(inputs) == {"IMAGE", "PROJECTION_HINT", "STUDY_KEY"} and inputs["IMAGE"].datatype() == "UINT16"
    assert inputs["PROJECTION_HINT"]._raw_content.endswith(b"PA")
    # the study goes as the SHA-256 of its UID (a canary answers whole studies), never the UID itself
    study = str(pydicom.dcmread(identified_dicom).StudyInstanceUID)
    assert inputs["STUDY_KEY"]._raw_content.endswith(study_key(study).encode())
    assert study.encode() not in inputs["STUDY_KEY"]._raw_content
    assert not kwargs.get("parameters") and not kwargs.get("headers")
    assert not kwargs.get("request_id") or not leaks(str(kwargs["request_id"]))
