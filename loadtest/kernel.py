"""The load-test kernel: what bench, stress and soak share, once.

- requests: `Served` (one gRPC client per worker; each image's tensors built once by
  loadtest.payloads, or the SDK cxrlt.client for shared memory and --send-size) and `drive`,
  a closed loop of N workers;
- measurements (`Measurement`, `figures`) and checks (`Check`);
- the server's process tree from /proc (`process_tree`, `tree_cpu_s`), the loopback rule and
  the server these commands start or find (`target_server`);
- output: `write_json`, `save_figure`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from loadtest.payloads import Payload, grpc_inputs, requested_outputs

PROC = Path("/proc")
SHM = Path("/dev/shm")
MIB = 1024 * 1024


class LoadTestError(RuntimeError):
    """A run that cannot go on as asked (no server, a server that is gone, ...); the message says why."""


@dataclasses.dataclass
class Measurement:
    concurrency: int
    requests: int
    wall_s: float
    latencies_ms: list[float]

    @property
    def images_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "wall_s": round(self.wall_s, 4), "images_per_s": round(self.images_per_s, 3),
                "p50_ms": round(self.percentile(50), 3), "p95_ms": round(self.percentile(95), 3),
                "mean_ms": round(float(np.mean(self.latencies_ms)), 3)}


def pool(measurements: Sequence[Measurement]) -> Measurement:
    """Several rounds of one point as one measurement (requests and wall time summed, latencies pooled)."""
    return Measurement(measurements[0].concurrency, sum(m.requests for m in measurements),
                       sum(m.wall_s for m in measurements), [x for m in measurements for x in m.latencies_ms])


def figures(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / max of a list of latencies (None when empty)."""
    if not len(latencies_ms):
        return {"p50_ms": None, "p95_ms": None, "max_ms": None}
    values = np.asarray(latencies_ms, dtype=float)
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p95_ms": round(float(np.percentile(values, 95)), 3),
            "max_ms": round(float(values.max()), 3)}


def drive(call: Callable[[int, Any], Any], items: Sequence[Any], concurrency: int, total: int) -> Measurement:
    """`total` calls spread over `concurrency` threads (a shared counter hands out the items in turn)."""
    counter, lock = itertools.count(), threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)

    def worker(worker_id: int) -> list[float]:
        latencies = []
        start_gate.wait()
        while True:
            with lock:
                index = next(counter)
            if index >= total:
                return latencies
            began = time.perf_counter()
            call(worker_id, items[index % len(items)])
            latencies.append((time.perf_counter() - began) * 1000.0)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as workers:
        futures = [workers.submit(worker, i) for i in range(concurrency)]
        start_gate.wait()
        began = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - began
    latencies = [x for r in results for x in r]
    return Measurement(concurrency, len(latencies), wall, latencies)


@dataclasses.dataclass
class Check:
    """One target or check with its measured value. kind "target": a timing, which fails stress only
    with --strict; "check": always judged."""

    name: str
    passed: bool
    message: str  # one line: what, measured, the bound, the verdict
    measured: float | None = None
    kind: str = "check"
    figure: str = ""  # the row of a table: what is measured, the measured value and the bound as printed
    shown: str = ""
    limit: Any = None

    def __post_init__(self) -> None:
        self.passed = bool(self.passed)  # numpy comparisons give numpy booleans

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verdicts(checks: Sequence[Check]) -> dict[str, Any]:
    """The report's checks, the names of those missed, and whether all passed."""
    return {"checks": [c.to_json() for c in checks], "missed": [c.name for c in checks if not c.passed],
            "passed": all(c.passed for c in checks)}


