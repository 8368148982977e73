"""The load-test kernel (loadtest/README.md): the images sent, requests (`request_bytes`, `Served`, `drive`), measurements and
checks, the server's process tree, the loopback rule, the server a run starts or finds, and output (JSON, figures)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import struct
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np
import pandas as pd
import psutil
from tritonclient.grpc import InferenceServerClient, InferResult, service_pb2

from cxrlt.client.sdk import ROUTED_MODELS, CxrltClient
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL
from cxrlt.io.synthetic import synthetic_radiographs
from cxrlt.server.launcher import Endpoints, TritonServer, free_port, is_loopback

PROC, SHM, MIB = Path("/proc"), Path("/dev/shm"), 1024 * 1024
SATURATION_GROWTH = 0.05  # a closed loop has saturated at a level not more than 5 % above the best lower one
IMAGE_SETS = ("all", "real", "synthetic")
MODELS = (CLASSIFIER_MODEL, ZEROSHOT_MODEL, FINDINGS_MODEL)
RSS_KEYS = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes", "RssShmem": "rss_shmem_bytes"}
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class LoadTestError(RuntimeError):
    """A run that cannot go on as asked (no server, a server that is gone, ...); the message says why."""


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    name: str
    pixels: np.ndarray  # uint16 [H, W], MONOCHROME2
    hint: str | None  # DICOM ViewPosition term, or None when unknown


@lru_cache(maxsize=None)
def load_payloads(image_set: str = "all") -> tuple[Payload, ...]:
    """pydicom-data's real radiograph (read as the client reads DICOM) and/or the synthetic ones, with hints; decoded once."""
    if image_set not in IMAGE_SETS:
        raise ValueError(f"image set must be one of {IMAGE_SETS}, not {image_set!r}")
    payloads: list[Payload] = []
    if image_set in ("all", "real"):
        try:
            from cxrlt.io.images import load_image
            from cxrlt.io.samples import pydicom_data_file

            image = load_image(pydicom_data_file())
            payloads.append(Payload("RG1_UNCR", np.ascontiguousarray(image.pixels, dtype=np.uint16), image.hint))
        except Exception as exc:
            if image_set == "real":
                raise RuntimeError(f"the real chest X-ray is unavailable ({exc}); install the dev extra (pydicom-data)") from exc
            logging.getLogger(__name__).warning("real chest X-ray unavailable (%s); sending the synthetic radiographs only", exc)
    if image_set in ("all", "synthetic"):
        hints = {"frontal": "PA", "lateral": "LL"}
        payloads += [Payload(f"synthetic_{projection}", np.ascontiguousarray(pixels, dtype=np.uint16), hints[projection])
                     for projection, pixels in synthetic_radiographs().items()]
    return tuple(payloads)


@lru_cache(maxsize=None)
def request_bytes(payload: Payload, model: str, send_hint: bool = True) -> bytes:
    """One image's serialised ModelInferRequest (IMAGE, the hint where taken), made once: not 7 MB serialised per request."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="IMAGE", datatype="UINT16", shape=[1, *payload.pixels.shape])
    request.raw_input_contents.append(np.ascontiguousarray(payload.pixels, dtype="<u2").tobytes())
    if send_hint and payload.hint and model in ROUTED_MODELS:
        request.inputs.add(name="PROJECTION_HINT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<I", len(payload.hint)) + payload.hint.encode())  # length, bytes
    for name in ["PROBABILITIES"] + ["PROJECTION"] * (model in ROUTED_MODELS):
        request.outputs.add(name=name)
    return request.SerializeToString()


def model_infer(channel: Any) -> Callable:
    """Triton's ModelInfer on a grpc (or grpc.aio) channel, taking `request_bytes`."""
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               response_deserializer=service_pb2.ModelInferResponse.FromString)


def probabilities(response: Any) -> np.ndarray:
    return InferResult(response).as_numpy("PROBABILITIES")


