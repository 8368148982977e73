"""What bench, stress, soak and the load test share: the images sent, requests (`Served`, `drive`),
measurements and checks, the server's process tree from /proc, the server a run starts or finds,
and output (JSON, figures, rich tables)."""

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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL

PROC, SHM, MIB = Path("/proc"), Path("/dev/shm"), 1024 * 1024
IMAGE_SETS = ("all", "real", "synthetic")
MODELS = (CLASSIFIER_MODEL, ZEROSHOT_MODEL, FINDINGS_MODEL)
HINTED_MODELS = frozenset({CLASSIFIER_MODEL, FINDINGS_MODEL})  # cxr_zeroshot takes no PROJECTION_HINT
RSS_KEYS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


class LoadTestError(RuntimeError):
    """A run that cannot go on as asked (no server, a server that is gone, ...); the message says why."""


# --- the images ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    name: str
    pixels: np.ndarray  # uint16 [H, W], MONOCHROME2
    hint: str | None  # DICOM ViewPosition term, or None when unknown


@lru_cache(maxsize=None)
def load_payloads(image_set: str = "all") -> tuple[Payload, ...]:
    """The real pydicom-data radiograph (RG1_UNCR, 1955 x 1841, through the client's DICOM path) and/or
    the builder's synthetic frontal and lateral ones, each with the hint a PACS would send; decoded once."""
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
        from cxrlt.io.synthetic import synthetic_radiographs

        for projection, pixels in synthetic_radiographs().items():
            payloads.append(Payload(f"synthetic_{projection}", np.ascontiguousarray(pixels, dtype=np.uint16),
                                    {"frontal": "PA", "lateral": "LL"}[projection]))
    return tuple(payloads)


def output_names(model: str) -> list[str]:
    return ["PROBABILITIES"] if model == ZEROSHOT_MODEL else ["PROBABILITIES", "PROJECTION"]


def grpc_request(payload: Payload, model: str, send_hint: bool = True) -> tuple[list, list]:
    """tritonclient.grpc (inputs, requested outputs) for one image: IMAGE and, where the model takes one, the hint."""
    import tritonclient.grpc as grpcclient

    image = grpcclient.InferInput("IMAGE", [1, *payload.pixels.shape], "UINT16")
    image.set_data_from_numpy(payload.pixels[None])
    inputs = [image]
    if send_hint and payload.hint and model in HINTED_MODELS:
        inputs.append(grpcclient.InferInput("PROJECTION_HINT", [1, 1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([[payload.hint.encode()]], dtype=np.object_))
    return inputs, [grpcclient.InferRequestedOutput(name) for name in output_names(model)]


def request_bytes(payload: Payload, model: str, send_hint: bool = True) -> bytes:
    """One image's serialised ModelInferRequest (Triton's public protobuf): an open loop sends it as it is
    instead of serialising 7 MB again in its event loop for every request."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="IMAGE", datatype="UINT16", shape=[1, *payload.pixels.shape])
    request.raw_input_contents.append(np.ascontiguousarray(payload.pixels, dtype="<u2").tobytes())
    if send_hint and payload.hint and model in HINTED_MODELS:
        request.inputs.add(name="PROJECTION_HINT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<I", len(payload.hint)) + payload.hint.encode())  # length, bytes
    for name in output_names(model):
        request.outputs.add(name=name)
    return request.SerializeToString()


def images_json(payloads: Sequence[Payload], send_hints: bool) -> list[dict[str, Any]]:
    return [{"name": p.name, "shape": list(p.pixels.shape), "hint": p.hint if send_hints else None} for p in payloads]


# --- requests and measurements ---------------------------------------------------------------


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


def figures(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / max of a list of latencies (None when empty)."""
    values = np.asarray(latencies_ms, dtype=float)
    return {f"{name}_ms": round(float(np.percentile(values, q)), 3) if len(values) else None
            for name, q in (("p50", 50), ("p95", 95), ("max", 100))}


def drive(call: Callable[[int, Any], Any], items: Sequence[Any], concurrency: int, total: int) -> Measurement:
    """`total` calls spread over `concurrency` threads (a shared counter hands out the items in turn)."""
    counter, lock, start_gate = itertools.count(), threading.Lock(), threading.Barrier(concurrency + 1)

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
        latencies = [x for f in futures for x in f.result()]
        wall = time.perf_counter() - began
    return Measurement(concurrency, len(latencies), wall, latencies)


@dataclasses.dataclass
class Check:
    """One target or check with its measured value. kind "target": a timing (fails stress only with --strict)."""

    name: str
    passed: bool
    message: str  # one line: what, measured, the bound, the verdict
    measured: float | None = None
    kind: str = "check"
    figure: str = ""  # a table row: what is measured, the measured value and the bound as printed
    shown: str = ""
    limit: Any = None

    def __post_init__(self) -> None:
        self.passed = bool(self.passed)  # numpy comparisons give numpy booleans


def verdicts(checks: Sequence[Check]) -> dict[str, Any]:
    return {"checks": [dataclasses.asdict(c) for c in checks], "missed": [c.name for c in checks if not c.passed],
            "passed": all(c.passed for c in checks)}


class Served:
    """One gRPC client per worker calling `model` (or the model of a (model, payload) item), each request's
    tensors built once; with `shared_memory` or `send_size`, each worker is a cxrlt.client.CxrltClient that
    passes the image through shared memory or downscales it, in every request, as the SDK does."""

    def __init__(self, url: str, model: str, send_hints: bool = True, timeout_s: float | None = None,
                 shared_memory: bool = False, send_size: int | str | None = None) -> None:
        self.url, self.model, self.send_hints, self.timeout_s = url, model, send_hints, timeout_s
        self.sdk = dict(shared_memory=shared_memory, send_size=send_size) if shared_memory or send_size else None
        self.clients: list = []
        self.requests: dict[tuple[str, str], tuple[list, list]] = {}

    def ensure_clients(self, count: int) -> None:
        import tritonclient.grpc as grpcclient

        from cxrlt.client import CxrltClient

        while len(self.clients) < count:
            self.clients.append(grpcclient.InferenceServerClient(self.url) if self.sdk is None else CxrltClient(
                self.url, model=self.model, retries=1, timeout_s=self.timeout_s or 600.0, **self.sdk))

    def __call__(self, worker: int, item: Payload | tuple[str, Payload]) -> np.ndarray:
        model, payload = item if isinstance(item, tuple) else (self.model, item)
        if self.sdk is not None:
            result = self.clients[worker].classify(payload.pixels, payload.hint if self.send_hints else None, payload.name)
            return np.asarray(list(result.probabilities.values()))
        if (model, payload.name) not in self.requests:
            self.requests[model, payload.name] = grpc_request(payload, model, self.send_hints)
        inputs, outputs = self.requests[model, payload.name]
        result = self.clients[worker].infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        return result.as_numpy("PROBABILITIES")[0]

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


def _label(pid: int, proc: Path) -> str:
    """'tritonserver', the served model a Python-backend stub runs (from its model.py path), or the command name."""
    args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    name = Path(args[0].decode(errors="replace")).name
    if name == "triton_python_backend_stub" and len(args) > 1:
        return Path(args[1].decode(errors="replace")).parent.parent.name or name  # <repository>/<model>/<version>/model.py
    return name or (proc / str(pid) / "comm").read_text().strip()


def _shm_files(pid: int, proc: Path) -> dict[str, int]:
    """/dev/shm files the process has open or mapped -> allocated bytes (0: unlinked but still mapped)."""
    prefix, fd_dir, files = f"{SHM}/", proc / str(pid) / "fd", {}
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd_dir / fd)).startswith(prefix):
                files[target.removesuffix(" (deleted)")] = os.stat(fd_dir / fd).st_blocks * 512
    for line in (proc / str(pid) / "maps").read_text().splitlines():
        if (where := line.find(prefix)) >= 0 and (path := line[where:].removesuffix(" (deleted)")) not in files:
            try:
                files[path] = os.stat(path).st_blocks * 512
            except OSError:
                files[path] = 0
    return files


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
    by_process: dict[str, dict[str, int]]  # label -> processes, and rss / anon / shmem bytes summed over them
    chunk_p50_ms: float | None = None  # latency of the chunk that ended at this sample
    chunk_p95_ms: float | None = None


