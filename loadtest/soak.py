"""`cxrlt soak`: many requests against one server, its resources sampled as they go, growth judged.

Sends N requests over gRPC, spread evenly over cxr_classifier, cxr_zeroshot and cxr_findings
(the images of loadtest.payloads, each with its hint), in chunks of K requests driven by
`concurrency` workers (loadtest.bench.drive). Between chunks no request is in flight, and the
server's whole process tree (tritonserver and every child: the Python-backend stubs) is sampled
from /proc:

- RSS: VmRSS of every process, summed (with the RssAnon / RssFile / RssShmem split). Pages
  shared between processes count once per process, which a leak does not care about.
- open file descriptors: the entries of /proc/<pid>/fd, summed.
- /dev/shm: the files the tree holds open or has mapped (the Python backend's regions, and
  any system shared-memory region a client registered), their number and allocated bytes.
  The whole /dev/shm is recorded too, as context only: other programs use it as well.

After the warm-up (the first W requests) every series is fitted by least squares: growth % =
fitted increase over the post-warm-up requests / fitted value at the end of the warm-up, and the
slope per 1,000 requests, over all post-warm-up samples and over their later half. Targets:

- RSS growth under 5 % after warm-up (what the run cost);
- RSS not still growing: the later half's slope under 1 MiB per 1,000 requests. A leak keeps its
  slope to the end; an allocator or the Python backend's shared-memory pool reaching its
  high-water mark levels off. A short run settles less and is noisier: give it a bound that a
  real leak there would exceed (the CI soak uses 50 MiB per 1,000 requests);
- no growth in open file descriptors or /dev/shm files: the median of the last few samples
  against that of the first few after warm-up, so one transient descriptor is not a leak while
  any steady growth is;
- no failed request, and every request sent within the time limit.

/dev/shm bytes are reported, not judged: the Python backend grows a stub's region to the largest
load it has seen and never shrinks it, and those pages are in the tree's RSS anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import os
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from loadtest.bench import drive, save_figure
from loadtest.payloads import MODELS, Payload, grpc_inputs, load_payloads, requested_outputs

MIB = 1024 * 1024
PROC = Path("/proc")
SHM = Path("/dev/shm")


class SoakError(RuntimeError):
    """The soak cannot run as asked; the message says why."""


# ---------------------------------------------------------------------------------------------
# Sampling the server's process tree from /proc


def process_tree(root: int, proc: Path = PROC) -> list[int]:
    """`root` and all its descendants (breadth first), from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
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
    totals = Counter()
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
        raise SoakError(f"process {root} is gone (or /proc/{root} is not readable)")
    all_files, all_bytes = shm_usage(shm)
    return Sample(
        requests=requests, elapsed_s=round(elapsed_s, 3), processes=processes,
        rss_bytes=totals["VmRSS"], rss_anon_bytes=totals["RssAnon"], rss_file_bytes=totals["RssFile"],
        rss_shmem_bytes=totals["RssShmem"], fds=totals["fds"],
        shm_files=len(shm_files), shm_bytes=sum(shm_files.values()), shm_all_files=all_files, shm_all_bytes=all_bytes,
        by_process={label: dict(values) for label, values in sorted(by_label.items())},
    )


# ---------------------------------------------------------------------------------------------
# Growth after warm-up


@dataclasses.dataclass
class Growth:
    """How one series moved after the warm-up."""

    metric: str
    samples: int  # samples from the end of the warm-up on (the fit's points)
    at_start: float  # the first sample (before any request)
    after_warmup: float  # the sample at the end of the warm-up
    end: float
    fitted_after_warmup: float
    fitted_end: float
    growth_pct: float | None  # fitted increase after warm-up / fitted value at the end of warm-up
    slope_per_1000: float  # least squares over the post-warm-up samples, per 1,000 requests
    slope_per_1000_later_half: float | None  # the same over the later half: a leak keeps it, a settling allocator does not
    later_half_stderr_per_1000: float | None  # its standard error: what noise alone moves it by
    level_growth: float  # median of the last few samples - median of the first few after warm-up

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope, intercept and the slope's standard error."""
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    spread = float(np.sum((x - x.mean()) ** 2))
    stderr = float(np.sqrt(np.sum(residuals ** 2) / (len(x) - 2) / spread)) if len(x) > 2 and spread > 0 else float("nan")
    return float(slope), float(intercept), stderr


