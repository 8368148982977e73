"""Releases through a real tritonserver (docs/releases.md): two releases side by side in one
repository, and shadow, canary, promotion and rollback switched while locust loads the server and a
DICOM node classifies, with no request failing and each answer naming, and equal to, its release."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrlt.contract.releases import read_release
from cxrlt.server.launcher import free_port
from tests.serve_process import Serve, stop_later
from tests.test_dicom_node import NODE_AET, Node, sample_file, store, wait_for

pytestmark = pytest.mark.e2e

STUDIES = [f"1.2.826.0.1.3680043.10.999.{i}" for i in range(24)]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """Release 1 (seed 0) and release 2 (seed 1) of the tiny profile in one repository."""
    from exporters.build_repo import BuildOptions, build_repository

    repo = tmp_path_factory.mktemp("releases") / "repo"
    build_repository(repo, BuildOptions(allow_random=True, seed=0, bls_instances=2))
    build_repository(repo, BuildOptions(allow_random=True, seed=1, bls_instances=2, release=2))
    return repo


@pytest.fixture(scope="module")
def server(repository):
    served = Serve(repository)
    try:
        served.wait_ready()
        yield served
    finally:
        stop_later(served.stop)


@pytest.fixture(scope="module")
def references(repository):
    """Each release's in-process pipeline (its own ONNX versions, files and parameters)."""
    from evaluation.reference import ReferencePipeline

    return {n: ReferencePipeline(repository, engine="onnxruntime", threads=1, release=n) for n in (1, 2)}


def _answer(client, image, study: str | None = None):
    return client.classify(image, image_id="x", study_uid=study)


def _assert_reference(result, references, image) -> None:
    probabilities, _ = references[result.release].findings(image, None)
    np.testing.assert_allclose(list(result.probabilities.values()), probabilities, atol=1e-5, rtol=0)


def test_two_releases_live_side_by_side_and_each_answer_names_its_own(server, repository, references, real_cxr, cxrlt, tmp_path):
    import tritonclient.grpc as grpcclient

    from cxrlt.client.sdk import CxrltClient

    with grpcclient.InferenceServerClient(server.url) as raw:
        for model in ("projection_router", "ensemble_lateral_swin", "clip_image_encoder"):
            assert raw.is_model_ready(model, "1") and raw.is_model_ready(model, "2"), model
    identities = {n: read_release(repository, n)["repository_sha256"] for n in (1, 2)}
    assert identities[1] != identities[2]
    with CxrltClient(server.url) as client:
        result = _answer(client, real_cxr)
    assert result.release == 1 and result.repository_sha256 == identities[1]
    _assert_reference(result, references, real_cxr)
    assert cxrlt("release", "list", "--repo", repository, "--url", server.url, "--json", tmp_path / "list.json") == 0
    listed = json.loads((tmp_path / "list.json").read_text())["releases"]
    assert [(r["release"], r["role"], r["sha256"]) for r in listed] == [(1, "live", identities[1]), (2, "", identities[2])]


class _SrReceiver:
    """A PACS-like Storage SCP on loopback that keeps every SR the node sends."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage

        self.folder, self.port, self.received = folder, free_port(), []
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        self.received.append(path)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


LOCUST_S = 50  # the load lasts past the last switch (asserted): about 35 s in on 2 cores


def _locust(url: str, out: Path, seconds: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxrlt", "loadtest", "--url", url, "--users", "2", "--spawn-rate", "2",
                             "--duration-s", f"{seconds}s", "--no-metrics", "--out", str(out), "--json", str(out / "report.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_shadow_canary_promote_and_rollback_under_locust_fail_no_request(server, repository, references, real_cxr, cxrlt,
                                                                         tmp_path):
    from cxrlt.client.sdk import CxrltClient
    from cxrlt.io.reports import read_sr_release

    receiver = _SrReceiver(tmp_path / "pacs")
    node = Node(tmp_path / "spool", server, "--destination", f"PACS@127.0.0.1:{receiver.port}")
    locust, locust_started = _locust(server.url, tmp_path / "locust", LOCUST_S), time.monotonic()
    release = ["release", "--repo", repository, "--url", server.url]
    identities = {n: read_release(repository, n)["repository_sha256"] for n in (1, 2)}
    image_file = sample_file("RG1_UNCR.dcm")
    try:
        node.start()
        with CxrltClient(server.url) as client:
            time.sleep(5)  # locust under way
            # shadow: release 2 runs beside every request, release 1 answers
            assert cxrlt(*release, "shadow", "2", "--fraction", "1") == 0
            for _ in range(3):
                result = _answer(client, real_cxr)
                assert result.release == 1
                _assert_reference(result, references, real_cxr)
            time.sleep(6)  # the metrics' flush
            assert cxrlt(*release, "report", "--metrics-url", f"http://127.0.0.1:{server.ports['metrics']}/metrics",
                         "--json", tmp_path / "report.json") in (0, 1)
            report = json.loads((tmp_path / "report.json").read_text())["candidates"]["2"]
            assert report["images"] >= 3 and len(report["findings"]) == 36
            assert all(0.0 <= row["flip_rate"] <= 1.0 for row in report["findings"].values())

            # canary: half the studies answered by release 2, each study always by the same release
            assert cxrlt(*release, "canary", "2", "--percent", "50") == 0
            answered = {}
            for study in STUDIES:
                first, again = _answer(client, real_cxr, study), _answer(client, real_cxr, study)
                assert first.release == again.release and first.repository_sha256 == identities[first.release]
                answered[study] = first.release
                _assert_reference(first, references, real_cxr)
            assert set(answered.values()) == {1, 2}

            # promote 2, then an image through the node: its SR names release 2
            assert cxrlt(*release, "promote", "2") == 0
            result = _answer(client, real_cxr)
            assert result.release == 2
            _assert_reference(result, references, real_cxr)
            assert store(node.port, NODE_AET, image_file) == [0]
            wait_for(lambda: len(receiver.received) >= 1, 60, "the node's SR under release 2")

            # rollback, timed from the command to the first answer by release 1
            started = time.monotonic()
            assert cxrlt(*release, "rollback") == 0
            result = _answer(client, real_cxr)
            rollback_s = time.monotonic() - started
            assert result.release == 1 and rollback_s < 60
            _assert_reference(result, references, real_cxr)
            print(f"rollback took {rollback_s:.1f} s, {time.monotonic() - locust_started:.0f} s into the load")
            assert locust.poll() is None, f"locust ended before the rollback: raise LOCUST_S ({LOCUST_S} s)"
        assert store(node.port, NODE_AET, image_file) == [0]
        wait_for(lambda: len(receiver.received) >= 2, 60, "the node's SR under release 1")
        releases = [read_sr_release(path) for path in receiver.received]
        assert releases == [(2, identities[2]), (1, identities[1])]
        assert len({pydicom.dcmread(p).SOPInstanceUID for p in receiver.received}) == 2  # another release, another SR
        output, _ = locust.communicate(timeout=120)
        assert locust.returncode == 0, output[-3000:]
        stats = json.loads((tmp_path / "locust" / "report.json").read_text())["locust"]["aggregated"]
        assert stats["failures"] == 0 and stats["requests"] >= 50, stats
    finally:
        if locust.poll() is None:
            locust.send_signal(signal.SIGINT)
            try:
                locust.wait(30)
            except subprocess.TimeoutExpired:
                locust.kill()
        node.stop()
        receiver.stop()