def sample_tree(root: int, requests: int = 0, elapsed_s: float = 0.0, proc: Path = PROC, shm: Path = SHM) -> Sample:
    """One sample of the process tree under `root` (processes that vanish while read are skipped)."""
    totals, by_label, shm_files, processes = Counter(), {}, {}, 0
    for pid in process_tree(root, proc):
        try:
            status = {key: int(rest.split()[0]) * 1024 for key, _, rest in
                      (line.partition(":") for line in (proc / str(pid) / "status").read_text().splitlines())
                      if key in RSS_KEYS}
            fds, files, label = len(os.listdir(proc / str(pid) / "fd")), _shm_files(pid, proc), _label(pid, proc)
        except (OSError, ValueError):
            continue
        processes += 1
        totals.update({RSS_KEYS[key]: value for key, value in status.items()}, fds=fds)
        shm_files.update(files)
        mine = by_label.setdefault(label, Counter(processes=0, rss=0, anon=0, shmem=0))
        mine.update(processes=1, **{RSS_KEYS[key]: status.get(key, 0) for key in ("VmRSS", "RssAnon", "RssShmem")})
    if not processes:
        raise LoadTestError(f"process {root} is gone (or /proc/{root} is not readable)")
    every = Counter()  # all of /dev/shm
    with contextlib.suppress(OSError):
        for entry in os.scandir(shm):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    every.update(files=1, size=entry.stat(follow_symlinks=False).st_blocks * 512)
    return Sample(requests, round(elapsed_s, 3), processes, totals["rss"], totals["anon"], totals["file"], totals["shmem"],
                  totals["fds"], len(shm_files), sum(shm_files.values()), every["files"], every["size"],
                  {label: dict(values) for label, values in sorted(by_label.items())})


def alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def cpu_sample(root: int | None) -> tuple[float, float | None]:
    """(CPU seconds of this process, user + system seconds of the process tree under `root`, or None)."""
    if root is None:
        return time.process_time(), None
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            total += sum(int(v) for v in _stat_fields(pid)[11:13])  # utime, stime (fields 14 and 15 of stat)
    return time.process_time(), total / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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


# --- output ----------------------------------------------------------------------------------


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """matplotlib's subplots on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path, title: str, axes: Sequence[Any] = (), dpi: int = 110) -> Path:
    """Title, grid and legend on `axes`, then lay out, write and close the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None):
    """A rich table: the first column and those named with a leading '<' left-aligned, the others right."""
    from rich import box
    from rich.table import Table

    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption=caption)
    for i, column in enumerate(columns):
        out.add_column(column.lstrip("<"), justify="left" if i == 0 or column.startswith("<") else "right", no_wrap=True)
    for row in rows:
        out.add_row(*row)
    return out


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}" + (f" {unit}" if unit else "")


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else "[green]PASS[/]" if passed else "[bold red]MISS[/]"


def print_wide(console, renderable, width: int = 120) -> None:
    """Print at full width when the output is a file or a pipe (rich assumes 80 columns there)."""
    if console.is_terminal or console.width >= width:
        console.print(renderable)
        return
    from rich.console import Console

    Console(file=console.file, width=width, highlight=False).print(renderable)


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
