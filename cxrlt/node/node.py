"""`cxrlt dicom-node`: a DICOM Storage SCP that has chest radiographs classified and stores the SR back.

Flow of one instance::

    C-STORE -> spool (fsync, rename) -> success status     (durable before acknowledged)
            -> worker: cxrlt.client.workflow.classify_image (load, classify, TID 1500 SR with
               deterministic UIDs: the path `cxrlt classify` and the backfill take too)
            -> C-STORE / STOW-RS
            -> spool entry removed once the destination accepted the SR

* Nothing lost: the server or the destination unavailable -> the entry stays spooled and is
  retried with capped exponential backoff (and jitter); a restarted node replays its spool.
  A failure that retrying cannot fix (a bad image, not a chest radiograph, the server refusing
  the image) moves the entry to ``rejected/`` with a reason file, and the node goes on.
* No loops, no duplicates: objects without pixel data (SR, presentation states, key objects)
  are acknowledged and dropped; images that are not chest radiographs (modality, body part)
  are rejected, never classified; the SR's UID is derived from the source's UID and the
  served repository, so a re-sent image gives the same SR.
* One log line per instance (SOPInstanceUID, outcome, latency), never a patient identifier;
  counters in Prometheus' text format (:mod:`cxrlt.node.metrics`).
* Studies (``study_sr``): besides (``also``, the default) or instead of (``only``) one SR per image,
  one SR per study once no image of it has arrived for ``study_quiet_s`` (cxrlt.node.studies).
* SIGTERM: stop accepting associations, let what is in flight finish within ``grace_s``;
  anything unfinished stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

from cxrlt.client.sdk import DEFAULT_URL, backoff_delay
from cxrlt.node import CHEST_BODY_PARTS
from cxrlt.node.destinations import DestinationError
from cxrlt.node.metrics import Metrics
from cxrlt.node.spool import Spool, entry_name
from cxrlt.node.studies import DEFAULT_STUDY_SR, STUDY_SR_MODES, StudyBook

__all__ = ["NodeConfig", "DicomNode", "CHEST_BODY_PARTS", "transfer_syntaxes"]

log = logging.getLogger("cxrlt.node")

# C-STORE failure statuses (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
DOES_NOT_MATCH = 0xA900  # the data set does not match the SOP class
# Storage SOP classes that hold no radiograph: SR (and key objects), presentation states,
# encapsulated documents, waveforms, raw data / registration / segmentation, surfaces, RT objects.
NON_IMAGE_SOP_CLASSES = tuple(f"1.2.840.10008.5.1.4.1.1.{suffix}" for suffix in (
    "88.", "11.", "104.", "9.", "66", "67", "68.", "481."))
_BUILT_CACHE = 1000  # SRs kept while their destination is down, so a retry does not classify again


@dataclasses.dataclass
class NodeConfig:
    ae_title: str
    spool: Path
    destination: Any  # CStoreDestination | StowDestination: .send(sr), str() names it
    url: str = DEFAULT_URL
    host: str = "127.0.0.1"
    port: int = 11112
    workers: int = 2
    metrics_port: int | None = 9102  # None: no metrics endpoint
    tls: dict[str, Any] = dataclasses.field(default_factory=dict)  # ssl / root_certificates / ...
    timeout_s: float = 60.0  # one inference attempt
    retries: int = 3  # attempts per classification inside the client (UNAVAILABLE)
    deadline_s: float = 60.0  # one classification, all its attempts
    backoff_s: float = 1.0  # the node's retry of a spooled entry: first wait ...
    max_backoff_s: float = 60.0  # ... doubling up to this
    grace_s: float = 10.0  # on SIGTERM, time for what is in flight
    body_parts: tuple[str, ...] = CHEST_BODY_PARTS
    study_sr: str = DEFAULT_STUDY_SR  # off | also | only (see cxrlt.node.studies)
    study_quiet_s: float = 30.0  # a study is reported once no image of it arrived for this long

    def __post_init__(self) -> None:
        if self.study_sr not in STUDY_SR_MODES:
            raise ValueError(f"study_sr must be one of {', '.join(STUDY_SR_MODES)}, not {self.study_sr!r}")


class _Reject(Exception):
    """Retrying cannot help: the entry goes to rejected/ with this reason."""


class _Retry(Exception):
    """Retrying may help (server or destination unavailable): the entry stays spooled."""


async def _close(client: Any) -> None:
    with contextlib.suppress(Exception):  # the server may be gone
        await client.close()


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes the SCP accepts: uncompressed always, compressed ones this host can decode."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    native = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
              uid.ExplicitVRBigEndian]
    compressed = [uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLossless,
                  uid.JPEG2000Lossless, uid.JPEG2000, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.RLELossless]
    usable = []
    for syntax in compressed:
        try:
            if get_decoder(syntax).is_available:
                usable.append(syntax)
        except NotImplementedError:
            continue
    return [*native, *usable]


class DicomNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.metrics = Metrics(self.spool.count)
        self.studies = None if config.study_sr == "off" else StudyBook(self.spool.root / "studies", config.study_quiet_s)
        self._study_attempts: dict[str, int] = {}
        self.port: int | None = None  # the DICOM port, once listening
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._pending: set[str] = set()  # queued, in work or waiting for a retry
        self._again: set[str] = set()  # received again while pending
        self._attempts: dict[str, int] = {}
        self._built: dict[str, Any] = {}  # name -> SR whose delivery failed (resent without classifying again)
        self._busy = 0
        self._stopping = False
        self._rng = random.Random()
        self._client: Any = None  # the SDK's AsyncCxrltClient (it also reads the served configs)
        self._client_since = 0.0
        self._retired: set[Any] = set()  # replaced clients, closed once their calls are over

    # ------------------------------------------------------------------ receiving (pynetdicom's threads)

    def _on_store(self, event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID or "")
        sop_class = str(event.request.AffectedSOPClassUID or "")
        name = entry_name(sop)
        self.metrics.inc("received")
        try:
            data = event.encoded_dataset()
        except Exception as exc:  # nothing usable arrived
            self._outcome(sop, "refused", 0.0, reason=f'"no data set: {exc}"')
            return CANNOT_UNDERSTAND
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings may quote element values
                dataset = event.dataset
                has_pixels = "PixelData" in dataset
                identity = (str(dataset.get("SOPClassUID", "")), str(dataset.get("SOPInstanceUID", "")))
        except Exception as exc:
            return self._refuse(name, sop, data, CANNOT_UNDERSTAND,
                                f"the data set could not be decoded ({type(exc).__name__}: {exc})")
        if identity != (sop_class, sop):
            return self._refuse(name, sop, data, DOES_NOT_MATCH,
                                f"the data set does not match its C-STORE request (SOP class and instance "
                                f"{identity[0]!r} / {identity[1]!r}, request {sop_class} / {sop})")
        if not has_pixels or sop_class.startswith(NON_IMAGE_SOP_CLASSES):
            # SR, KO, PR, documents ...: never classified, so the node's own SRs never loop back
            self.metrics.inc("ignored")
            self._outcome(sop, "ignored", 0.0, reason=f'"not an image (SOP class {sop_class})"')
            return 0x0000
        try:
            self.spool.put(name, data)
        except OSError as exc:
            self._outcome(sop, "refused", 0.0, reason=f'"could not spool it: {exc}"')
            return OUT_OF_RESOURCES
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended: the next start replays it
                self._loop.call_soon_threadsafe(self._enqueue, name)
        return 0x0000

    def _refuse(self, name: str, sop: str, data: bytes, status: int, reason: str) -> int:
        """Answer a failure status; keep what arrived in rejected/ with the reason, for a person to look at."""
        reason = f"{reason}; refused with C-STORE status 0x{status:04X}"
        try:
            self.spool.reject(name, reason, data=data)
        except OSError as exc:
            log.error("sop=%s could not write rejected/%s: %s", sop, name, exc)
        self.metrics.inc("rejected")
        self._outcome(sop, "rejected", 0.0, reason=f'"{reason}"')
        return status

    # ------------------------------------------------------------------ scheduling (event loop)

    def _enqueue(self, name: str) -> None:
        if name in self._pending:
            self._again.add(name)
            return
        self._pending.add(name)
        assert self._queue is not None
        self._queue.put_nowait(name)

    def _requeue(self, name: str) -> None:
        self._pending.discard(name)
        if not self._stopping:
            self._enqueue(name)

    def _done(self, name: str) -> None:
        self._pending.discard(name)
        self._attempts.pop(name, None)
        if name in self._again:
            self._again.discard(name)
            if self.spool.path(name).exists():
                self._enqueue(name)

    def _outcome(self, sop: str, outcome: str, latency_s: float, **fields: Any) -> None:
        extra = "".join(f" {key}={value}" for key, value in fields.items() if value is not None)
        log.info("sop=%s outcome=%s latency_s=%.2f%s", sop or "-", outcome, latency_s, extra)

    # ------------------------------------------------------------------ work

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            name = await self._queue.get()
            if self._stopping:
                continue  # stays in the spool for the next start
            self._busy += 1
            try:
                await self._process(name)
            except Exception:  # a bug must not stop the node: keep the entry, try again later
                log.exception("entry %s: unexpected error; it stays spooled and is retried", name)
                self._retry_later(name, "unexpected error")
            finally:
                self._busy -= 1

    def _retry_later(self, name: str, reason: str) -> None:
        attempt = self._attempts[name] = self._attempts.get(name, 0) + 1
        delay = backoff_delay(attempt, self.config.backoff_s, self.config.max_backoff_s, self._rng)
        self.metrics.inc("retried")
        sop = name.removesuffix(".dcm")
        self._outcome(sop, "retry", self._age(name), attempt=attempt, next_s=f"{delay:.1f}", reason=f'"{reason}"')
        assert self._loop is not None
        self._loop.call_later(delay, self._requeue, name)

    def _age(self, name: str) -> float:
        try:
            return max(0.0, time.time() - self.spool.path(name).stat().st_mtime)
        except OSError:
            return 0.0

    async def _process(self, name: str) -> None:
        path = self.spool.path(name)
        if not path.exists():  # delivered or rejected meanwhile
            self._done(name)
            return
        latency = self._age(name)
        started = time.monotonic()
        try:
            sr, sop, detail = await self._report(name, path)
            try:
                if sr is not None:  # None: study SRs only
                    await asyncio.to_thread(self.config.destination.send, sr)
            except DestinationError as exc:
                if name in self._built or len(self._built) < _BUILT_CACHE:
                    self._built[name] = (sr, sop, detail)
                raise _Retry(str(exc)) from None
        except _Retry as exc:
            self._retry_later(name, str(exc))
            return
        except _Reject as exc:
            try:
                self.spool.reject(name, str(exc))
            except FileNotFoundError:
                pass
            self.metrics.inc("rejected")
            self._built.pop(name, None)
            self._outcome(name.removesuffix(".dcm"), "rejected", latency + time.monotonic() - started,
                          attempts=self._attempts.get(name, 0) + 1, reason=f'"{exc}"')
            self._done(name)
            return
        self._built.pop(name, None)
        self.spool.remove(name)
        if sr is not None:
            self.metrics.inc("sent")
        self._outcome(sop, "sent" if sr is not None else "kept for its study SR", latency + time.monotonic() - started,
                      attempts=self._attempts.get(name, 0) + 1, sr=str(sr.SOPInstanceUID) if sr is not None else None,
                      to=f'"{self.config.destination}"', **detail)
        self._done(name)

    def _connect(self) -> None:
        from cxrlt.client.sdk import AsyncCxrltClient

        config = self.config
        # fail_fast off: a node may start before its server; the spool keeps what cannot be classified yet
        self._client = AsyncCxrltClient(config.url, timeout_s=config.timeout_s, retries=config.retries,
                                        deadline_s=config.deadline_s, fail_fast=False, **config.tls)
        self._client_since = time.monotonic()

    def _reconnect(self, failed: Any) -> None:
        """Use a new client from now on (at most once a second); close the failed one when its calls are over.

        A gRPC channel that kept failing backs off its reconnects (up to minutes), so a new one finds a
        restarted server at once; it also forgets what the old client cached about the served models."""
        if self._client is not failed or time.monotonic() - self._client_since < 1.0:
            return
        self._connect()
        self._retired.add(failed)

        def close() -> None:
            self._retired.discard(failed)
            asyncio.ensure_future(_close(failed))

        assert self._loop is not None
        self._loop.call_later(self.config.deadline_s + self.config.timeout_s + 5.0, close)

    async def _report(self, name: str, path: Path) -> tuple[Any, str, dict]:
        """(SR, source SOPInstanceUID, log fields) of a spooled image; raises _Retry or _Reject."""
        from cxrlt.client.workflow import ClassifyFailure, classify_image

        if name in self._built:
            return self._built[name]
        client = self._client
        try:
            done = await classify_image(client, path, sr=self.config.study_sr != "only", body_parts=self.config.body_parts)
        except ClassifyFailure as exc:
            if exc.server_trouble:  # unavailable, overloaded, timed out, an internal error: may pass
                self._reconnect(client)
            raise (_Retry if exc.retry else _Reject)(exc.reason) from None
        self.metrics.inc("classified")
        result, repository = done.result, await client.repository()
        if self.studies is not None:
            await asyncio.to_thread(self.studies.add, result, done.dataset)
        detail = {"projection": result.projection, "score": f"{result.projection_score:.3f}", "release": result.release,
                  "repository": (result.repository_sha256 or repository.sha256)[:16],
                  # ood_action "flag": answered, but the gate says it may not be a chest radiograph
                  "out_of_distribution": (f"FLAGGED(score={result.ood_score:.2f}>threshold={result.ood_threshold:.2f})"
                                          if result.out_of_distribution else None)}
        return done.sr, result.image_id, detail

    # ------------------------------------------------------------------ study SRs

    async def _study_reporter(self) -> None:
        """Send the SR of every study that has been quiet for the quiet period (cxrlt.node.studies)."""
        assert self.studies is not None
        while True:
            await asyncio.sleep(min(1.0, self.config.study_quiet_s / 4))
            for name in await asyncio.to_thread(self.studies.quiet):
                if self._stopping:
                    return
                await self._send_study(name)

    async def _send_study(self, name: str) -> None:
        from cxrlt.client.sdk import ClientError
        from cxrlt.client.workflow import build_study_report

        assert self.studies is not None
        started = time.monotonic()
        results, headers = await asyncio.to_thread(self.studies.load, name)
        try:
            info, repository = await self._client.model_info(), await self._client.repository()
            sr = await asyncio.to_thread(build_study_report, results, headers, repository, info.operating_points, [
                f"Reported after {self.config.study_quiet_s:g} s without a new image of the study."])
            await asyncio.to_thread(self.config.destination.send, sr)
        except Exception as exc:  # the server, the destination or the study's files: all retried later
            if not isinstance(exc, (DestinationError, ClientError)):
                log.exception("study %s: unexpected error; it is retried later", name)
            attempt = self._study_attempts[name] = self._study_attempts.get(name, 0) + 1
            delay = backoff_delay(attempt, self.config.backoff_s, self.config.max_backoff_s, self._rng)
            self.studies.retry_later(name, delay)
            self.metrics.inc("retried")
            self._outcome(f"study:{name}", "retry", time.monotonic() - started, attempt=attempt,
                          next_s=f"{delay:.1f}", reason=f'"{exc}"')
            return
        await asyncio.to_thread(self.studies.remove, name, results)
        self._study_attempts.pop(name, None)
        self.metrics.inc("study_sent")
        self._outcome(f"study:{name}", "sent", time.monotonic() - started, images=len(results),
                      sr=str(sr.SOPInstanceUID), to=f'"{self.config.destination}"')

    # ------------------------------------------------------------------ lifecycle

    def _application_entity(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True  # associations addressed to another AE title are refused
        syntaxes = transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        return ae, handlers

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down (see the module's docstring)."""
        import pydicom

        config = self.config
        # pydicom's reading validation warns (and logs) element values, which may identify a patient
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._connect()
        ae, handlers = self._application_entity()
        server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)
        self.port = int(server.server_address[1])
        try:
            if config.metrics_port is not None:
                self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
            replay = self.spool.pending()
            for name in replay:
                self._enqueue(name)
            workers = [asyncio.create_task(self._worker()) for _ in range(max(1, config.workers))]
            if self.studies is not None:
                workers.append(asyncio.create_task(self._study_reporter()))
            log.info("listening as %s on %s:%d; classifying on %s; results to %s; spool %s (%d to replay); "
                     "metrics on %s", config.ae_title, config.host, self.port, config.url, config.destination,
                     config.spool, len(replay), f"{config.host}:{self.metrics_port}" if self.metrics_port else "off")
            await stop.wait()
            log.info("stopping: no new associations; %.0f s for what is in flight", config.grace_s)
            deadline = time.monotonic() + config.grace_s
            await asyncio.to_thread(server.shutdown)
            server = None
            self._stopping = True  # workers finish the image in hand and take no other
            while (ae.active_associations or self._busy) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for association in ae.active_associations:
                association.abort()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            log.info("stopped; %d instance(s) left in the spool for the next start", self.spool.count())
        finally:
            if server is not None:
                with contextlib.suppress(Exception):
                    server.shutdown()
            self.metrics.close()
            for client in (self._client, *self._retired):
                await _close(client)
