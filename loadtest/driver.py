"""`cxrlt stress` and `cxrlt soak`: two modes of one driver against one server on this host (loadtest/README.md).

stress: saturation (a closed loop at concurrency 1, 2, 4, ... until throughput stops growing), a
storm (an open loop at `overload` x that rate; refusals classified by the queue policy's messages),
then recovery to the unloaded p50; every answer checked against the in-process pipeline.
soak: N requests over the three public models in chunks, the server's process tree sampled between
chunks; each series' growth after the warm-up fitted by least squares (a leak keeps its slope over
the later half, a high-water mark levels off) and judged against targets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxrlt.client.sdk import OVERLOAD_MESSAGES
from cxrlt.contract.served import CLASSIFIER_MODEL
from loadtest.kernel import (IMAGE_SETS, MIB, MODELS, Check, LoadTestError, Measurement, Payload, Sample, Served, alive,
                             cpu_sample, drive, figures, fmt, images_json, load_average, load_payloads, request_bytes,
                             require_loopback, sample_tree, save_figure, subplots, table, target_server, verdict, verdicts)

REASONS = ("queue_full", "queue_timeout", "other")
QUEUE_MESSAGES = dict(zip(REASONS, OVERLOAD_MESSAGES))  # reason -> the queue policy's message, lower case
SERIES = ("rss_bytes", "rss_anon_bytes", "fds", "shm_files", "shm_bytes")


def _at_least(config: Any, bound: float, names: Sequence[str], strict: bool = False) -> None:
    for name in names:
        if not (getattr(config, name) > bound if strict else getattr(config, name) >= bound):
            raise ValueError(f"--{name.replace('_', '-')} must be {'positive' if strict else f'at least {bound}'}, "
                             f"not {getattr(config, name)!r}")


@dataclasses.dataclass
class DriveConfig:
    """What both modes share: the server (a running one at `url`, or one started on `repo`) and the images."""

    repo: Path | None = None
    url: str | None = None  # gRPC HOST:PORT of a server on this host
    server_pid: int | None = None  # None: the process listening on the URL's port
    metrics_url: str | None = None  # None: Triton's default metrics port on the URL's host
    image_set: str = "all"
    send_hints: bool = True
    request_timeout_s: float = 60.0
    server_log: Path | None = None  # log of a server started here

    mode = "drive"

    def __post_init__(self) -> None:
        if self.image_set not in IMAGE_SETS:
            raise ValueError(f"image set must be one of {IMAGE_SETS}")
        if self.url is None and self.repo is None:
            raise ValueError(f"cxrlt {self.mode}: give --url (a server on this host) or --repo (it starts one on it)")
        if self.url is not None:
            self.url = self.url.split("://", 1)[-1].rstrip("/")
            require_loopback(self.url, f"cxrlt {self.mode}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--timeout-s must be positive, not {self.request_timeout_s!r}")


@dataclasses.dataclass
class StressTargets:
    max_rejection_p95_ms: float = 50.0  # overload is refused fast
    max_admitted_p95_factor: float = 2.0  # admitted p95 <= this x the p95 at saturation
    min_goodput_share: float = 0.9  # admitted throughput >= this x the saturation throughput
    recovery_factor: float = 1.5  # recovered: p50 at concurrency 1 <= this x the unloaded p50 ...
    max_recovery_s: float = 5.0  # ... within this many seconds after the storm


@dataclasses.dataclass
class StressConfig(DriveConfig):
    model: str = CLASSIFIER_MODEL
    overload: float = 3.0  # offered rate = overload x saturation throughput
    duration_s: float = 30.0
    arrivals: str = "poisson"  # or "fixed"
    seed: int = 0
    request_timeout_s: float = 10.0  # client timeout of each storm request (> the queue timeout)
    max_in_flight: int = 256  # storm requests outstanding at once; an arrival beyond it is not sent
    max_requests: int = 20_000
    saturation_requests: int = 60  # measured requests per concurrency level of the closed loop
    max_concurrency: int = 32
    growth: float = 0.05
    recovery_timeout_s: float = 30.0
    parity_tolerance: float = 1e-4
    targets: StressTargets = dataclasses.field(default_factory=StressTargets)

    mode = "stress"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repo is None:
            raise ValueError("cxrlt stress needs --repo: the repository served, for the reference answers")
        for name, value, choices in (("model", self.model, MODELS), ("arrivals", self.arrivals, ("poisson", "fixed"))):
            if value not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, not {value!r}")
        _at_least(self, 0, ("overload", "duration_s", "recovery_timeout_s"), strict=True)
        _at_least(self, 1, ("max_in_flight", "max_requests", "saturation_requests", "max_concurrency"))


@dataclasses.dataclass
class SoakTargets:
    max_rss_growth_pct: float = 5.0
    max_rss_slope_mib_per_1000: float = 1.0  # over the later half of the post-warm-up samples
    max_fd_growth: int = 0
    max_shm_file_growth: int = 0
    max_failures: int = 0


def chunk_bounds(requests: int, sample_every: int, warmup: int) -> list[int]:
    """Request counts at which to sample: 0, every `sample_every`, the end of the warm-up, and the last."""
    return sorted({0, warmup, requests, *range(sample_every, requests, sample_every)})


@dataclasses.dataclass
class SoakConfig(DriveConfig):
    requests: int = 0
    sample_every: int = 100
    warmup: int = 1000
    concurrency: int = 4
    time_limit_s: float = 3600.0  # the run stops sending after this long and is judged incomplete
    targets: SoakTargets = dataclasses.field(default_factory=SoakTargets)

    mode = "soak"

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 1, ("requests", "sample_every", "concurrency"))
        if self.warmup < 0 or self.warmup >= self.requests:
            raise ValueError(f"--warmup ({self.warmup}) must be at least 0 and below --requests ({self.requests})")
        post = [b for b in chunk_bounds(self.requests, self.sample_every, self.warmup) if b >= self.warmup]
        if len(post) < 3:
            raise ValueError(f"only {len(post)} samples after the warm-up: lower --sample-every or raise --requests "
                             "(the slope needs at least 3)")
        _at_least(self, 0, ("time_limit_s",), strict=True)


def run(config: DriveConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the mode's phases against the server; return the figures and checks (JSON-ready)."""
    from loadtest.metrics import default_metrics_url
    from loadtest.runner import check_server

    payloads, stress = load_payloads(config.image_set), isinstance(config, StressConfig)
    models = [config.model] if stress else list(MODELS)
    before, started_at = load_average(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with target_server(config.repo, config.url, config.server_log, config.server_pid, log) as (url, metrics_url, pid):
        check_server(url, models)
        if pid is not None and not alive(pid):
            raise LoadTestError(f"no running process {pid} (--server-pid)")
        metrics_url = config.metrics_url or metrics_url or default_metrics_url(url)
        report = (_stress if stress else _soak)(config, url, metrics_url, pid, payloads, log)
        report["health_after"] = server_health(url, models, pid)
    report.update({
        "url": url, "server_pid": pid, "repository": str(config.repo) if config.repo else None, "started_at": started_at,
        "server": f"started by cxrlt {config.mode}" if config.url is None else "given (--url)",
        "images": images_json(payloads, config.send_hints),
        "load_average": {"before": before, "after": load_average()}, "cpus": os.cpu_count(),
    })
    checks = (stress_checks if stress else soak_checks)(report, config)
    report.update(verdicts(checks))
    report["missed_targets"] = [c.name for c in checks if c.kind == "target" and not c.passed]
    report["failed_checks"] = [c.name for c in checks if c.kind == "check" and not c.passed]
    return report


def server_health(url: str, models: Sequence[str], pid: int | None = None) -> dict[str, Any]:
    """Is the server process (when known) alive, and do its live, ready and model-ready endpoints say yes?"""
    import tritonclient.grpc as grpcclient

    health: dict[str, Any] = {"process_alive": None if pid is None else alive(pid)}
    client = grpcclient.InferenceServerClient(url)
    try:
        for key, ask in (("live", client.is_server_live), ("ready", client.is_server_ready),
                         ("model_ready", lambda **kw: all(client.is_model_ready(m, **kw) for m in models))):
            try:
                health[key] = bool(ask(client_timeout=5.0))
            except Exception:  # noqa: BLE001 - no answer is the finding
                health[key] = False
    finally:
        client.close()
    return health


# --- stress ----------------------------------------------------------------------------------


def _stress(config: StressConfig, url: str, metrics_url: str, pid: int | None, payloads: Sequence[Payload],
            log: Callable[[str], None]) -> dict[str, Any]:
    from cxrlt.contract.manifest import read_manifest

    from loadtest.bench import RawSide
    from loadtest.metrics import breakdown_json, diff, try_scrape

    log("reference probabilities: the pipeline in process on the repository's ONNX files")
    with contextlib.closing(RawSide(config.repo, config.model, threads=1)) as raw:
        parity = Parity({p.name: np.asarray(raw(0, p), dtype=np.float64) for p in payloads}, config.parity_tolerance)
    served = Served(url, config.model, config.send_hints)
    try:
        served.ensure_clients(1)
        for payload in payloads:  # warms the server and refuses a server that does not serve --repo
            if not parity(payload, served(0, payload)):
                raise LoadTestError(f"{config.model} at {url} answers {payload.name} {parity.max_abs_diff:.2e} away from "
                                    f"the pipeline of {config.repo}: is the server serving --repo?")
        saturation = find_saturation(served, payloads, parity, config, log, pid)
        rate = config.overload * saturation["images_per_s"]
        log(f"storm: {rate:.1f} requests/s ({config.overload:g} x {saturation['images_per_s']:.1f}) for {config.duration_s:g} s")
        before = try_scrape(metrics_url)[0]
        storm = asyncio.run(_Storm(config, url, payloads, parity).run(rate, served, saturation["unloaded_p50_ms"], pid))
        after = try_scrape(metrics_url, before, {config.model: storm["admitted"]})[0] if before is not None else None
    finally:
        served.close()
    return {"model": config.model, "profile": read_manifest(config.repo).get("profile"), "overload": config.overload,
            "request_timeout_s": config.request_timeout_s, "saturation": saturation, "storm": storm,
            "parity": {f.name: getattr(parity, f.name) for f in dataclasses.fields(parity)[1:]}, "targets": dataclasses.asdict(config.targets),
            "triton": breakdown_json(diff(before, after)) if after is not None else None}


def rejection_reason(status: str | None, message: str | None) -> str:
    """queue_full / queue_timeout (UNAVAILABLE from the queue policy), else other."""
    if "UNAVAILABLE" in (status or ""):
        for reason, text in QUEUE_MESSAGES.items():
            if text in (message or "").lower():
                return reason
    return "other"


def arrival_times(rate: float, duration_s: float, arrivals: str, seed: int, max_requests: int) -> np.ndarray:
    """Send times (seconds from the start) of an open loop at `rate` requests/s for `duration_s`."""
    if not rate > 0:
        raise ValueError(f"arrival rate must be positive, not {rate!r}")
    expected = int(np.ceil(rate * duration_s))
    if arrivals == "fixed":
        times = np.arange(expected) / rate
    else:
        times = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=expected + 10 * int(np.sqrt(expected)) + 10))
    return times[times < duration_s][:max_requests]