def growth(metric: str, requests: Sequence[int], values: Sequence[float], warmup: int) -> Growth:
    """Growth of `values` (sampled at `requests` completed requests) after `warmup` requests."""
    x_all = np.asarray(requests, dtype=float)
    y_all = np.asarray(values, dtype=float)
    after = x_all >= warmup
    x, y = x_all[after], y_all[after]
    if len(x) < 3:
        raise SoakError(f"{metric}: {len(x)} samples after the warm-up; at least 3 are needed for a slope")
    slope, intercept, _ = _slope(x, y)
    start_fit, end_fit = float(slope * x[0] + intercept), float(slope * x[-1] + intercept)
    half = len(x) // 2
    later = _slope(x[half:], y[half:]) if len(x) - half >= 3 else None
    window = max(1, min(5, len(x) // 4))
    return Growth(
        metric=metric, samples=int(len(x)), at_start=float(y_all[0]), after_warmup=float(y[0]), end=float(y[-1]),
        fitted_after_warmup=start_fit, fitted_end=end_fit,
        growth_pct=100.0 * (end_fit - start_fit) / start_fit if start_fit > 0 else None,
        slope_per_1000=1000.0 * slope,
        slope_per_1000_later_half=None if later is None else 1000.0 * later[0],
        later_half_stderr_per_1000=None if later is None else 1000.0 * later[2],
        level_growth=float(statistics.median(y[-window:]) - statistics.median(y[:window])),
    )


@dataclasses.dataclass
class Targets:
    max_rss_growth_pct: float = 5.0
    max_rss_slope_mib_per_1000: float = 1.0  # over the later half of the post-warm-up samples
    max_fd_growth: int = 0
    max_shm_file_growth: int = 0
    max_failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Check:
    target: str
    passed: bool
    message: str

    def __post_init__(self) -> None:
        self.passed = bool(self.passed)  # numpy comparisons give numpy booleans

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _verdict(passed: bool) -> str:
    return "met" if passed else "MISSED"


def check_growth(series: dict[str, Growth], targets: Targets) -> list[Check]:
    """The growth targets against the series 'rss_bytes', 'fds' and 'shm_files'.

    RSS: the fitted growth over all post-warm-up samples (what the run cost), and the slope over
    their later half (whether it still grows): a leak keeps its slope to the end, while an
    allocator or a shared-memory pool reaching its high-water mark levels off. fds and /dev/shm
    files: the median of the last few samples against that of the first few after warm-up.
    /dev/shm bytes are reported, not judged: the Python backend grows its regions to the largest
    load seen and never shrinks them, and their pages are in the tree's RSS anyway.
    """
    checks = []
    rss = series["rss_bytes"]
    pct = rss.growth_pct if rss.growth_pct is not None else float("inf")
    passed = pct < targets.max_rss_growth_pct
    checks.append(Check("rss_growth_pct", passed, f"RSS growth after warm-up {_verdict(passed)}: {pct:+.2f} % "
                                                  f"(least-squares fit), target < {targets.max_rss_growth_pct:g} %"))
    later = rss.slope_per_1000_later_half if rss.slope_per_1000_later_half is not None else rss.slope_per_1000
    error = f" ± {rss.later_half_stderr_per_1000 / MIB:.3f}" if rss.later_half_stderr_per_1000 is not None else ""
    passed = later / MIB < targets.max_rss_slope_mib_per_1000
    checks.append(Check("rss_slope", passed,
                        f"RSS slope over the later half after warm-up {_verdict(passed)}: {later / MIB:+.3f}{error} MiB per "
                        f"1,000 requests (all after warm-up: {rss.slope_per_1000 / MIB:+.3f}), "
                        f"target < {targets.max_rss_slope_mib_per_1000:g}"))
    for key, name, limit in (("fds", "open file descriptors", targets.max_fd_growth),
                             ("shm_files", "/dev/shm files", targets.max_shm_file_growth)):
        g = series[key]
        passed = g.level_growth <= limit
        checks.append(Check(f"{key}_growth", passed,
                            f"{name} growth {_verdict(passed)}: {g.level_growth:+g} ({g.after_warmup:g} after warm-up, "
                            f"{g.end:g} at the end; slope {g.slope_per_1000:+.3g} per 1,000 requests), target <= {limit:g}"))
    return checks


SERIES = ("rss_bytes", "rss_anon_bytes", "fds", "shm_files", "shm_bytes")


def analyse(samples: Sequence[Sample], warmup: int) -> dict[str, Growth]:
    requests = [s.requests for s in samples]
    return {key: growth(key, requests, [getattr(s, key) for s in samples], warmup) for key in SERIES}


def growth_by_process(samples: Sequence[Sample], warmup: int) -> dict[str, dict[str, int]]:
    """Per process label: RSS, anonymous and shared-memory bytes at the end of the warm-up and their growth by the end."""
    after = next(s for s in samples if s.requests >= warmup)
    end = samples[-1]
    rows = {}
    for label in sorted(set(after.by_process) | set(end.by_process)):
        a, e = after.by_process.get(label, {}), end.by_process.get(label, {})
        rows[label] = {"processes": e.get("processes", 0), "rss_after_warmup": a.get("rss", 0),
                       **{f"{key}_growth": e.get(key, 0) - a.get(key, 0) for key in ("rss", "anon", "shmem")}}
    return rows


# ---------------------------------------------------------------------------------------------
# The run


def loopback_host(url: str) -> str:
    """The host of HOST:PORT when it is a loopback address (127.0.0.0/8, ::1, localhost), else SoakError."""
    rest = url.split("://", 1)[-1]
    host = rest[1:].split("]", 1)[0] if rest.startswith("[") else rest.rsplit(":", 1)[0]
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise SoakError(f"cannot resolve {host!r} ({exc})") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SoakError(f"soak sends to loopback addresses only (the server's processes are read from this "
                        f"machine's /proc), not {host!r}")
    return host


def chunk_bounds(requests: int, sample_every: int, warmup: int) -> list[int]:
    """Request counts at which to sample: 0, every `sample_every`, the end of the warm-up, and the last."""
    return sorted({0, warmup, requests, *range(sample_every, requests, sample_every)})


@dataclasses.dataclass
class SoakConfig:
    requests: int
    url: str | None = None  # a running server (with server_pid), or None to start one on `repo`
    server_pid: int | None = None
    repo: Path | None = None
    sample_every: int = 100
    warmup: int = 1000
    concurrency: int = 4
    image_set: str = "all"
    send_hints: bool = True
    request_timeout_s: float = 60.0
    time_limit_s: float = 3600.0  # the run stops sending after this long and is judged incomplete
    targets: Targets = dataclasses.field(default_factory=Targets)
    server_log: Path | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.repo is None):
            raise SoakError("give either --url (with --server-pid) or --repo (soak starts its own server)")
        if self.url is not None and self.server_pid is None:
            raise SoakError("--url needs --server-pid: the PID of that tritonserver, whose process tree is sampled")
        for name in ("requests", "sample_every", "concurrency"):
            if getattr(self, name) < 1:
                raise SoakError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0 or self.warmup >= self.requests:
            raise SoakError(f"--warmup ({self.warmup}) must be at least 0 and below --requests ({self.requests})")
        post = [b for b in chunk_bounds(self.requests, self.sample_every, self.warmup) if b >= self.warmup]
        if len(post) < 3:
            raise SoakError(f"only {len(post)} samples after the warm-up: lower --sample-every or raise --requests "
                            "(the slope needs at least 3)")
        if self.request_timeout_s <= 0 or self.time_limit_s <= 0:
            raise SoakError("--request-timeout and --time-limit must be positive")


class Caller:
    """One gRPC client per worker; every (model, image) request's tensors built once."""

    def __init__(self, url: str, payloads: Sequence[Payload], concurrency: int, send_hints: bool, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        self.clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]
        self.inputs = {(m, p.name): grpc_inputs(p, m, send_hints) for m in MODELS for p in payloads}
        self.outputs = {m: requested_outputs(m) for m in MODELS}
        self.timeout_s = timeout_s
        self.sent: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: Counter = Counter()  # "model: message" -> count
        self._lock = threading.Lock()

    def __call__(self, worker: int, job: tuple[str, Payload]) -> None:
        model, payload = job
        try:
            self.clients[worker].infer(model, self.inputs[model, payload.name], outputs=self.outputs[model],
                                       client_timeout=self.timeout_s)
            error = None
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, the soak goes on
            error = f"{model}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        with self._lock:
            self.sent[model] += 1
            if error is not None:
                self.failed[model] += 1
                self.errors[error] += 1

    def close(self) -> None:
        for client in self.clients:
            client.close()


def jobs(payloads: Sequence[Payload]) -> list[tuple[str, Payload]]:
    """The request cycle: the models take turns, and each model sees every image."""
    return [(MODELS[i % len(MODELS)], payloads[(i // len(MODELS)) % len(payloads)]) for i in range(len(MODELS) * len(payloads))]


def _alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def run_soak(config: SoakConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the soak; return the report (JSON-ready)."""
    from cxrlt.server.launcher import TritonServer, free_port

    from loadtest.runner import check_server

    load_before = os.getloadavg()
    payloads = load_payloads(config.image_set)
    cycle = jobs(payloads)
    url, pid = config.url, config.server_pid
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with contextlib.ExitStack() as stack:
        if url is None:  # our own server, on free ports, stopped when the stack closes (also on errors)
            log(f"starting tritonserver on {config.repo}")
            if config.server_log is not None:
                config.server_log.parent.mkdir(parents=True, exist_ok=True)
            server = stack.enter_context(TritonServer(config.repo, grpc_port=free_port(), http_port=free_port(),
                                                      metrics_port=free_port(), log_file=config.server_log))
            url, pid = server.endpoints.grpc, server.process.pid
        loopback_host(url)
        if not _alive(pid):
            raise SoakError(f"no running process {pid} (--server-pid)")
        check_server(url, list(MODELS))
        caller = Caller(url, payloads, config.concurrency, config.send_hints, config.request_timeout_s)
        try:
            began = time.monotonic()
            samples = [sample_tree(pid, 0, 0.0)]
            latencies: list[float] = []
            stopped = None
            for start, stop in itertools.pairwise(chunk_bounds(config.requests, config.sample_every, config.warmup)):
                if time.monotonic() - began > config.time_limit_s:
                    stopped = f"time limit of {config.time_limit_s:g} s reached after {start} requests"
                    break
                offset = start % len(cycle)
                measurement = drive(caller, cycle[offset:] + cycle[:offset], config.concurrency, stop - start)
                latencies.extend(measurement.latencies_ms)
                try:
                    if not _alive(pid):
                        raise SoakError(f"process {pid} exited")
                    sample = sample_tree(pid, stop, time.monotonic() - began)
                except SoakError as exc:
                    stopped = f"the server stopped after {stop} requests ({exc})"
                    break
                sample.chunk_p50_ms = round(measurement.percentile(50), 2)
                sample.chunk_p95_ms = round(measurement.percentile(95), 2)
                samples.append(sample)
                log(f"{stop}/{config.requests} requests: RSS {sample.rss_bytes / MIB:.0f} MiB, {sample.fds} fds, "
                    f"{sample.shm_files} shm files, {sum(caller.failed.values())} failures")
            wall_s = time.monotonic() - began
        finally:
            caller.close()
    load_after = os.getloadavg()
    return build_report(config, samples, caller, latencies, wall_s, stopped, url, pid, started_at,
                        server_started=config.url is None, load=(load_before, load_after))


def build_report(config: SoakConfig, samples: Sequence[Sample], caller: Caller, latencies: Sequence[float], wall_s: float,
                 stopped: str | None, url: str, pid: int, started_at: str, server_started: bool,
                 load: tuple[Sequence[float], Sequence[float]]) -> dict[str, Any]:
    done = samples[-1].requests
    checks: list[Check] = []
    series: dict[str, Growth] = {}
    try:
        series = analyse(samples, config.warmup)
    except SoakError as exc:  # stopped before enough samples after warm-up
        checks.append(Check("samples", False, f"growth not measured: {exc}"))
    if series:
        checks.extend(check_growth(series, config.targets))
    failures = sum(caller.failed.values())
    passed = failures <= config.targets.max_failures
    checks.append(Check("max_failures", passed, f"failures {_verdict(passed)}: {failures} failed requests, "
                                                f"target <= {config.targets.max_failures}"))
    passed = stopped is None and done == config.requests
    checks.append(Check("completed", passed, f"requests {'all sent' if passed else 'MISSED'}: {done} of {config.requests}"
                                             + (f" ({stopped})" if stopped else "")))
    return {
        "started_at": started_at,
        "url": url,
        "server_pid": pid,
        "server": "started by cxrlt soak" if server_started else "given (--url, --server-pid)",
        "repository": str(config.repo) if config.repo else None,
        "load": {
            "requests": config.requests, "warmup": config.warmup, "sample_every": config.sample_every,
            "concurrency": config.concurrency, "models": list(MODELS), "image_set": config.image_set,
            "images": [{"name": p.name, "shape": list(p.pixels.shape)} for p in load_payloads(config.image_set)],
            "send_hints": config.send_hints, "request_timeout_s": config.request_timeout_s,
            "time_limit_s": config.time_limit_s,
        },
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load[0]],
                    "load_average_after": [round(x, 2) for x in load[1]]},
        "requests_completed": done,
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(done / wall_s, 3) if wall_s > 0 else None,
        "latency_ms": ({"p50": round(float(np.percentile(latencies, 50)), 2), "p95": round(float(np.percentile(latencies, 95)), 2),
                        "mean": round(float(np.mean(latencies)), 2)} if latencies else None),
        "sent": dict(caller.sent),
        "failed": dict(caller.failed),
        "errors": dict(caller.errors.most_common(10)),
        "growth": {key: g.to_json() for key, g in series.items()},
        "growth_by_process": growth_by_process(samples, config.warmup) if series else None,
        "targets": config.targets.to_json(),
        "checks": [c.to_json() for c in checks],
        "missed": [c.target for c in checks if not c.passed],
        "passed": all(c.passed for c in checks),
        "samples": [s.to_json() for s in samples],
    }


# ---------------------------------------------------------------------------------------------
# Output


def plot(report: dict[str, Any], path: Path) -> Path:
    """RSS, file descriptors, /dev/shm and latency against requests, the warm-up shaded, fits drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    x = np.array([s["requests"] for s in samples], dtype=float)
    warmup = report["load"]["warmup"]
    growth_of = report["growth"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (ax_rss, ax_fd), (ax_shm, ax_lat) = axes

    def fit_line(ax, key: str, scale: float, color: str, unit: str = "") -> None:
        g = growth_of.get(key)
        if g:
            later = g["slope_per_1000_later_half"]
            ax.plot([warmup, x[-1]], [g["fitted_after_warmup"] / scale, g["fitted_end"] / scale], "--", color=color,
                    lw=1.2, label=f"fit after warm-up: {g['slope_per_1000'] / scale:+.3g}{unit} per 1,000 req"
                                  + ("" if later is None else f" (later half {later / scale:+.3g})"))

    ax_rss.plot(x, [s["rss_bytes"] / MIB for s in samples], ".-", color="tab:blue", ms=3, lw=1, label="RSS, whole tree")
    ax_rss.plot(x, [s["rss_anon_bytes"] / MIB for s in samples], ".-", color="tab:cyan", ms=3, lw=1, label="of which anonymous")
    fit_line(ax_rss, "rss_bytes", MIB, "black", " MiB")
    rss = growth_of.get("rss_bytes")
    ax_rss.set_title(f"RSS (tritonserver + {samples[-1]['processes'] - 1} children)"
                     + (f": {rss['growth_pct']:+.2f} % after warm-up" if rss and rss["growth_pct"] is not None else ""))
    ax_rss.set_ylabel("MiB")

    ax_fd.plot(x, [s["fds"] for s in samples], ".-", color="tab:green", ms=3, lw=1, label="open fds, whole tree")
    fit_line(ax_fd, "fds", 1.0, "black")
    ax_fd.set_title("open file descriptors")
    ax_fd.set_ylabel("fds")

    ax_shm.plot(x, [s["shm_files"] for s in samples], ".-", color="tab:purple", ms=3, lw=1, label="files (server's tree)")
    ax_shm.set_ylabel("files")
    ax_shm.set_title("/dev/shm held by the server")
    ax_bytes = ax_shm.twinx()
    ax_bytes.plot(x, [s["shm_bytes"] / MIB for s in samples], ".-", color="tab:orange", ms=3, lw=1, label="MiB (right axis)")
    ax_bytes.set_ylabel("MiB")
    ax_bytes.set_ylim(bottom=0, top=max(1.0, 1.2 * max(s["shm_bytes"] for s in samples) / MIB))

    timed = [(s["requests"], s["chunk_p50_ms"], s["chunk_p95_ms"]) for s in samples if s.get("chunk_p50_ms") is not None]
    if timed:
        ax_lat.plot([t[0] for t in timed], [t[1] for t in timed], ".-", color="tab:red", ms=3, lw=1, label="p50 per chunk")
        ax_lat.plot([t[0] for t in timed], [t[2] for t in timed], ".-", color="tab:pink", ms=3, lw=1, label="p95 per chunk")
    ax_lat.set_title("client latency")
    ax_lat.set_ylabel("ms per request")

    for ax in (ax_rss, ax_fd, ax_shm, ax_lat):
        ax.axvspan(0, warmup, color="0.85", label="warm-up")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in (ax_fd, ax_shm):  # small integer counts: leave headroom so a step shows
        top = max(ax.get_lines()[0].get_ydata())
        ax.set_ylim(0, max(1.0, top * 1.25))
    handles, labels = ax_shm.get_legend_handles_labels()
    more = ax_bytes.get_legend_handles_labels()
    ax_shm.legend(handles + more[0], labels + more[1], fontsize=8, loc="lower right")
    for ax in (ax_rss, ax_fd, ax_lat):
        ax.legend(fontsize=8, loc="lower right")
    for ax in (ax_shm, ax_lat):
        ax.set_xlabel("requests completed")
    verdict = "PASS" if report["passed"] else "MISS: " + ", ".join(report["missed"])
    fig.suptitle(f"cxrlt soak: {report['requests_completed']} requests at concurrency {report['load']['concurrency']} "
                 f"({', '.join(report['load']['models'])}), {verdict}", fontsize=10)
    return save_figure(fig, path, dpi=90)


def summary_table(report: dict[str, Any]):
    from rich import box
    from rich.table import Table

    table = Table(title=f"soak: {report['requests_completed']} requests, warm-up {report['load']['warmup']}, "
                        f"sampled every {report['load']['sample_every']}", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="after warm-up: growth % and slopes per 1,000 requests from least squares; fds and shm: "
                          "median of the last samples minus the first after warm-up; shm MiB is reported, not judged")
    for column in ("metric", "start", "after warm-up", "end", "growth", "slope /1k", "later half /1k", "target", "verdict"):
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True)
    checks = {c["target"]: c["passed"] for c in report["checks"]}

    def verdict(name: str) -> str:
        return "-" if name not in checks else "[green]PASS[/]" if checks[name] else "[bold red]MISS[/]"

    def slopes(g: dict[str, Any], scale: float) -> list[str]:
        later, error = g["slope_per_1000_later_half"], g["later_half_stderr_per_1000"]
        return [f"{g['slope_per_1000'] / scale:+.3g}",
                "-" if later is None else f"{later / scale:+.3g}" + (f" ±{error / scale:.2g}" if error else "")]

    g = report["growth"]
    targets = report["targets"]
    if g:
        for key, name, target, check in (("rss_bytes", "RSS (MiB)", f"growth < {targets['max_rss_growth_pct']:g} %", "rss_growth_pct"),
                                         ("rss_anon_bytes", "  anonymous (MiB)", "", "")):
            s = g[key]
            table.add_row(name, f"{s['at_start'] / MIB:.1f}", f"{s['after_warmup'] / MIB:.1f}", f"{s['end'] / MIB:.1f}",
                          f"{s['growth_pct']:+.2f} %", *slopes(s, MIB), target, verdict(check) if check else "")
            if key == "rss_bytes":
                table.add_row("  RSS still growing", "", "", "", "", "", "", f"later half < {targets['max_rss_slope_mib_per_1000']:g}",
                              verdict("rss_slope"))
        for key, name, scale, spec, target in (("fds", "open fds", 1, ".0f", f"growth <= {targets['max_fd_growth']}"),
                                               ("shm_files", "/dev/shm files", 1, ".0f", f"growth <= {targets['max_shm_file_growth']}"),
                                               ("shm_bytes", "/dev/shm MiB", MIB, ".1f", "")):
            s = g[key]
            table.add_row(name, format(s["at_start"] / scale, spec), format(s["after_warmup"] / scale, spec),
                          format(s["end"] / scale, spec), f"{s['level_growth'] / scale:+{spec}}", *slopes(s, scale), target,
                          verdict(f"{key}_growth") if target else "")
    failures = sum(report["failed"].values())
    table.add_row("failed requests", "", "", str(failures), "", "", "", f"<= {targets['max_failures']}", verdict("max_failures"))
    return table