def error_text(exc: BaseException) -> tuple[str, str]:
    """(status, message) of a failed call: grpc's own error, tritonclient's, or any other."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return str(exc.code()), str(exc.details() or exc)
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    message = exc.message() if callable(getattr(exc, "message", None)) else None
    return str(status or type(exc).__name__), str(message or exc)


def images_json(payloads: Sequence[Payload], send_hints: bool) -> list[dict[str, Any]]:
    return [{"name": p.name, "shape": list(p.pixels.shape), "hint": p.hint if send_hints else None} for p in payloads]


def figures(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / mean / max of a list of latencies (None when empty)."""
    values = pd.Series(latencies_ms, dtype=float)
    shown = {"p50": values.quantile(0.5), "p95": values.quantile(0.95), "mean": values.mean(), "max": values.max()}
    return {f"{name}_ms": None if values.empty else round(float(value), 3) for name, value in shown.items()}


def level_figures(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A closed loop's requests, wall time, images/s, `figures` and `cpu_figures`, pooled over its `measure_level` runs."""
    latencies, wall_s = [x for run in runs for x in run["latencies_ms"]], sum(run["wall_s"] for run in runs)
    cpu_s = [None if None in seconds else sum(seconds) for seconds in zip(*(run["cpu_s"] for run in runs))]
    return {"requests": len(latencies), "wall_s": round(wall_s, 4),
            "images_per_s": round(len(latencies) / wall_s, 3) if wall_s > 0 else 0.0, **figures(latencies),
            "cpu": cpu_figures(cpu_s, wall_s, len(latencies))}


def saturation_index(throughputs: Sequence[float], growth: float = SATURATION_GROWTH) -> tuple[int, bool]:
    """(index of the highest throughput, whether a sweep stops: its last level is at most `growth` above the best before)."""
    stop = len(throughputs) > 1 and throughputs[-1] <= (1.0 + growth) * max(throughputs[:-1])
    return int(np.argmax(throughputs)), stop


def drive(call: Callable[[int, Any], Any], items: Sequence[Any], concurrency: int, total: int) -> tuple[list[float], float]:
    """`total` calls over `concurrency` threads, the items handed out in turn: (each call's latency in ms, wall time in s)."""
    counter, start_gate = itertools.count(), threading.Barrier(concurrency + 1)  # next(count) holds the GIL: atomic

    def worker(worker_id: int) -> list[float]:
        latencies = []
        start_gate.wait()
        while (index := next(counter)) < total:
            began = time.perf_counter()
            call(worker_id, items[index % len(items)])
            latencies.append((time.perf_counter() - began) * 1000.0)
        return latencies

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as workers:
        results = workers.map(worker, range(concurrency))  # submitted at once, each waiting at the gate
        start_gate.wait()
        began = time.perf_counter()
        return [x for latencies in results for x in latencies], time.perf_counter() - began


def measure_level(call: Callable[[int, Any], Any], items: Sequence[Any], concurrency: int, total: int, warmup: int,
                  server_pid: int | None = None, metrics_url: str | None = None, model: str | None = None) -> dict[str, Any]:
    """`warmup` untimed calls, then `total` timed: their latencies, wall time, CPU seconds and Triton's counters (or None)."""
    from loadtest.metrics import Counters

    if warmup:
        drive(call, items, concurrency, warmup)
    counters, before = Counters(metrics_url), cpu_sample(server_pid)
    latencies, wall_s = drive(call, items, concurrency, total)
    return {"latencies_ms": latencies, "wall_s": wall_s, "cpu_s": cpu_used(before, server_pid),
            "triton": counters.grown({model: total})}


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}" + (f" {unit}" if unit else "")


def check(name: str, passed: bool, figure: str, shown: str, limit: str, measured: float | None = None,
          kind: str = "check", message: str = "") -> dict[str, Any]:
    """One target or check (a "target" is a timing: it fails stress only with --strict) and its one-line message."""
    passed = bool(passed)  # numpy comparisons give numpy booleans
    return {"name": name, "passed": passed, "figure": figure, "shown": shown, "limit": limit, "measured": measured,
            "kind": kind, "message": message or f"{figure} {'met' if passed else 'MISSED'}: {shown}, target {limit}"}


def verdicts(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"checks": list(checks), "missed": [c["name"] for c in checks if not c["passed"]],
            "passed": all(c["passed"] for c in checks)}