class Served:
    """One gRPC client per worker calling `model` (or the model of a (model, payload) item).

    Plain: every (model, image) request's tensors are built once (loadtest.payloads). With
    `shared_memory` or `send_size`, each worker is a cxrlt.client.CxrltClient: the image goes
    through a system shared-memory region registered with the server, or is downscaled by the
    client before sending, in every request, as the SDK does it.
    """

    def __init__(self, url: str, model: str, send_hints: bool = True, timeout_s: float | None = None,
                 shared_memory: bool = False, send_size: int | str | None = None) -> None:
        self.url, self.model, self.send_hints, self.timeout_s = url, model, send_hints, timeout_s
        self.sdk = dict(shared_memory=shared_memory, send_size=send_size) if shared_memory or send_size else None
        self.clients: list = []
        self._requests: dict[tuple[str, str], tuple[list, list]] = {}

    def ensure_clients(self, count: int) -> None:
        while len(self.clients) < count:
            if self.sdk is not None:
                from cxrlt.client import CxrltClient

                self.clients.append(CxrltClient(self.url, model=self.model, retries=1, timeout_s=self.timeout_s or 600.0,
                                                **self.sdk))
            else:
                import tritonclient.grpc as grpcclient

                self.clients.append(grpcclient.InferenceServerClient(self.url))

    def __call__(self, worker: int, item: Payload | tuple[str, Payload]) -> np.ndarray:
        model, payload = item if isinstance(item, tuple) else (self.model, item)
        client = self.clients[worker]
        if self.sdk is not None:
            result = client.classify(payload.pixels, payload.hint if self.send_hints else None, payload.name)
            return np.asarray(list(result.probabilities.values()))
        key = (model, payload.name)
        if key not in self._requests:
            self._requests[key] = (grpc_inputs(payload, model, self.send_hints), requested_outputs(model))
        inputs, outputs = self._requests[key]
        return client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s).as_numpy("PROBABILITIES")[0]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []


# --- the server's process tree ---------------------------------------------------------------


def _stat_fields(pid: int, proc: Path = PROC) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses): state, ppid, ..."""
    return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int, proc: Path = PROC) -> list[int]:
    """`root` and all its descendants (breadth first), from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name), proc)[1]), []).append(int(entry.name))
            except (OSError, IndexError):  # gone since the listing
                continue
    tree = [root] if (proc / str(root)).is_dir() else []
    for pid in tree:  # grows while iterating: breadth first
        tree.extend(sorted(children.get(pid, [])))
    return tree