def saturation_index(throughputs: Sequence[float], growth: float) -> tuple[int, bool]:
    """(index of the highest throughput, whether the sweep stops: the last level is not more than `growth`
    above the best before it)."""
    stop = len(throughputs) > 1 and throughputs[-1] <= (1.0 + growth) * max(throughputs[:-1])
    return int(np.argmax(throughputs)), stop


def recovered_after(probes: Sequence[tuple[float, float | None]], threshold_ms: float, window: int) -> float | None:
    """The first time (seconds after the storm) at which the p50 of the last `window` answered probes is
    <= threshold_ms; probes are (answered at, latency ms or None when refused, which restarts the window)."""
    latencies: collections.deque[float] = collections.deque(maxlen=window)
    for at, latency in probes:
        if latency is None:
            latencies.clear()
        else:
            latencies.append(latency)
            if len(latencies) == window and float(np.median(latencies)) <= threshold_ms:
                return at
    return None


@dataclasses.dataclass
class Parity:
    """Every answered request's probabilities against the reference for the same image."""

    reference: dict[str, np.ndarray] = dataclasses.field(repr=False)
    tolerance: float
    responses_checked: int = 0
    wrong: int = 0
    max_abs_diff: float = 0.0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, payload: Payload, probabilities: np.ndarray) -> bool:
        diff = float(np.max(np.abs(np.asarray(probabilities, dtype=np.float64) - self.reference[payload.name])))
        with self.lock:
            self.responses_checked += 1
            self.max_abs_diff = max(self.max_abs_diff, diff)
            self.wrong += not diff <= self.tolerance
        return diff <= self.tolerance