class Served:
    """A gRPC channel per worker sending `request_bytes` (or, for shared memory or a send size, a CxrltClient as the SDK does)."""

    def __init__(self, url: str, model: str, send_hints: bool = True, timeout_s: float | None = None,
                 shared_memory: bool = False, send_size: int | str | None = None) -> None:
        self.url, self.model, self.send_hints, self.timeout_s = url, model, send_hints, timeout_s
        self.sdk = dict(shared_memory=shared_memory, send_size=send_size) if shared_memory or send_size else None
        self.clients: list = []

    def ensure_clients(self, count: int) -> None:
        while len(self.clients) < count:
            self.clients.append(grpc.insecure_channel(self.url, options=GRPC_OPTIONS) if self.sdk is None else CxrltClient(
                self.url, model=self.model, retries=1, timeout_s=self.timeout_s or 600.0, **self.sdk))

    def __call__(self, worker: int, item: Payload | tuple[str, Payload]) -> np.ndarray:
        model, payload = item if isinstance(item, tuple) else (self.model, item)
        if self.sdk is not None:
            result = self.clients[worker].classify(payload.pixels, payload.hint if self.send_hints else None, payload.name)
            return np.asarray(list(result.probabilities.values()))
        request = request_bytes(payload, model, self.send_hints)
        return probabilities(model_infer(self.clients[worker])(request, timeout=self.timeout_s))[0]

    def close(self) -> None:
        for client in self.clients:
            client.close()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants ([] when `root` is gone)."""
    try:
        return [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]
    except psutil.Error:
        return []


def _shm_files(pid: int) -> dict[str, int]:
    """/dev/shm files the process has open or mapped -> allocated bytes (0: unlinked but still mapped)."""
    prefix, fd_dir, files = f"{SHM}/", PROC / str(pid) / "fd", {}
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd_dir / fd)).startswith(prefix):
                files[target.removesuffix(" (deleted)")] = os.stat(fd_dir / fd).st_blocks * 512
    for line in (PROC / str(pid) / "maps").read_text().splitlines():
        if (where := line.find(prefix)) >= 0 and (path := line[where:].removesuffix(" (deleted)")) not in files:
            try:
                files[path] = os.stat(path).st_blocks * 512
            except OSError:
                files[path] = 0
    return files


def sample_tree(root: int, requests: int = 0, elapsed_s: float = 0.0) -> dict[str, Any]:
    """RSS, open fds and /dev/shm files of the process tree under `root` (vanishing processes skipped), all of /dev/shm too."""
    totals, shm_files, processes = Counter(), {}, 0
    for pid in process_tree(root):
        try:
            status = {RSS_KEYS[key]: int(rest.split()[0]) * 1024 for key, _, rest in
                      (line.partition(":") for line in (PROC / str(pid) / "status").read_text().splitlines()) if key in RSS_KEYS}
            fds, files = psutil.Process(pid).num_fds(), _shm_files(pid)
        except (OSError, ValueError, psutil.Error):
            continue
        processes += 1
        totals.update(status, fds=fds)
        shm_files.update(files)
    if not processes:
        raise LoadTestError(f"process {root} is gone (or /proc/{root} is not readable)")
    return {"requests": requests, "elapsed_s": round(elapsed_s, 3), "processes": processes,
            **{key: totals[key] for key in RSS_KEYS.values()},
            "fds": totals["fds"], "shm_files": len(shm_files), "shm_bytes": sum(shm_files.values()),
            "shm_all_files": sum(entry.is_file(follow_symlinks=False) for entry in os.scandir(SHM)),
            "shm_all_bytes": shutil.disk_usage(SHM).used}  # all of /dev/shm, unlinked files still held included


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def cpu_sample(root: int | None) -> tuple[float, float | None]:
    """(CPU seconds of this process, user + system seconds of the process tree under `root`, or None)."""
    total = None if root is None else 0.0
    for pid in process_tree(root) if root is not None else []:
        with contextlib.suppress(psutil.Error):
            total += sum(psutil.Process(pid).cpu_times()[:2])
    return time.process_time(), total


def cpu_used(before: Sequence[float | None], root: int | None) -> list[float | None]:
    """The CPU seconds since `before`, a `cpu_sample(root)` (None where unknown)."""
    return [None if a is None or b is None else b - a for a, b in zip(before, cpu_sample(root))]


def cpu_figures(cpu_s: Sequence[float | None], wall_s: float, images: int) -> dict[str, float | None]:
    """Cores used over `wall_s` and CPU ms per image of this process ("client") and the server's tree (None: unknown)."""
    return {f"{who}_{figure}": None if seconds is None or not over else round(scale * seconds / over, 3) for who, seconds in
            zip(("client", "server"), cpu_s) for figure, scale, over in (("cores", 1, wall_s), ("ms_per_image", 1000, images))}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def address(url: str) -> urllib.parse.SplitResult:
    """HOST:PORT, [IPv6]:PORT or grpc://HOST:PORT/ split by urllib: .netloc is HOST:PORT, .hostname and .port."""
    return urllib.parse.urlsplit("//" + url.split("://", 1)[-1])