def _status_kb(pid: int, proc: Path) -> dict[str, int]:
    values = {}
    for line in (proc / str(pid) / "status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0])
    return values


def _label(pid: int, proc: Path) -> str:
    """'tritonserver', the served model a Python-backend stub runs (from its model.py path), or the command name."""
    args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    name = Path(args[0].decode(errors="replace")).name
    if name == "triton_python_backend_stub" and len(args) > 1:
        model_file = Path(args[1].decode(errors="replace"))  # <repository>/<model>/<version>/model.py
        return model_file.parent.parent.name or name
    return name or (proc / str(pid) / "comm").read_text().strip()


def _shm_files(pid: int, proc: Path) -> dict[str, int]:
    """/dev/shm files the process has open or mapped -> allocated bytes (tmpfs blocks)."""
    files: dict[str, int] = {}
    prefix = f"{SHM}/"
    fd_dir = proc / str(pid) / "fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
            if target.startswith(prefix):
                files[target.removesuffix(" (deleted)")] = os.stat(fd_dir / fd).st_blocks * 512
        except OSError:
            continue
    for line in (proc / str(pid) / "maps").read_text().splitlines():
        where = line.find(prefix)
        if where < 0:
            continue
        path = line[where:].removesuffix(" (deleted)")
        if path not in files:
            try:
                files[path] = os.stat(path).st_blocks * 512
            except OSError:  # unlinked but still mapped: counted, its size unknown here
                files[path] = 0
    return files


def shm_usage(shm: Path = SHM) -> tuple[int, int]:
    """(files, allocated bytes) of everything in /dev/shm."""
    files = size = 0
    try:
        entries = list(os.scandir(shm))
    except OSError:
        return 0, 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                files += 1
                size += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue
    return files, size


@dataclasses.dataclass
class Sample:
    requests: int  # requests completed when the sample was taken
    elapsed_s: float
    processes: int
    rss_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    rss_shmem_bytes: int
    fds: int
    shm_files: int  # /dev/shm files the server's tree holds open or mapped
    shm_bytes: int
    shm_all_files: int  # all of /dev/shm, context only
    shm_all_bytes: int
    # label (tritonserver, a served model's stubs, ...) -> processes, and rss / anon / shmem bytes summed over them
    by_process: dict[str, dict[str, int]]
    chunk_p50_ms: float | None = None  # latency of the chunk that ended at this sample
    chunk_p95_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_tree(root: int, requests: int = 0, elapsed_s: float = 0.0, proc: Path = PROC, shm: Path = SHM) -> Sample:
    """One sample of the process tree under `root` (processes that vanish while read are skipped)."""
    totals: Counter = Counter()
    by_label: dict[str, Counter] = {}
    shm_files: dict[str, int] = {}
    processes = 0
    for pid in process_tree(root, proc):
        try:
            status = _status_kb(pid, proc)
            fds = len(os.listdir(proc / str(pid) / "fd"))
            files = _shm_files(pid, proc)
            label = _label(pid, proc)
        except (OSError, ValueError):
            continue
        processes += 1
        for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            totals[key] += status.get(key, 0) * 1024
        totals["fds"] += fds
        shm_files.update(files)
        mine = by_label.setdefault(label, Counter())
        mine["processes"] += 1
        for key, name in (("VmRSS", "rss"), ("RssAnon", "anon"), ("RssShmem", "shmem")):
            mine[name] += status.get(key, 0) * 1024
    if not processes:
        raise LoadTestError(f"process {root} is gone (or /proc/{root} is not readable)")
    all_files, all_bytes = shm_usage(shm)
    return Sample(
        requests=requests, elapsed_s=round(elapsed_s, 3), processes=processes,
        rss_bytes=totals["VmRSS"], rss_anon_bytes=totals["RssAnon"], rss_file_bytes=totals["RssFile"],
        rss_shmem_bytes=totals["RssShmem"], fds=totals["fds"],
        shm_files=len(shm_files), shm_bytes=sum(shm_files.values()), shm_all_files=all_files, shm_all_bytes=all_bytes,
        by_process={label: dict(values) for label, values in sorted(by_label.items())},
    )


def alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def tree_cpu_s(root: int | None) -> float | None:
    """CPU seconds (user + system) the process tree under `root` has used; None without a root."""
    if root is None:
        return None
    total = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def cpu_sample(server_pid: int | None) -> tuple[float, float | None]:
    """(CPU seconds of this process, of the server's tree or None)."""
    return time.process_time(), tree_cpu_s(server_pid)


def require_loopback(url: str, why: str) -> str:
    """The host of HOST:PORT when it is a loopback address (127.0.0.0/8, ::1, localhost), else ValueError."""
    from cxrlt.server.launcher import is_loopback

    rest = url.split("://", 1)[-1]
    host = rest[1:].split("]", 1)[0] if rest.startswith("[") else rest.rsplit(":", 1)[0]
    if not is_loopback(host):
        raise ValueError(f"{url}: {why} goes to loopback addresses only (127.0.0.0/8, ::1, localhost), not {host!r}: "
                         "run it on the server's host")
    return host


def listening_pid(url: str) -> int | None:
    """The process listening on the URL's port on this host, if visible."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    pids = {c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    return pids.pop() if len(pids) == 1 else None


@contextlib.contextmanager
def target_server(repo: Path | None, url: str | None, log_file: Path | None = None, pid: int | None = None,
                  log: Callable[[str], None] = lambda message: None) -> Iterator[tuple[str, str | None, int | None]]:
    """(gRPC URL, metrics URL, server PID): the server at `url` (its PID given or found by its port),
    or the embedded tritonserver started on `repo` on free ports and stopped on leaving."""
    if url is not None:
        yield url, None, pid if pid is not None else listening_pid(url)
        return
    from cxrlt.server.launcher import TritonServer, free_port

    log(f"starting tritonserver on {repo}")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), log_file=log_file)
    server.start(timeout=600)
    try:
        yield server.endpoints.grpc, server.endpoints.metrics, server.process.pid
    finally:
        server.stop()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- output ----------------------------------------------------------------------------------


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def run_folder(path: Path) -> Iterator[Path]:
    """A run's output folder: a run that fails removes it again when it made it (no empty runs/ folders)."""
    top = None if path.exists() else path  # the highest folder this run may create (runs/ too)
    while top is not None and not top.parent.exists():
        top = top.parent
    try:
        yield path
    except BaseException:
        if top is not None and top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        raise


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
