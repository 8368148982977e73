"""`cxrlt dicom-node` against a real Orthanc, as a hospital would wire it (deploy/orthanc/).

A modality C-STOREs chest radiographs into Orthanc; Orthanc's Lua script (the shipped one)
routes CR/DX images to the node; the node spools, classifies on a real tritonserver and stores
one TID 1500 SR per image back into the image's study. Checked here: the SR's 36 findings are
`cxrlt classify`'s; no loop (the SR is not routed back, an SR sent to the node is ignored); no
duplicate (a re-sent image gives the same SR UID, Orthanc keeps one); nothing lost with the
server down and the node SIGKILLed with images spooled; a CT and corrupt data end in
rejected/ with their reason and the node goes on; STOW-RS delivery; DICOMweb backfill.

Every process (Orthanc, the nodes, `cxrlt serve`) is started here and stopped by PID.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from cxrlt.server.launcher import ServerError, check_ports_free, free_port
from tests.orthanc import MODALITY_AET, Orthanc, orthanc_binary, terminate
from tests.serve_process import Serve, stop_later

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")
pytest.importorskip("pydicom.data")


def with_orthanc(test):
    """An end-to-end test: a real Orthanc, nodes and tritonserver (slow on 2 cores)."""
    marks = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600),
             pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc or its DICOMweb plugin is not installed "
                                "(apt-get install orthanc orthanc-dicomweb; .ci/run does)")]
    for mark in marks:
        test = mark(test)
    return test


NODE_AET = "CXRLT"
STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"  # the study of pydicom-data's RG1_* chest CRs
DELIVERY_S = 120.0  # bound on "within a bounded time" (2 loaded cores)


def sample_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------------- processes


class Backend:
    """`cxrlt serve` on the tiny repository, its gRPC port fixed so it can be stopped and started again
    where the node expects it."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.grpc_port = free_port()
        self.server: Serve | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        # `cxrlt serve` checks its ports with a plain bind(), which fails while connections of the
        # previous server linger in TIME_WAIT on that port: wait for it (HTTP and metrics get new ports).
        wait_for(lambda: _bindable(self.grpc_port), 120, f"port {self.grpc_port} to be free again")
        self.server = Serve(self.repository, ports={"grpc": self.grpc_port, "http": free_port(), "metrics": free_port()})
        try:
            self.server.wait_ready()
        except BaseException:
            self.server.stop()
            raise

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _bindable(port: int) -> bool:
    """Whether `cxrlt serve`'s own check of its ports would pass."""
    try:
        check_ports_free("127.0.0.1", {"grpc": port})
    except ServerError:
        return False
    return True