class Refusals:
    """Refused requests by reason, and each distinct (status, message) with its count."""

    def __init__(self) -> None:
        self.latencies_ms: dict[str, list[float]] = {reason: [] for reason in REASONS}
        self.kinds: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.by_image: dict[str, list[float]] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def add(self, exc: Exception, latency_ms: float, image: str | None = None) -> str:
        if hasattr(exc, "code") and hasattr(exc, "details"):  # grpc.aio's own error
            status, message = str(exc.code()), str(exc.details() or exc)
        else:  # tritonclient's InferenceServerException, or any other
            status = str((exc.status() if hasattr(exc, "status") else None) or type(exc).__name__)
            message = str((exc.message() if hasattr(exc, "message") else None) or exc)
        reason = rejection_reason(status, message)
        with self.lock:
            self.latencies_ms[reason].append(latency_ms)
            self.kinds[reason, status, message[:300]] += 1
            if image is not None:
                self.by_image[image].append(latency_ms)
        return reason

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    def to_json(self) -> dict[str, Any]:
        every = [x for v in self.latencies_ms.values() for x in v]
        return {
            "total": self.total, "by_reason": {reason: len(v) for reason, v in self.latencies_ms.items()},
            "latency": {"all": figures(every), **{reason: figures(v) for reason, v in self.latencies_ms.items()}},
            "latency_by_image": {image: {"count": len(v), **figures(v)} for image, v in sorted(self.by_image.items())},
            "kinds": [{"reason": r, "status": s, "message": m, "count": n} for (r, s, m), n in self.kinds.most_common()],
        }


def find_saturation(served: Served, payloads: Sequence[Payload], parity: Parity, config: StressConfig,
                    log: Callable[[str], None], server_pid: int | None = None) -> dict[str, Any]:
    """The closed loop at concurrency 1, 2, 4, ... up to max_concurrency, until throughput stops growing."""
    from tritonclient.utils import InferenceServerException

    def call(worker: int, payload: Payload) -> None:
        try:
            parity(payload, served(worker, payload))
        except InferenceServerException as exc:
            refusals.add(exc, 0.0)  # a closed-loop refusal's latency is not recorded

    levels = [2 ** k for k in range(config.max_concurrency.bit_length())]
    points: list[tuple[int, Measurement, dict[str, Any]]] = []
    refused, note = None, f"throughput still grew at the largest concurrency ({levels[-1]})"
    for level in levels:
        served.ensure_clients(level)
        refusals = Refusals()
        drive(call, payloads, level, max(level, len(payloads)))  # warm-up, untimed
        total = max(config.saturation_requests, 4 * level)
        log(f"saturation: closed loop at concurrency {level}, {total} requests")
        before = cpu_sample(server_pid)
        measurement = drive(call, payloads, level, total)
        cpu = _cpu_figures(before, cpu_sample(server_pid), measurement.wall_s, measurement.requests)
        if refusals.total:
            refused = {"concurrency": level, **{k: v for k, v in refusals.to_json().items() if k in ("total", "by_reason", "kinds")}}
            note = f"concurrency {level} was refused {refusals.total} time(s): the closed loop outgrew the queue"
            break
        points.append((level, measurement, cpu))
        if saturation_index([m.images_per_s for _, m, _ in points], config.growth)[1]:
            note = f"throughput at concurrency {level} was not more than {100 * config.growth:g} % above the best lower level"
            break
    if not points:
        raise LoadTestError(f"every request at concurrency 1 was refused: {refusals.to_json()['kinds']}")
    level, at, cpu = points[saturation_index([m.images_per_s for _, m, _ in points], config.growth)[0]]
    return {"concurrency": level, "images_per_s": round(at.images_per_s, 3), "p50_ms": round(at.percentile(50), 3),
            "p95_ms": round(at.percentile(95), 3), "unloaded_p50_ms": round(points[0][1].percentile(50), 3),
            "stopped": note, "refused": refused, "cpu": cpu,
            "sweep": [{"concurrency": c, **m.to_json(), "cpu": u} for c, m, u in points]}