def require_loopback(url: str, why: str) -> str:
    """The host of HOST:PORT when it is a loopback address (127.0.0.0/8, ::1, localhost), else ValueError."""
    host = address(url).hostname or ""
    if not is_loopback(host):
        raise ValueError(f"{url}: {why} goes to loopback addresses only (127.0.0.0/8, ::1, localhost), not {host!r}: "
                         "run it on the server's host")
    return host


def default_metrics_url(grpc_url: str) -> str:
    """Triton's default metrics URL (port 8002) on the gRPC endpoint's host."""
    return Endpoints(address(grpc_url).hostname or "127.0.0.1", grpc_port=8001, http_port=8000, metrics_port=8002).metrics


def listening_pid(url: str) -> int | None:
    """The process listening on the URL's port on this host, if visible."""
    port = address(url).port
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    pids = {c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    return pids.pop() if len(pids) == 1 else None


def server_health(url: str, models: Sequence[str], pid: int | None = None, timeout: float = 5.0,
                  tls: dict[str, Any] | None = None) -> dict[str, Any]:
    """Is the server process (when known) alive, and do its live, ready and model-ready endpoints say yes?"""
    health: dict[str, Any] = {"process_alive": None if pid is None else alive(pid)}
    with InferenceServerClient(url, **(tls or {})) as client:
        for key, ask in (("live", client.is_server_live), ("ready", client.is_server_ready),
                         ("model_ready", lambda **kw: all(client.is_model_ready(m, **kw) for m in models))):
            try:
                health[key] = bool(ask(client_timeout=timeout))
            except Exception:  # noqa: BLE001 - no answer is the finding
                health[key] = False
    return health


def check_server(url: str, models: Sequence[str], timeout: float = 10.0, tls: dict[str, Any] | None = None) -> None:
    """Fail early, with a clear message, when nothing is serving the models at `url`."""
    health = server_health(url, models, timeout=timeout, tls=tls)
    if not health["live"]:
        raise LoadTestError(f"no Triton server answers gRPC at {url}; start one with `cxrlt serve`")
    if not health["ready"] or not health["model_ready"]:
        raise LoadTestError(f"the Triton server at {url} is not ready to serve {', '.join(models)}")


@contextlib.contextmanager
def target_server(repo: Path | None, url: str | None, log_file: Path | None = None, pid: int | None = None,
                  log: Callable[[str], None] = lambda message: None) -> Iterator[tuple[str, str | None, int | None]]:
    """(gRPC URL, metrics URL, PID) of the server at `url`, or of the embedded tritonserver run on `repo` for the block."""
    if url is not None:
        yield url, default_metrics_url(url), pid if pid is not None else listening_pid(url)
        return
    log(f"starting tritonserver on {repo}")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), log_file=log_file)
    server.start(timeout=600)
    try:
        yield server.endpoints.grpc, server.endpoints.metrics, server.process.pid
    finally:
        server.stop()


@contextlib.contextmanager
def saved_figure(path: Path, title: str, rows: int, columns: int, size: tuple[float, float], legend_loc: str = "best",
                 **subplots: Any) -> Iterator[np.ndarray]:
    """A figure's axes (no pyplot: no display, nothing to close) to draw on in the block, then gridded, titled and written."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    yield (axes := np.ravel(fig.subplots(rows, columns, **subplots)))
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc=legend_loc)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