class Node:
    """`cxrlt dicom-node` in a subprocess; its log in a file; stopped (or killed) by PID."""

    def __init__(self, spool: Path, backend: Backend, *destination: str, ae_title: str = NODE_AET,
                 port: int | None = None, study_sr: tuple[str, ...] = ("--study-sr", "off")) -> None:
        self.spool = spool
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.ae_title = ae_title
        self.command = [sys.executable, "-m", "cxrlt", "dicom-node", "--ae-title", ae_title, "--port", str(self.port),
                        "--url", backend.url, "--spool", str(spool), "--metrics-port", str(self.metrics_port),
                        "--max-backoff-s", "2", "--retries", "1", "--deadline-s", "20", "--grace-s", "5", *study_sr,
                        *destination]
        self.log_path = spool.parent / f"{spool.name}.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"---- start {self.starts}\n")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.process.poll() is not None or "listening as" in self.current_log(), 60,
                     "the node to listen")
            assert self.process.poll() is None, f"the node exited {self.process.returncode}:\n{self.log()[-3000:]}"
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def current_log(self) -> str:
        return self.log().rsplit(f"---- start {self.starts}\n", 1)[-1]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {line.split()[0].removeprefix("cxrlt_node_").removesuffix("_total"): float(line.split()[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self._close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


# ----------------------------------------------------------------------------- DICOM helpers


def store(port: int, called: str, *objects: Path, calling: str = MODALITY_AET) -> list[int]:
    """C-STORE files as a modality would (one presentation context per SOP class and transfer syntax)."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    metas = [pydicom.filereader.read_file_meta_info(path) for path in objects]
    pairs = dict.fromkeys((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)) for meta in metas)
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established, f"{called} at 127.0.0.1:{port} refused the association"
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # the files as they are
    try:
        statuses = []
        for path in objects:
            status = association.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        association.release()
    return statuses


def echo(port: int, called: str) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established
    try:
        return int(association.send_c_echo().Status)
    finally:
        association.release()


def variant(folder: Path, tag: str, source: str = "RG1_UNCR.dcm", mutate: Callable[[Any], None] | None = None) -> Path:
    """The real chest CR as another instance of the same study (new SOPInstanceUID, derived from ``tag``)."""
    from pydicom.uid import generate_uid

    dataset = pydicom.dcmread(sample_file(source))
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=["cxrlt-test", tag])
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if mutate is not None:
        mutate(dataset)
    path = folder / f"{tag}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def corrupt_file(path: Path, truncated_header) -> tuple[Path, str]:
    """A DICOM file whose file meta is fine (a CR's UIDs) and whose data set is garbage."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = truncated_header.SOPClassUID
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cxrlt-test", "garbage"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + b"\x08\x00\x16\x00UI\xf0\xff" + bytes(range(40)))  # a length past the end
    return path, str(meta.MediaStorageSOPInstanceUID)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@dataclasses.dataclass
class StoredSR:
    uid: str
    study: str
    source: str  # the referenced image's SOPInstanceUID
    findings: dict[str, float]
    notes: str
    path: Path


_PARSED: dict[str, StoredSR] = {}  # Orthanc instance ID -> the SR, read once


def stored_srs(orthanc: Orthanc, folder: Path) -> dict[str, list[StoredSR]]:
    """Source SOPInstanceUID -> the SRs Orthanc holds for it in the RG1 study."""
    from cxrlt.io.reports import read_sr_findings

    found: dict[str, list[StoredSR]] = {}
    for instance in orthanc.instances(STUDY, "SR"):
        if instance["ID"] not in _PARSED:
            path = folder / f"{instance['ID']}.dcm"
            path.write_bytes(orthanc.file(instance["ID"]))
            sr = pydicom.dcmread(path)
            reference = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            notes = " ".join(str(item.TextValue) for item in _walk(sr) if "TextValue" in item)
            _PARSED[instance["ID"]] = StoredSR(str(sr.SOPInstanceUID), str(sr.StudyInstanceUID),
                                               str(reference.ReferencedSOPInstanceUID), read_sr_findings(path), notes, path)
        stored = _PARSED[instance["ID"]]
        found.setdefault(stored.source, []).append(stored)
    return found


def _walk(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def classify_json(cxrlt, url: str, files: list[Path], out: Path) -> dict[str, dict[str, float]]:
    """`cxrlt classify --format json` on the files: SOPInstanceUID -> its 36 probabilities."""
    assert cxrlt("classify", *files, "--url", url, "--format", "json", "--out", out) == 0
    return {entry["image_id"]: entry["probabilities"] for entry in json.loads(out.read_text())}


def assert_same_findings(sr: dict[str, float], reference: dict[str, float]) -> None:
    from cxrlt.contract.labels import ALL_LABELS

    assert list(sr) == list(ALL_LABELS) == list(reference)
    for label in ALL_LABELS:
        assert abs(sr[label] - reference[label]) <= 1e-6, (label, sr[label], reference[label])


def served_repository(url: str):
    """The repository identity the node derives SR UIDs from, read here with the sync client."""
    import tritonclient.grpc as grpcclient

    from cxrlt.contract.served import PIPELINE_MODELS
    from cxrlt.client.sdk import repository_identity

    client = grpcclient.InferenceServerClient(url)
    try:
        return repository_identity({name: client.get_model_config(name).config for name in PIPELINE_MODELS})
    finally:
        client.close()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def backend(tiny_repository):
    server = Backend(tiny_repository)
    server.start()
    yield server
    stop_later(server.stop)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dicom-node")


@pytest.fixture(scope="module")
def pacs(work, backend):
    """Orthanc routing to a node that stores its SRs back into Orthanc by C-STORE."""
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", node_port)
    node = None
    try:
        orthanc.wait_ready()
        node = Node(work / "spool", backend, "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                    port=node_port)
        node.start()
        yield orthanc, node
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


# ----------------------------------------------------------------------------- tests


@with_orthanc
def test_orthanc_routes_chest_radiographs_and_stores_one_sr_per_image(pacs, backend, work, cxrlt):
    orthanc, node = pacs
    images = [sample_file("RG1_UNCR.dcm"), sample_file("RG1_J2KR.dcm")]  # uncompressed and JPEG 2000 lossless
    assert store(orthanc.dicom_port, orthanc.aet, *images) == [0, 0]

    sources = [sop_uid(path) for path in images]
    srs = wait_for(lambda: (found := stored_srs(orthanc, work)) and all(s in found for s in sources) and found,
                   DELIVERY_S, f"one SR per image in Orthanc\n{node.log()[-2000:]}")
    reference = classify_json(cxrlt, backend.url, images, work / "classify.json")
    repository = served_repository(backend.url)
    from cxrlt.io.reports import NOT_FOR_CLINICAL_USE
    from cxrlt.io.reports import derived_uids

    for source, path in zip(sources, images):
        assert len(srs[source]) == 1
        sr = srs[source][0]
        assert sr.study == STUDY  # in the source's study
        assert_same_findings(sr.findings, reference[source])
        assert sr.uid == derived_uids(pydicom.dcmread(path, stop_before_pixels=True), repository.sha256).sop_instance
        assert repository.sha256 in sr.notes and NOT_FOR_CLINICAL_USE in sr.notes
        assert "Projection frontal (score" in sr.notes
    counts = node.metrics()
    assert counts["received"] == 2 and counts["sent"] == 2 and counts["spooled"] == 0
    # one line per instance, no patient identifiers
    log = node.log()
    for source in sources:
        assert f"sop={source} outcome=sent" in log
    header = pydicom.dcmread(images[0], stop_before_pixels=True)
    for identifier in (str(header.PatientName), str(header.PatientID)):
        assert identifier and identifier not in log


@with_orthanc
def test_no_loop_and_a_resent_image_gives_no_second_sr(pacs, work):
    orthanc, node = pacs
    images = [sample_file("RG1_UNCR.dcm"), sample_file("RG1_J2KR.dcm")]
    sources = [sop_uid(path) for path in images]

    def one_round() -> dict[str, list[str]]:
        """A modality sends both images (again): Orthanc routes each to the node (also a re-sent one)."""
        start = node.metrics()
        assert store(orthanc.dicom_port, orthanc.aet, *images) == [0, 0]
        wait_for(lambda: (m := node.metrics())["sent"] == start["sent"] + 2 and m["spooled"] == 0, DELIVERY_S,
                 f"both images classified and their SRs sent\n{node.log()[-2000:]}")
        time.sleep(3)  # time for a loop to show, if there were one
        end = node.metrics()
        # the SRs stored into Orthanc were not routed back: the node would have received (and ignored) them
        assert end["received"] == start["received"] + 2 and end["ignored"] == 0, end
        return {source: [sr.uid for sr in srs] for source, srs in stored_srs(orthanc, work).items()}

    first = one_round()
    assert all(len(first[source]) == 1 for source in sources), first
    again = one_round()  # re-sent: classified again, the same SR UIDs, and Orthanc keeps one of each
    assert again == first

    # an SR sent to the node is acknowledged and ignored, never classified
    classified = node.metrics()["classified"]
    assert store(node.port, NODE_AET, stored_srs(orthanc, work)[sources[0]][0].path, calling=orthanc.aet) == [0]
    after = node.metrics()
    assert after["ignored"] == 1 and after["classified"] == classified and after["spooled"] == 0


@with_orthanc
def test_nothing_lost_with_the_server_down_and_the_node_killed(pacs, backend, work):
    orthanc, node = pacs
    images = [variant(work, "down-1"), variant(work, "down-2")]
    sources = [sop_uid(path) for path in images]
    backend.stop()
    try:
        assert store(orthanc.dicom_port, orthanc.aet, *images) == [0, 0]
        wait_for(lambda: (m := node.metrics())["spooled"] == 2 and m["retried"] >= 2, 60,
                 f"both images spooled and retried while the server is down\n{node.log()[-2000:]}")
        node.kill()  # SIGKILL with both images spooled
        assert sorted(p.name for p in (node.spool / "incoming").glob("*.dcm")) == sorted(f"{s}.dcm" for s in sources)
        node.start()  # replays its spool; the server is still down
        wait_for(lambda: node.metrics()["retried"] >= 1, 60, "the restarted node to retry its spool")
    finally:
        backend.start()  # on the same ports: the node's --url is unchanged
    srs = wait_for(lambda: (found := stored_srs(orthanc, work)) and all(s in found for s in sources) and found,
                   DELIVERY_S, f"the SRs after the server came back\n{node.log()[-3000:]}")
    for source in sources:
        assert len(srs[source]) == 1, f"{len(srs[source])} SRs for {source}"
    assert node.metrics()["spooled"] == 0
    assert not list((node.spool / "incoming").glob("*.dcm"))


@with_orthanc
def test_the_sr_waits_in_the_spool_while_the_destination_is_down(pacs, work):
    orthanc, node = pacs
    image = variant(work, "pacs-down")
    before = node.metrics()
    orthanc.stop()
    try:
        assert store(node.port, NODE_AET, image, calling=orthanc.aet) == [0]  # straight from a modality
        wait_for(lambda: (m := node.metrics())["retried"] >= before["retried"] + 2 and m["spooled"] == 1, 60,
                 f"the SR's delivery retried while Orthanc is down\n{node.log()[-2000:]}")
        assert (node.spool / "incoming" / f"{sop_uid(image)}.dcm").is_file()
        node.stop()  # SIGTERM: a clean stop that leaves the undelivered image in the spool
        assert node.process.returncode == 0 and "1 instance(s) left in the spool" in node.current_log()
    finally:
        orthanc.start()  # same ports and storage
        orthanc.wait_ready()
        if node.process.poll() is not None:
            node.start()
    srs = wait_for(lambda: (found := stored_srs(orthanc, work)) and sop_uid(image) in found and found, DELIVERY_S,
                   f"the SR once Orthanc is back\n{node.log()[-2000:]}")
    assert len(srs[sop_uid(image)]) == 1
    assert node.metrics()["spooled"] == 0 and "(1 to replay)" in node.current_log()


@with_orthanc
def test_a_ct_and_corrupt_data_are_rejected_with_a_reason_and_the_node_goes_on(pacs, work):
    orthanc, node = pacs
    ct = sample_file("CT_small.dcm")

    def truncate(dataset) -> None:
        dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 3]

    truncated = variant(work, "truncated", mutate=truncate)
    garbage, garbage_uid = corrupt_file(work / "garbage.dcm", truncated_header=pydicom.dcmread(truncated, stop_before_pixels=True))
    rejected = node.spool / "rejected"
    before = node.metrics()

    statuses = store(node.port, NODE_AET, ct, truncated, garbage, calling=orthanc.aet)
    assert statuses[:2] == [0, 0]  # taken into the spool: the node answers for them now
    assert statuses[2] in (0xA900, 0xC210)  # "does not match SOP class" / "cannot understand", as DICOM says
    reasons = wait_for(lambda: len(list(rejected.glob("*.reason.txt"))) >= 3 and {
        p.name.removesuffix(".dcm.reason.txt"): p.read_text() for p in rejected.glob("*.reason.txt")},
        DELIVERY_S, f"three rejections\n{node.log()[-2000:]}")
    assert "modality CT" in reasons[sop_uid(ct)]
    assert "truncated" in reasons[sop_uid(truncated)]
    assert "refused with C-STORE status" in reasons[garbage_uid]
    for name in reasons:
        assert (rejected / f"{name}.dcm").is_file()
    assert node.metrics()["rejected"] == before["rejected"] + 3

    # the node goes on: it answers C-ECHO and still delivers a good image
    assert node.process.poll() is None and echo(node.port, NODE_AET) == 0
    good = variant(work, "after-rejects")
    assert store(node.port, NODE_AET, good, calling=orthanc.aet) == [0]
    wait_for(lambda: sop_uid(good) in stored_srs(orthanc, work), DELIVERY_S, "the good image's SR")


@with_orthanc
def test_stow_rs_delivery_to_orthanc_dicomweb(pacs, backend, work, cxrlt):
    orthanc, _ = pacs
    node = Node(work / "stow-spool", backend, "--stow-url", orthanc.dicomweb, "--stow-credentials-file",
                orthanc.credentials_file, ae_title="CXRLTSTOW")
    node.start()
    try:
        image = variant(work, "stow")
        source = sop_uid(image)
        assert store(node.port, "CXRLTSTOW", image) == [0]
        srs = wait_for(lambda: (found := stored_srs(orthanc, work)) and source in found and found, DELIVERY_S,
                       f"the SR stored by STOW-RS\n{node.log()[-2000:]}")
        reference = classify_json(cxrlt, backend.url, [image], work / "stow.json")
        assert_same_findings(srs[source][0].findings, reference[source])
        # re-sent: STOW-RS of the same SR, Orthanc still holds one
        assert store(node.port, "CXRLTSTOW", image) == [0]
        wait_for(lambda: node.metrics()["sent"] >= 2, DELIVERY_S, f"the second STOW-RS\n{node.log()[-2000:]}")
        assert [sr.uid for sr in stored_srs(orthanc, work)[source]] == [srs[source][0].uid]
    finally:
        node.stop()
    assert "outcome=sent" in node.log() and "STOW-RS" in node.log()


@with_orthanc
def test_dicomweb_backfill_classifies_a_study_and_stores_the_same_srs(pacs, backend, work, cxrlt):
    import asyncio

    from cxrlt.node.backfill import backfill

    orthanc, _ = pacs
    existing = stored_srs(orthanc, work)
    in_orthanc = {instance["MainDicomTags"]["SOPInstanceUID"] for instance in orthanc.instances(STUDY, "CR")}
    assert len(in_orthanc) >= 2  # the radiographs the modality stored in the earlier tests

    out = work / "backfill.json"  # through the command a user runs, with the PACS's credentials
    with pytest.raises(PermissionError, match="HTTP 401.*--dicomweb-credentials-file"):
        cxrlt("classify", "--dicomweb", orthanc.dicomweb, "--study", STUDY, "--url", backend.url, "--out", str(out))
    assert cxrlt("classify", "--dicomweb", orthanc.dicomweb, "--study", STUDY, "--url", backend.url, "--store",
                 "--dicomweb-credentials-file", orthanc.credentials_file, "--retries", "2", "--deadline-s", "60",
                 "--out", str(out)) == 0
    entries = json.loads(out.read_text())
    assert sorted(entry["image_id"] for entry in entries) == sorted(in_orthanc), entries
    for entry in entries:  # the node's SR again: same UID and findings, nothing added
        (sr,) = existing[entry["image_id"]]
        assert entry["sr"] == sr.uid and entry["stored"]
        assert_same_findings(entry["probabilities"], sr.findings)
    assert {source: [sr.uid for sr in srs] for source, srs in stored_srs(orthanc, work).items()} == \
        {source: [sr.uid for sr in srs] for source, srs in existing.items()}

    # a Secondary Capture in another study (Orthanc's script routes only CR/DX): backfill stores its SR
    from pydicom.uid import generate_uid

    def secondary_capture(dataset) -> None:
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        dataset.Modality = "OT"
        dataset.StudyInstanceUID = generate_uid(entropy_srcs=["cxrlt-test", "backfill-study"])
        dataset.SeriesInstanceUID = generate_uid(entropy_srcs=["cxrlt-test", "backfill-series"])

    image = variant(work, "backfill-sc", mutate=secondary_capture)
    header = pydicom.dcmread(image, stop_before_pixels=True)
    assert store(orthanc.dicom_port, orthanc.aet, image) == [0]
    (entry,) = asyncio.run(backfill(orthanc.dicomweb, str(header.StudyInstanceUID), backend.url, store=True,
                                    credentials_file=orthanc.credentials_file))
    assert entry["image_id"] == str(header.SOPInstanceUID) and entry["stored"], entry
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": entry["sr"]}})
    assert len(found) == 1


@with_orthanc
def test_a_frontal_and_lateral_study_gets_one_study_sr_with_the_mean_of_both_views(pacs, backend, work, cxrlt):
    """--study-sr also: the per-image SRs, then, once the study is quiet, one study SR referencing both images
    whose findings are the mean of the frontal and the lateral probabilities; `classify --by-study --format sr`
    writes the same SR (same UID)."""
    from pydicom.uid import generate_uid

    from cxrlt.contract.labels import ALL_LABELS
    from cxrlt.io.reports import read_sr_findings

    orthanc, _ = pacs
    study = generate_uid(entropy_srcs=["cxrlt-test", "two-view-study"])

    def view(position: str):
        def mutate(dataset) -> None:
            dataset.StudyInstanceUID, dataset.ViewPosition = study, position
        return mutate

    images = [variant(work, "study-pa", mutate=view("PA")), variant(work, "study-ll", mutate=view("LL"))]
    node = Node(work / "study-spool", backend, "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                study_sr=("--study-sr", "also", "--study-quiet-s", "3"))  # Orthanc knows the AE title CXRLT
    node.start()
    try:
        assert store(node.port, NODE_AET, *images) == [0, 0]
        wait_for(lambda: node.metrics()["study_sent"] == 1, DELIVERY_S, "the study SR")
        assert node.metrics()["sent"] == 2 and not list((node.spool / "studies").iterdir())
    finally:
        node.stop()
    srs = {}
    for instance in orthanc.instances(study, "SR"):
        path = work / f"study-{instance['ID']}.dcm"
        path.write_bytes(orthanc.file(instance["ID"]))
        srs[path] = pydicom.dcmread(path)
    referenced = {path: {str(item.ReferencedSOPInstanceUID) for series in sr.CurrentRequestedProcedureEvidenceSequence
                         for ref in series.ReferencedSeriesSequence for item in ref.ReferencedSOPSequence}
                  for path, sr in srs.items()}
    [study_sr] = [path for path, refs in referenced.items() if len(refs) == 2]
    assert len(srs) == 3 and referenced[study_sr] == {sop_uid(path) for path in images}

    per_image = classify_json(cxrlt, backend.url, images, work / "study.json")
    frontal, lateral = (per_image[sop_uid(path)] for path in images)
    study_findings = read_sr_findings(study_sr)
    assert list(study_findings) == list(ALL_LABELS)
    for label in ALL_LABELS:
        assert study_findings[label] == pytest.approx((frontal[label] + lateral[label]) / 2, abs=1e-6), label

    out = work / "by-study"
    assert cxrlt("classify", *images, "--url", backend.url, "--by-study", "--format", "sr", "--out", out) == 0
    [written] = list(out.iterdir())
    assert pydicom.dcmread(written).SOPInstanceUID == srs[study_sr].SOPInstanceUID


# ----------------------------------------------------------------------------- without a server


def test_destination_addresses_parse_or_say_what_is_wrong():
    from cxrlt.node.destinations import parse_ae_address

    assert str(parse_ae_address("PACS@127.0.0.1:4242")) == "PACS@127.0.0.1:4242"
    assert parse_ae_address("PACS@[::1]:104").host == "::1"
    for bad in ("PACS127.0.0.1:4242", "PACS@127.0.0.1", "A_TITLE_LONGER_THAN_16@h:1", "PACS@h:0", "@h:104"):
        with pytest.raises(ValueError, match="AE@HOST:PORT"):
            parse_ae_address(bad)


def test_the_sr_uid_depends_only_on_the_image_and_the_repository():
    from cxrlt.contract.labels import ALL_LABELS
    from cxrlt.contract.results import FindingsResult
    from cxrlt.io.reports import NOT_FOR_CLINICAL_USE
    from cxrlt.client.sdk import Repository
    from cxrlt.client.workflow import build_report

    source = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    result = FindingsResult(str(source.SOPInstanceUID), {label: 0.25 for label in ALL_LABELS}, "frontal", 0.8, "PA",
                            True, "cxr_findings", "1", random_weights=False)
    repository = Repository("ab" * 32, random_weights=True, source="test")
    first, again = build_report(result, source, repository), build_report(result, source, repository)
    other = build_report(result, source, Repository("cd" * 32, random_weights=False, source="test"))
    assert first.SOPInstanceUID == again.SOPInstanceUID == first.file_meta.MediaStorageSOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID and first.StudyInstanceUID == source.StudyInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    notes = " ".join(str(item.TextValue) for item in _walk(first) if "TextValue" in item)
    assert "ab" * 32 in notes and NOT_FOR_CLINICAL_USE in notes  # the served flag wins over the cached one
    assert "Projection frontal (score 0.800" in notes


def test_the_spool_keeps_what_was_acknowledged_and_rejects_with_a_reason(tmp_path):
    from cxrlt.node.spool import Spool, entry_name

    spool = Spool(tmp_path)
    (spool.incoming / ".half.dcm.1234.tmp").write_bytes(b"cut short")  # a receive that was never acknowledged
    spool = Spool(tmp_path)  # a restart sweeps it
    assert not list(spool.incoming.glob(".*"))
    assert entry_name("1.2.3") == "1.2.3.dcm" and entry_name("../../etc/passwd").startswith("x")
    spool.put("1.2.3.dcm", b"first")
    spool.put("1.2.4.dcm", b"second")
    assert spool.pending() == ["1.2.3.dcm", "1.2.4.dcm"] and spool.count() == 2
    spool.reject("1.2.3.dcm", "modality CT is not a chest radiograph")
    assert (spool.rejected / "1.2.3.dcm").read_bytes() == b"first"
    assert "modality CT" in (spool.rejected / "1.2.3.dcm.reason.txt").read_text()
    spool.remove("1.2.4.dcm")
    assert spool.pending() == [] and spool.count() == 0


def test_the_scp_accepts_the_usual_transfer_syntaxes_it_can_decode():
    from pydicom import uid

    from cxrlt.node.node import transfer_syntaxes

    accepted = transfer_syntaxes()
    for syntax in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
                   uid.JPEG2000Lossless, uid.JPEG2000, uid.JPEGBaseline8Bit):  # decoders of the `client` extra
        assert syntax in accepted
    from pydicom.pixels import get_decoder

    for syntax in accepted:  # never one this host cannot decode: the sender would be told "fine", then we fail
        assert not syntax.is_compressed or get_decoder(syntax).is_available