class _Storm:
    """The open loop (phase 2), then the recovery probes (phase 3)."""

    def __init__(self, config: StressConfig, url: str, payloads: Sequence[Payload], parity: Parity) -> None:
        self.config, self.url, self.payloads, self.parity = config, url, payloads, parity
        self.refusals = Refusals()
        self.admitted: list[tuple[float, float, str]] = []  # (answered at, latency ms, image), seconds from the start
        self.sends: list[tuple[float, str]] = []  # (sent at, outcome: admitted / reason)
        self.not_sent = self.in_flight = 0  # arrivals dropped at max_in_flight; requests outstanding
        self.live: list[tuple[float, float | None]] = []  # (asked at, answer ms or None)
        self.send_lag_ms: list[float] = []

    async def run(self, rate: float, served: Served, unloaded_p50_ms: float, server_pid: int | None) -> dict[str, Any]:
        import grpc
        import tritonclient.grpc.aio as aio
        from tritonclient.grpc import service_pb2

        # No message size limit; Triton's ModelInfer taking each image's request serialised once.
        monitor = aio.InferenceServerClient(self.url)
        channel = grpc.aio.insecure_channel(self.url, options=[("grpc.max_send_message_length", -1),
                                                               ("grpc.max_receive_message_length", -1)])
        model_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                          response_deserializer=service_pb2.ModelInferResponse.FromString)
        loop = asyncio.get_running_loop()
        self.start, done = loop.time(), asyncio.Event()
        watcher = asyncio.create_task(self._watch_live(monitor, done))
        times = arrival_times(rate, self.config.duration_s, self.config.arrivals, self.config.seed, self.config.max_requests)
        before = cpu_sample(server_pid), machine_cpu()
        try:
            tasks = await self._send_all(model_infer, times)
            storm_end = loop.time()
            after = cpu_sample(server_pid), machine_cpu()
            recovery = await self._recover(served, unloaded_p50_ms, storm_end)
            if tasks:  # whatever the storm left outstanding: answered by now, or given up on
                _, pending = await asyncio.wait(set(tasks), timeout=self.config.request_timeout_s + 5.0)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            done.set()
            await watcher
            await channel.close()
            await monitor.close()
        return self._summary(rate, len(times), storm_end - self.start, before, after, recovery)

    async def _send_all(self, model_infer: Callable, times: np.ndarray) -> set[asyncio.Task]:
        from tritonclient.grpc import InferResult

        config, loop, start = self.config, asyncio.get_running_loop(), self.start
        requests = {p.name: request_bytes(p, config.model, config.send_hints) for p in self.payloads}

        async def one(payload: Payload, index: int) -> None:
            sent = loop.time()
            self.in_flight += 1
            try:
                response = await model_infer(requests[payload.name], timeout=config.request_timeout_s)
            except Exception as exc:  # noqa: BLE001 - every refusal is classified, none is lost
                self.sends[index] = (self.sends[index][0], self.refusals.add(exc, 1000 * (loop.time() - sent), payload.name))
            else:
                answered = loop.time()
                self.admitted.append((answered - start, 1000 * (answered - sent), payload.name))
                self.sends[index] = (self.sends[index][0], "admitted")
                self.parity(payload, InferResult(response).as_numpy("PROBABILITIES")[0])
            finally:
                self.in_flight -= 1

        tasks: set[asyncio.Task] = set()
        for i, at in enumerate(times):
            await asyncio.sleep(max(start + at - loop.time(), 0.0))  # behind schedule: still let answers in between sends
            self.send_lag_ms.append(1000 * max(0.0, loop.time() - start - at))
            if self.in_flight >= config.max_in_flight:
                self.not_sent += 1
                continue
            self.sends.append((loop.time() - start, "pending"))
            task = asyncio.create_task(one(self.payloads[i % len(self.payloads)], len(self.sends) - 1))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return tasks

    async def _watch_live(self, monitor: Any, done: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            asked = loop.time()
            try:
                live = await monitor.is_server_live(client_timeout=5.0)
            except Exception:  # noqa: BLE001 - no answer is the finding
                live = False
            self.live.append((asked - self.start, 1000 * (loop.time() - asked) if live else None))
            try:
                await asyncio.wait_for(done.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    def _summary(self, rate: float, scheduled: int, window: float, before: tuple, after: tuple,
                 recovery: dict[str, Any]) -> dict[str, Any]:
        in_window = [latency for at, latency, _ in self.admitted if at <= window]
        by_image: dict[str, list[float]] = collections.defaultdict(list)
        for _, latency, image in self.admitted:
            by_image[image].append(latency)
        answers = [ms for _, ms in self.live if ms is not None]
        return {
            "rate_offered": round(rate, 3), "arrivals": self.config.arrivals, "duration_s": round(window, 3),
            "scheduled": scheduled, "sent": len(self.sends), "not_sent_at_max_in_flight": self.not_sent,
            "rate_sent": round(len(self.sends) / window, 3) if window > 0 else None,
            "send_lag": figures(self.send_lag_ms),  # how far behind its schedule the client sent
            "admitted": len(self.admitted), "admitted_in_storm": len(in_window),
            "goodput_images_per_s": round(len(in_window) / window, 3) if window > 0 else 0.0,
            "admitted_latency": figures([latency for _, latency, _ in self.admitted]),
            "admitted_latency_by_image": {image: {"count": len(v), **figures(v)} for image, v in sorted(by_image.items())},
            "rejected": self.refusals.to_json(),
            "live_probes": {"asked": len(self.live), "unanswered": len(self.live) - len(answers),
                            **{k.replace("_ms", "_answer_ms"): v for k, v in figures(answers).items()}},
            "cpu": {**_cpu_figures(before[0], after[0], window, len(in_window)), "cores": os.cpu_count(),
                    "machine_busy_share": round((after[1][0] - before[1][0]) / max(after[1][1] - before[1][1], 1e-9), 3)},
            "timeline": _timeline(self.sends, self.admitted, window),
            "recovery": recovery,
        }

    async def _recover(self, served: Served, unloaded_p50_ms: float, storm_end: float) -> dict[str, Any]:
        """Sequential requests from the end of the storm until the p50 of the last window is back."""
        from tritonclient.utils import InferenceServerException

        config, loop, probes = self.config, asyncio.get_running_loop(), []
        window, threshold, recovered_at = 2 * len(self.payloads), config.targets.recovery_factor * unloaded_p50_ms, None
        for payload in itertools.cycle(self.payloads):
            if recovered_at is not None or loop.time() - storm_end >= config.recovery_timeout_s:
                break
            sent = loop.time()
            try:
                probabilities = await asyncio.to_thread(served, 0, payload)
            except InferenceServerException:
                latency = None
            else:
                latency = 1000 * (loop.time() - sent)
                self.parity(payload, probabilities)
            probes.append((loop.time() - storm_end, latency))
            recovered_at = recovered_after(probes, threshold, window)
        answered = [ms for _, ms in probes if ms is not None]
        return {
            "recovered": recovered_at is not None, "seconds": None if recovered_at is None else round(recovered_at, 3),
            "threshold_p50_ms": round(threshold, 3), "window_requests": window, "probes": len(probes),
            "probes_refused": len(probes) - len(answered),
            "p50_of_last_window_ms": round(float(np.median(answered[-window:])), 3) if answered else None,
            "gave_up_after_s": config.recovery_timeout_s,
            "probe_latencies": [[round(at, 3), None if ms is None else round(ms, 2)] for at, ms in probes],
        }


def _cpu_figures(before: tuple[float, float | None], after: tuple[float, float | None], wall_s: float,
                 admitted: int) -> dict[str, float | None]:
    """Cores this client and the server's process tree used over `wall_s`, and server CPU ms per admitted image."""
    server = None if before[1] is None or after[1] is None else after[1] - before[1]
    return {
        "client_cores": round((after[0] - before[0]) / wall_s, 3) if wall_s > 0 else None,
        "server_cores": round(server / wall_s, 3) if server is not None and wall_s > 0 else None,
        "server_cpu_ms_per_admitted": round(1000 * server / admitted, 2) if server is not None and admitted else None,
    }


def _timeline(sends: Sequence[tuple[float, str]], admitted: Sequence[tuple[float, float, str]], window: float) -> list[dict[str, Any]]:
    """Per second of the storm: requests sent and how they ended, and the p95 of what was answered then."""
    seconds = int(np.ceil(window)) or 1
    rows = [{"second": s, "sent": 0, "admitted": 0, **dict.fromkeys(REASONS, 0), "admitted_p95_ms": None} for s in range(seconds)]
    for at, outcome in sends:
        row = rows[min(int(at), seconds - 1)]
        row["sent"] += 1
        if outcome in row:
            row[outcome] += 1
    by_second: dict[int, list[float]] = collections.defaultdict(list)
    for at, latency, _ in admitted:
        by_second[min(int(at), seconds - 1)].append(latency)
    for second, latencies in by_second.items():
        rows[second]["admitted_p95_ms"] = figures(latencies)["p95_ms"]
    return rows


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU time of the whole machine, from the first line of /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (float(v) for v in Path("/proc/stat").read_text().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _check(name: str, kind: str, figure: str, measured: float | None, shown: str, limit: str, passed: bool) -> Check:
    return Check(name, passed, f"{figure} {'met' if passed else 'MISSED'}: {shown}, target {limit}", measured, kind,
                 figure, shown, limit)


def stress_checks(report: dict[str, Any], config: StressConfig) -> list[Check]:
    t, saturation, storm, parity = config.targets, report["saturation"], report["storm"], report["parity"]
    rejected, recovery, after = storm["rejected"], storm["recovery"], report["health_after"]
    down = after["process_alive"] is False or storm["live_probes"]["unanswered"] > 0 or not after["live"] or not after["ready"]
    crashes = report["server_crashes"] = int(down)
    rejection_p95, admitted_p95 = rejected["latency"]["all"]["p95_ms"], storm["admitted_latency"]["p95_ms"]
    admitted_limit = t.max_admitted_p95_factor * saturation["p95_ms"]
    goodput, goodput_limit = storm["goodput_images_per_s"], t.min_goodput_share * saturation["images_per_s"]
    other = rejected["by_reason"]["other"] + ((saturation["refused"] or {}).get("by_reason") or {}).get("other", 0)
    return [
        _check("rejection_p95", "target", "rejection latency p95", rejection_p95, fmt(rejection_p95, unit="ms"),
               f"< {t.max_rejection_p95_ms:g} ms", rejection_p95 is not None and rejection_p95 < t.max_rejection_p95_ms),
        _check("admitted_p95", "target", "admitted p95", admitted_p95, fmt(admitted_p95, unit="ms"),
               f"<= {t.max_admitted_p95_factor:g} x p95 at saturation = {admitted_limit:.0f} ms",
               admitted_p95 is not None and admitted_p95 <= admitted_limit),
        _check("goodput", "target", "goodput (admitted img/s)", goodput, fmt(goodput, unit="img/s"),
               f">= {100 * t.min_goodput_share:g} % of saturation = {goodput_limit:.1f} img/s", goodput >= goodput_limit),
        _check("recovery", "target", "recovery (p50 at concurrency 1)", recovery["seconds"],
               fmt(recovery["seconds"], ".2f", "s") if recovery["recovered"] else f"not in {recovery['gave_up_after_s']:g} s",
               f"<= {t.max_recovery_s:g} s to p50 <= {t.recovery_factor:g} x unloaded = {recovery['threshold_p50_ms']:.0f} ms",
               recovery["recovered"] and recovery["seconds"] <= t.max_recovery_s),
        _check("wrong_responses", "check", f"wrong answers (of {parity['responses_checked']})", parity["wrong"],
               f"{parity['wrong']} (max |diff| {parity['max_abs_diff']:.1e})", f"0 (|diff| <= {parity['tolerance']:g})",
               parity["wrong"] == 0),
        _check("server_crashes", "check", "server crashes", crashes, str(crashes), "0", crashes == 0 and after["model_ready"]),
        _check("other_rejections", "check", "refused not by the queue policy", other, str(other), "0", other == 0),
    ]


def stress_table(report: dict[str, Any]):
    saturation, storm = report["saturation"], report["storm"]
    rejected, by = storm["rejected"], storm["rejected"]["by_reason"]
    rows = [
        (f"saturation (closed loop, concurrency {saturation['concurrency']})", f"{saturation['images_per_s']:.1f} img/s"),
        ("p50 / p95 at saturation", f"{fmt(saturation['p50_ms'], unit='ms')} / {fmt(saturation['p95_ms'], unit='ms')}"),
        ("unloaded p50 (concurrency 1)", fmt(saturation["unloaded_p50_ms"], unit="ms")),
        ("offered / sent (send lag p95)", f"{storm['rate_offered']:.1f} / {storm['rate_sent']:.1f} req/s "
                                          f"({fmt(storm['send_lag']['p95_ms'], unit='ms')})"),
        ("sent: admitted / rejected", f"{storm['sent']}: {storm['admitted']} / {rejected['total']}"),
        ("rejected: queue full / timeout / other", f"{by['queue_full']} / {by['queue_timeout']} / {by['other']}"),
        ("rejection latency p50", fmt(rejected["latency"]["all"]["p50_ms"], unit="ms")),
    ]
    return table(f"{report['model']}: {report['overload']:g} x the saturation rate for {storm['duration_s']:.0f} s "
                 f"({storm['arrivals']} arrivals)", ("figure", "measured", "<target", "<"),
                 [(*row, "", "") for row in rows] + [(c["figure"], c["shown"], c["limit"], verdict(c["passed"]))
                                                     for c in report["checks"]],
                 "target: timing, fails the command only with --strict; check: always")


def stress_plot(report: dict[str, Any], path: Path) -> Path:
    """Per second of the storm: sent, admitted and rejected; admitted p95; then the recovery probes."""
    storm, saturation, rows = report["storm"], report["saturation"], report["storm"]["timeline"]
    seconds = [r["second"] + 0.5 for r in rows]
    fig, (ax_count, ax_lat) = subplots(1, 2, figsize=(11, 4.2))
    for style, color, label, count in (("-", "k", "sent", lambda r: r["sent"]), ("o-", "tab:green", "admitted", lambda r: r["admitted"]),
                                       ("s-", "tab:red", "queue full", lambda r: r["queue_full"]),
                                       ("^-", "tab:purple", "timeout / other", lambda r: r["queue_timeout"] + r["other"])):
        ax_count.plot(seconds, [count(r) for r in rows], style, color=color, label=label)
    ax_count.axhline(saturation["images_per_s"], color="tab:blue", ls="--", label="saturation")
    ax_count.set(xlabel="second of the storm (by send time)", ylabel="requests per second")
    ax_lat.plot(seconds, [r["admitted_p95_ms"] for r in rows], "o-", color="tab:green", label="admitted p95 (storm)")
    probes = [(storm["duration_s"] + at, ms) for at, ms in storm["recovery"]["probe_latencies"] if ms is not None]
    if probes:
        ax_lat.plot(*zip(*probes), ".", color="tab:orange", label="recovery probes (concurrency 1)")
    ax_lat.axhline(saturation["p95_ms"], color="tab:blue", ls="--", label="p95 at saturation")
    ax_lat.axvline(storm["duration_s"], color="grey", ls=":")
    ax_lat.set(xlabel="seconds from the storm's start", ylabel="ms")
    return save_figure(fig, path, f"{report['model']} ({report['profile']} profile): {report['overload']:g} x saturation",
                       (ax_count, ax_lat))


# --- soak ------------------------------------------------------------------------------------


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


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope, intercept and the slope's standard error."""
    slope, intercept = np.polyfit(x, y, 1)
    residuals, spread = y - (slope * x + intercept), float(np.sum((x - x.mean()) ** 2))
    stderr = float(np.sqrt(np.sum(residuals ** 2) / (len(x) - 2) / spread)) if len(x) > 2 and spread > 0 else float("nan")
    return float(slope), float(intercept), stderr


def growth(metric: str, requests: Sequence[int], values: Sequence[float], warmup: int) -> Growth:
    """Growth of `values` (sampled at `requests` completed requests) after `warmup` requests."""
    x_all, y_all = np.asarray(requests, dtype=float), np.asarray(values, dtype=float)
    x, y = x_all[x_all >= warmup], y_all[x_all >= warmup]
    if len(x) < 3:
        raise LoadTestError(f"{metric}: {len(x)} samples after the warm-up; at least 3 are needed for a slope")
    slope, intercept, _ = _slope(x, y)
    start_fit, end_fit = float(slope * x[0] + intercept), float(slope * x[-1] + intercept)
    half = len(x) // 2
    later = _slope(x[half:], y[half:]) if len(x) - half >= 3 else None
    window = max(1, min(5, len(x) // 4))
    return Growth(
        metric, int(len(x)), float(y_all[0]), float(y[0]), float(y[-1]), start_fit, end_fit,
        100.0 * (end_fit - start_fit) / start_fit if start_fit > 0 else None, 1000.0 * slope,
        None if later is None else 1000.0 * later[0], None if later is None else 1000.0 * later[2],
        float(statistics.median(y[-window:]) - statistics.median(y[:window])),
    )


def _met(passed: bool) -> str:
    return "met" if passed else "MISSED"


def check_growth(series: dict[str, Growth], targets: SoakTargets) -> list[Check]:
    """RSS: the fitted growth after warm-up (what the run cost) and the slope over the later half (whether it
    still grows). fds and /dev/shm files: the median of the last few samples against the first few after
    warm-up. /dev/shm bytes are not judged: the Python backend grows its regions to the largest load seen."""
    rss = series["rss_bytes"]
    pct = rss.growth_pct if rss.growth_pct is not None else float("inf")
    later = rss.slope_per_1000_later_half if rss.slope_per_1000_later_half is not None else rss.slope_per_1000
    error = f" ± {rss.later_half_stderr_per_1000 / MIB:.3f}" if rss.later_half_stderr_per_1000 is not None else ""
    checks = [Check("rss_growth_pct", ok := pct < targets.max_rss_growth_pct, f"RSS growth after warm-up {_met(ok)}: "
                    f"{pct:+.2f} % (least-squares fit), target < {targets.max_rss_growth_pct:g} %"),
              Check("rss_slope", ok := later / MIB < targets.max_rss_slope_mib_per_1000,
                    f"RSS slope over the later half after warm-up {_met(ok)}: {later / MIB:+.3f}{error} MiB per 1,000 "
                    f"requests (all after warm-up: {rss.slope_per_1000 / MIB:+.3f}), "
                    f"target < {targets.max_rss_slope_mib_per_1000:g}")]
    for key, name, limit in (("fds", "open file descriptors", targets.max_fd_growth),
                             ("shm_files", "/dev/shm files", targets.max_shm_file_growth)):
        g = series[key]
        checks.append(Check(f"{key}_growth", ok := g.level_growth <= limit,
                            f"{name} growth {_met(ok)}: {g.level_growth:+g} ({g.after_warmup:g} after warm-up, "
                            f"{g.end:g} at the end; slope {g.slope_per_1000:+.3g} per 1,000 requests), target <= {limit:g}"))
    return checks


def growth_by_process(samples: Sequence[Sample], warmup: int) -> dict[str, dict[str, int]]:
    """Per process label: RSS at the end of the warm-up, and RSS, anonymous and shared-memory growth by the end."""
    after, end = next(s for s in samples if s.requests >= warmup).by_process, samples[-1].by_process
    return {label: {"processes": end.get(label, {}).get("processes", 0), "rss_after_warmup": after.get(label, {}).get("rss", 0),
                    **{f"{key}_growth": end.get(label, {}).get(key, 0) - after.get(label, {}).get(key, 0)
                       for key in ("rss", "anon", "shmem")}} for label in sorted(set(after) | set(end))}


def jobs(payloads: Sequence[Payload]) -> list[tuple[str, Payload]]:
    """The request cycle: the models take turns, and each model sees every image."""
    return [(MODELS[i % len(MODELS)], payloads[(i // len(MODELS)) % len(payloads)]) for i in range(len(MODELS) * len(payloads))]


def _soak(config: SoakConfig, url: str, metrics_url: str, pid: int | None, payloads: Sequence[Payload],
          log: Callable[[str], None]) -> dict[str, Any]:
    if pid is None:
        raise LoadTestError(f"no process listening on {url} is visible here: give --server-pid, the server's PID")
    cycle, served = jobs(payloads), Served(url, MODELS[0], config.send_hints, timeout_s=config.request_timeout_s)
    served.ensure_clients(config.concurrency)
    sent, failed, errors, lock = collections.Counter(), collections.Counter(), collections.Counter(), threading.Lock()

    def call(worker: int, job: tuple[str, Payload]) -> None:  # every failure is counted by model and message
        try:
            served(worker, job)
            error = None
        except Exception as exc:  # noqa: BLE001
            error = f"{job[0]}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        with lock:
            sent[job[0]] += 1
            if error is not None:
                failed[job[0]] += 1
                errors[error] += 1

    began, latencies, stopped, samples = time.monotonic(), [], None, [sample_tree(pid, 0, 0.0)]
    try:
        for start, stop in itertools.pairwise(chunk_bounds(config.requests, config.sample_every, config.warmup)):
            if time.monotonic() - began > config.time_limit_s:
                stopped = f"time limit of {config.time_limit_s:g} s reached after {start} requests"
                break
            offset = start % len(cycle)
            measurement = drive(call, cycle[offset:] + cycle[:offset], config.concurrency, stop - start)
            latencies.extend(measurement.latencies_ms)
            try:
                if not alive(pid):
                    raise LoadTestError(f"process {pid} exited")
                sample = sample_tree(pid, stop, time.monotonic() - began)
            except LoadTestError as exc:
                stopped = f"the server stopped after {stop} requests ({exc})"
                break
            sample.chunk_p50_ms, sample.chunk_p95_ms = (round(measurement.percentile(q), 2) for q in (50, 95))
            samples.append(sample)
            log(f"{stop}/{config.requests} requests: RSS {sample.rss_bytes / MIB:.0f} MiB, {sample.fds} fds, "
                f"{sample.shm_files} shm files, {sum(failed.values())} failures")
    finally:
        served.close()
    wall_s, done = time.monotonic() - began, samples[-1].requests
    try:
        series = {key: growth(key, [s.requests for s in samples], [getattr(s, key) for s in samples], config.warmup)
                  for key in SERIES}
        not_measured = None
    except LoadTestError as exc:  # stopped before enough samples after warm-up
        series, not_measured = {}, str(exc)
    load = {key: getattr(config, key) for key in ("requests", "warmup", "sample_every", "concurrency", "image_set",
                                                  "send_hints", "request_timeout_s", "time_limit_s")}
    return {
        "load": {**load, "models": list(MODELS)}, "requests_completed": done, "wall_s": round(wall_s, 2), "stopped": stopped,
        "not_measured": not_measured, "requests_per_s": round(done / wall_s, 3) if wall_s > 0 else None,
        "latency_ms": ({"p50": round(float(np.percentile(latencies, 50)), 2), "p95": round(float(np.percentile(latencies, 95)), 2),
                        "mean": round(float(np.mean(latencies)), 2)} if latencies else None),
        "sent": dict(sent), "failed": dict(failed), "errors": dict(errors.most_common(10)),
        "growth": {key: {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(g).items()}
                   for key, g in series.items()},
        "growth_by_process": growth_by_process(samples, config.warmup) if series else None,
        "targets": dataclasses.asdict(config.targets), "samples": [dataclasses.asdict(s) for s in samples],
    }


def soak_checks(report: dict[str, Any], config: SoakConfig) -> list[Check]:
    checks = ([Check("samples", False, f"growth not measured: {report['not_measured']}")] if report["not_measured"] else
              check_growth({key: Growth(**g) for key, g in report["growth"].items()}, config.targets))
    failures, limit = sum(report["failed"].values()), config.targets.max_failures
    checks.append(Check("max_failures", failures <= limit, f"failures {_met(failures <= limit)}: {failures} failed "
                                                            f"requests, target <= {limit}", failures))
    done, stopped = report["requests_completed"], report["stopped"]
    passed = stopped is None and done == config.requests
    checks.append(Check("completed", passed, f"requests {'all sent' if passed else 'MISSED'}: {done} of {config.requests}"
                                             + (f" ({stopped})" if stopped else ""), done))
    return checks


# (series, panel, scale, colour, label); panels: RSS, fds, /dev/shm (files left, MiB on a right axis), latency
SOAK_LINES = (("rss_bytes", 0, MIB, "tab:blue", "RSS, whole tree"), ("rss_anon_bytes", 0, MIB, "tab:cyan", "of which anonymous"),
              ("fds", 1, 1, "tab:green", "open fds, whole tree"), ("shm_files", 2, 1, "tab:purple", "files (server's tree)"),
              ("shm_bytes", 4, MIB, "tab:orange", "MiB (right axis)"), ("chunk_p50_ms", 3, 1, "tab:red", "p50 per chunk"),
              ("chunk_p95_ms", 3, 1, "tab:pink", "p95 per chunk"))


def soak_plot(report: dict[str, Any], path: Path) -> Path:
    """RSS, file descriptors, /dev/shm and latency against requests, the warm-up shaded, fits drawn."""
    samples, warmup, grown = report["samples"], report["load"]["warmup"], report["growth"]
    fig, grid = subplots(2, 2, figsize=(11, 7), sharex=True)
    axes = [*grid.flat, grid.flat[2].twinx()]
    for key, panel, scale, color, label in SOAK_LINES:
        points = [(s["requests"], s[key] / scale) for s in samples if s.get(key) is not None]
        if points:
            axes[panel].plot(*zip(*points), ".-", color=color, ms=3, lw=1, label=label)
    for key, panel, scale, unit in (("rss_bytes", 0, MIB, " MiB"), ("fds", 1, 1, "")):
        if g := grown.get(key):
            later = g["slope_per_1000_later_half"]
            axes[panel].plot([warmup, samples[-1]["requests"]], [g["fitted_after_warmup"] / scale, g["fitted_end"] / scale], "--",
                             color="black", lw=1.2, label=f"fit after warm-up: {g['slope_per_1000'] / scale:+.3g}{unit} per 1,000 "
                             "req" + ("" if later is None else f" (later half {later / scale:+.3g})"))
    rss = grown.get("rss_bytes")
    titles = (f"RSS (tritonserver + {samples[-1]['processes'] - 1} children)" + (
        f": {rss['growth_pct']:+.2f} % after warm-up" if rss and rss["growth_pct"] is not None else ""),
        "open file descriptors", "/dev/shm held by the server", "client latency")
    for ax, title, ylabel in zip(axes, titles, ("MiB", "fds", "files", "ms per request")):
        ax.set(title=title, ylabel=ylabel)
        ax.axvspan(0, warmup, color="0.85", label="warm-up")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in axes[1:3]:  # small integer counts: leave headroom so a step shows
        ax.set_ylim(0, max(1.0, max(ax.get_lines()[0].get_ydata()) * 1.25))
    axes[4].set(ylabel="MiB", ylim=(0, max(1.0, 1.2 * max(s["shm_bytes"] for s in samples) / MIB)))
    handles, labels = (sum(pair, []) for pair in zip(axes[2].get_legend_handles_labels(), axes[4].get_legend_handles_labels()))
    axes[2].legend(handles, labels, fontsize=8, loc="lower right")
    for ax in (axes[0], axes[1], axes[3]):
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes[2:4]:
        ax.set_xlabel("requests completed")
    return save_figure(fig, path, f"cxrlt soak: {report['requests_completed']} requests at concurrency "
                                  f"{report['load']['concurrency']} ({', '.join(report['load']['models'])}), "
                                  + ("PASS" if report["passed"] else "MISS: " + ", ".join(report["missed"])), dpi=90)


def soak_table(report: dict[str, Any]):
    checks, g, targets, rows = {c["name"]: c["passed"] for c in report["checks"]}, report["growth"], report["targets"], []

    def row(name: str, key: str, scale: float, spec: str, growth: str, target: str = "", check: str = "") -> tuple[str, ...]:
        s, later, error = g[key], g[key]["slope_per_1000_later_half"], g[key]["later_half_stderr_per_1000"]
        return (name, *(format(s[k] / scale, spec) for k in ("at_start", "after_warmup", "end")), growth,
                f"{s['slope_per_1000'] / scale:+.3g}",
                fmt(later and later / scale, "+.3g") + (f" ±{error / scale:.2g}" if later is not None and error else ""),
                target, verdict(checks.get(check)) if check else "")

    if g:
        rows = [row("RSS (MiB)", "rss_bytes", MIB, ".1f", f"{g['rss_bytes']['growth_pct']:+.2f} %",
                    f"growth < {targets['max_rss_growth_pct']:g} %", "rss_growth_pct"),
                ("  RSS still growing", "", "", "", "", "", "", f"later half < {targets['max_rss_slope_mib_per_1000']:g}",
                 verdict(checks.get("rss_slope"))),
                row("  anonymous (MiB)", "rss_anon_bytes", MIB, ".1f", f"{g['rss_anon_bytes']['growth_pct']:+.2f} %")]
        rows += [row(name, key, scale, spec, f"{g[key]['level_growth'] / scale:+{spec}}", target, target and f"{key}_growth")
                 for key, name, scale, spec, target in (
                     ("fds", "open fds", 1, ".0f", f"growth <= {targets['max_fd_growth']}"),
                     ("shm_files", "/dev/shm files", 1, ".0f", f"growth <= {targets['max_shm_file_growth']}"),
                     ("shm_bytes", "/dev/shm MiB", MIB, ".1f", ""))]
    rows.append(("failed requests", "", "", str(sum(report["failed"].values())), "", "", "", f"<= {targets['max_failures']}",
                 verdict(checks.get("max_failures"))))
    return table(f"soak: {report['requests_completed']} requests, warm-up {report['load']['warmup']}, sampled every "
                 f"{report['load']['sample_every']}", ("metric", "start", "after warm-up", "end", "growth", "slope /1k",
                                                       "later half /1k", "target", "verdict"), rows,
                 "after warm-up: growth % and slopes per 1,000 requests from least squares; fds and shm: median of the last "
                 "samples minus the first after warm-up; shm MiB is reported, not judged")
