"""`cxrlt stress` and `cxrlt soak`: two modes of one driver against one server on this host (loadtest/README.md).

stress: saturation (a closed loop at concurrency 1, 2, 4, ... until throughput stops growing), a storm (an
open loop at `overload` x that rate; refusals classified by the queue policy's messages), then recovery to
the unloaded p50; every answer checked against the in-process pipeline. soak: N requests over the three
public models in chunks, the server's process tree sampled between chunks, each series' growth after the
warm-up fitted by least squares (a leak keeps its slope over the later half, a high-water mark levels off).
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

import grpc
import numpy as np
import psutil

from cxrlt.client.sdk import OVERLOAD_MESSAGES
from cxrlt.contract.served import CLASSIFIER_MODEL
from loadtest.kernel import (GRPC_OPTIONS, IMAGE_SETS, MIB, MODELS, Check, LoadTestError, Measurement, Payload, Sample,
                             Served, alive, check_server, cpu_sample, drive, error_text, figures, fmt, images_json,
                             load_average, load_payloads, model_infer, probabilities, request_bytes, require_loopback,
                             sample_tree, save_figure, server_health, subplots, table, target_server, verdict, verdicts)

REASONS = ("queue_full", "queue_timeout", "other")
QUEUE_MESSAGES = dict(zip(REASONS, OVERLOAD_MESSAGES))  # reason -> the queue policy's message, lower case
SATURATION_GROWTH = 0.05  # the sweep stops at a level not more than 5 % above the best lower one


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
        _at_least(self, 0, ("request_timeout_s",), strict=True)


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
        _at_least(self, 0, ("time_limit_s",), strict=True)
        if self.warmup < 0 or self.warmup >= self.requests:
            raise ValueError(f"--warmup ({self.warmup}) must be at least 0 and below --requests ({self.requests})")
        post = [b for b in chunk_bounds(self.requests, self.sample_every, self.warmup) if b >= self.warmup]
        if len(post) < 3:
            raise ValueError(f"only {len(post)} samples after the warm-up: lower --sample-every or raise --requests "
                             "(the slope needs at least 3)")


def run(config: DriveConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the mode's phases against the server; return the figures and checks (JSON-ready)."""
    from loadtest.metrics import default_metrics_url

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
            "parity": parity.to_json(), "targets": dataclasses.asdict(config.targets),
            "triton": breakdown_json(diff(before, after)) if after is not None else None}


def rejection_reason(status: str | None, message: str | None) -> str:
    """queue_full / queue_timeout (UNAVAILABLE from the queue policy), else other."""
    if "UNAVAILABLE" in (status or ""):
        return next((reason for reason, text in QUEUE_MESSAGES.items() if text in (message or "").lower()), "other")
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

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}


class Refusals:
    """Refused requests by reason, and each distinct (status, message) with its count."""

    def __init__(self) -> None:
        self.latencies_ms: dict[str, list[float]] = {reason: [] for reason in REASONS}
        self.kinds: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.by_image: dict[str, list[float]] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def add(self, exc: Exception, latency_ms: float, image: str | None = None) -> str:
        status, message = error_text(exc)
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
            "latency_by_image": _by_image(self.by_image.items()),
            "kinds": [{"reason": r, "status": s, "message": m, "count": n} for (r, s, m), n in self.kinds.most_common()],
        }


def _by_image(latencies: Any) -> dict[str, dict[str, Any]]:
    """(image, latencies) pairs -> per image: count and latency figures."""
    return {image: {"count": len(v), **figures(v)} for image, v in sorted(latencies)}


def find_saturation(served: Served, payloads: Sequence[Payload], parity: Parity, config: StressConfig,
                    log: Callable[[str], None], server_pid: int | None = None) -> dict[str, Any]:
    """The closed loop at concurrency 1, 2, 4, ... up to max_concurrency, until throughput stops growing."""
    def call(worker: int, payload: Payload) -> None:
        try:
            parity(payload, served(worker, payload))
        except grpc.RpcError as exc:
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
        if saturation_index([m.images_per_s for _, m, _ in points], SATURATION_GROWTH)[1]:
            note = f"throughput at concurrency {level} was not more than {100 * SATURATION_GROWTH:g} % above the best lower level"
            break
    if not points:
        raise LoadTestError(f"every request at concurrency 1 was refused: {refusals.to_json()['kinds']}")
    level, at, cpu = points[saturation_index([m.images_per_s for _, m, _ in points], SATURATION_GROWTH)[0]]
    return {"concurrency": level, "images_per_s": round(at.images_per_s, 3), "p50_ms": round(at.percentile(50), 3),
            "p95_ms": round(at.percentile(95), 3), "unloaded_p50_ms": round(points[0][1].percentile(50), 3),
            "stopped": note, "refused": refused, "cpu": cpu,
            "sweep": [{"concurrency": c, **m.to_json(), "cpu": u} for c, m, u in points]}


class _Storm:
    """The open loop (phase 2) on one grpc.aio channel, each image's request serialised once, a second
    channel asking the live endpoint twice a second; then the recovery probes (phase 3)."""

    def __init__(self, config: StressConfig, url: str, payloads: Sequence[Payload], parity: Parity) -> None:
        self.config, self.url, self.payloads, self.parity = config, url, payloads, parity
        self.refusals = Refusals()
        self.admitted: list[tuple[float, float, str]] = []  # (answered at, latency ms, image), seconds from the start
        self.sends: list[list[Any]] = []  # [sent at, outcome: pending / admitted / a refusal's reason]
        self.not_sent = self.in_flight = 0  # arrivals dropped at max_in_flight; requests outstanding
        self.live: list[tuple[float, float | None]] = []  # (asked at, answer ms or None)
        self.send_lag_ms: list[float] = []

    async def run(self, rate: float, served: Served, unloaded_p50_ms: float, server_pid: int | None) -> dict[str, Any]:
        import tritonclient.grpc.aio as aio

        monitor, channel = aio.InferenceServerClient(self.url), grpc.aio.insecure_channel(self.url, options=GRPC_OPTIONS)
        loop = asyncio.get_running_loop()
        self.start, done = loop.time(), asyncio.Event()
        watcher = asyncio.create_task(self._watch_live(monitor, done))
        times = arrival_times(rate, self.config.duration_s, self.config.arrivals, self.config.seed, self.config.max_requests)
        before = cpu_sample(server_pid), machine_cpu()
        try:
            tasks = await self._send_all(model_infer(channel), times)
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

    async def _send_all(self, infer: Callable, times: np.ndarray) -> set[asyncio.Task]:
        config, loop, start = self.config, asyncio.get_running_loop(), self.start
        requests = {p.name: request_bytes(p, config.model, config.send_hints) for p in self.payloads}

        async def one(payload: Payload, send: list[Any]) -> None:
            self.in_flight += 1
            try:
                response = await infer(requests[payload.name], timeout=config.request_timeout_s)
            except Exception as exc:  # noqa: BLE001 - every refusal is classified, none is lost
                send[1] = self.refusals.add(exc, 1000 * (loop.time() - start - send[0]), payload.name)
            else:
                answered = loop.time() - start
                self.admitted.append((answered, 1000 * (answered - send[0]), payload.name))
                send[1] = "admitted"
                self.parity(payload, probabilities(response)[0])
            finally:
                self.in_flight -= 1

        tasks: set[asyncio.Task] = set()
        for i, at in enumerate(times):
            await asyncio.sleep(max(start + at - loop.time(), 0.0))  # behind schedule: still let answers in between sends
            self.send_lag_ms.append(1000 * max(0.0, loop.time() - start - at))
            if self.in_flight >= config.max_in_flight:
                self.not_sent += 1
                continue
            self.sends.append([loop.time() - start, "pending"])
            task = asyncio.create_task(one(self.payloads[i % len(self.payloads)], self.sends[-1]))
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
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    async def _recover(self, served: Served, unloaded_p50_ms: float, storm_end: float) -> dict[str, Any]:
        """Sequential requests from the end of the storm until the p50 of the last window is back."""
        config, loop, probes = self.config, asyncio.get_running_loop(), []
        window, threshold, recovered_at = 2 * len(self.payloads), config.targets.recovery_factor * unloaded_p50_ms, None
        for payload in itertools.cycle(self.payloads):
            if recovered_at is not None or loop.time() - storm_end >= config.recovery_timeout_s:
                break
            sent, latency = loop.time(), None
            with contextlib.suppress(grpc.RpcError):
                self.parity(payload, await asyncio.to_thread(served, 0, payload))
                latency = 1000 * (loop.time() - sent)
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

    def _summary(self, rate: float, scheduled: int, window: float, before: tuple, after: tuple,
                 recovery: dict[str, Any]) -> dict[str, Any]:
        in_window = [latency for at, latency, _ in self.admitted if at <= window]
        answers = [ms for _, ms in self.live if ms is not None]
        busy, every = (a - b for a, b in zip(after[1], before[1]))
        return {
            "rate_offered": round(rate, 3), "arrivals": self.config.arrivals, "duration_s": round(window, 3),
            "scheduled": scheduled, "sent": len(self.sends), "not_sent_at_max_in_flight": self.not_sent,
            "rate_sent": round(len(self.sends) / window, 3) if window > 0 else None,
            "send_lag": figures(self.send_lag_ms),  # how far behind its schedule the client sent
            "admitted": len(self.admitted), "admitted_in_storm": len(in_window),
            "goodput_images_per_s": round(len(in_window) / window, 3) if window > 0 else 0.0,
            "admitted_latency": figures([latency for _, latency, _ in self.admitted]),
            "admitted_latency_by_image": _by_image(_grouped((image, ms) for _, ms, image in self.admitted).items()),
            "rejected": self.refusals.to_json(),
            "live_probes": {"asked": len(self.live), "unanswered": len(self.live) - len(answers),
                            **{k.replace("_ms", "_answer_ms"): v for k, v in figures(answers).items()}},
            "cpu": {**_cpu_figures(before[0], after[0], window, len(in_window)), "cores": os.cpu_count(),
                    "machine_busy_share": round(busy / max(every, 1e-9), 3)},
            "timeline": _timeline(self.sends, self.admitted, window),
            "recovery": recovery,
        }


def _grouped(pairs: Any) -> dict[Any, list[Any]]:
    groups: dict[Any, list[Any]] = collections.defaultdict(list)
    for key, value in pairs:
        groups[key].append(value)
    return groups


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    return busy, busy + t.idle + t.iowait


def _cpu_figures(before: tuple[float, float | None], after: tuple[float, float | None], wall_s: float,
                 admitted: int) -> dict[str, float | None]:
    """Cores this client and the server's process tree used over `wall_s`, and server CPU ms per admitted image."""
    server = None if before[1] is None or after[1] is None else after[1] - before[1]
    return {
        "client_cores": round((after[0] - before[0]) / wall_s, 3) if wall_s > 0 else None,
        "server_cores": round(server / wall_s, 3) if server is not None and wall_s > 0 else None,
        "server_cpu_ms_per_admitted": round(1000 * server / admitted, 2) if server is not None and admitted else None,
    }


def _timeline(sends: Sequence[Sequence[Any]], admitted: Sequence[tuple[float, float, str]], window: float) -> list[dict[str, Any]]:
    """Per second of the storm: requests sent and how they ended, and the p95 of what was answered then."""
    seconds = int(np.ceil(window)) or 1
    second = lambda at: min(int(at), seconds - 1)  # noqa: E731
    outcomes, p95 = _grouped((second(at), outcome) for at, outcome in sends), _grouped((second(at), ms) for at, ms, _ in admitted)
    return [{"second": s, "sent": len(outcomes[s]), "admitted": outcomes[s].count("admitted"),
             **{reason: outcomes[s].count(reason) for reason in REASONS}, "admitted_p95_ms": figures(p95[s])["p95_ms"]}
            for s in range(seconds)]


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
        Check("rejection_p95", rejection_p95 is not None and rejection_p95 < t.max_rejection_p95_ms, "rejection latency p95",
              fmt(rejection_p95, unit="ms"), f"< {t.max_rejection_p95_ms:g} ms", rejection_p95, "target"),
        Check("admitted_p95", admitted_p95 is not None and admitted_p95 <= admitted_limit, "admitted p95",
              fmt(admitted_p95, unit="ms"), f"<= {t.max_admitted_p95_factor:g} x p95 at saturation = {admitted_limit:.0f} ms",
              admitted_p95, "target"),
        Check("goodput", goodput >= goodput_limit, "goodput (admitted img/s)", fmt(goodput, unit="img/s"),
              f">= {100 * t.min_goodput_share:g} % of saturation = {goodput_limit:.1f} img/s", goodput, "target"),
        Check("recovery", recovery["recovered"] and recovery["seconds"] <= t.max_recovery_s, "recovery (p50 at concurrency 1)",
              fmt(recovery["seconds"], ".2f", "s") if recovery["recovered"] else f"not in {recovery['gave_up_after_s']:g} s",
              f"<= {t.max_recovery_s:g} s to p50 <= {t.recovery_factor:g} x unloaded = {recovery['threshold_p50_ms']:.0f} ms",
              recovery["seconds"], "target"),
        Check("wrong_responses", parity["wrong"] == 0, f"wrong answers (of {parity['responses_checked']})",
              f"{parity['wrong']} (max |diff| {parity['max_abs_diff']:.1e})", f"0 (|diff| <= {parity['tolerance']:g})",
              parity["wrong"]),
        Check("server_crashes", crashes == 0 and after["model_ready"], "server crashes", str(crashes), "0", crashes),
        Check("other_rejections", other == 0, "refused not by the queue policy", str(other), "0", other),
    ]


def stress_table(report: dict[str, Any]) -> Any:
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
    for style, color, label, keys in (("-", "k", "sent", ["sent"]), ("o-", "tab:green", "admitted", ["admitted"]),
                                      ("s-", "tab:red", "queue full", ["queue_full"]),
                                      ("^-", "tab:purple", "timeout / other", ["queue_timeout", "other"])):
        ax_count.plot(seconds, [sum(r[key] for key in keys) for r in rows], style, color=color, label=label)
    ax_count.axhline(saturation["images_per_s"], color="tab:blue", ls="--", label="saturation")
    ax_count.set(xlabel="second of the storm (by send time)", ylabel="requests per second")
    ax_lat.plot(seconds, [r["admitted_p95_ms"] for r in rows], "o-", color="tab:green", label="admitted p95 (storm)")
    if probes := [(storm["duration_s"] + at, ms) for at, ms in storm["recovery"]["probe_latencies"] if ms is not None]:
        ax_lat.plot(*zip(*probes), ".", color="tab:orange", label="recovery probes (concurrency 1)")
    ax_lat.axhline(saturation["p95_ms"], color="tab:blue", ls="--", label="p95 at saturation")
    ax_lat.axvline(storm["duration_s"], color="grey", ls=":")
    ax_lat.set(xlabel="seconds from the storm's start", ylabel="ms")
    return save_figure(fig, path, f"{report['model']} ({report['profile']} profile): {report['overload']:g} x saturation",
                       (ax_count, ax_lat))


# --- soak ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Series:
    """One sampled series: how it is shown (table, plot panel) and judged."""

    key: str
    name: str  # the table's row
    scale: float
    spec: str
    panel: int  # 0 RSS, 1 fds, 2 /dev/shm files, 3 latency, 4 /dev/shm MiB (right axis of panel 2)
    color: str
    label: str  # the plot's legend
    growth_from: str = "growth_pct"  # the table's growth: the fitted % or the level difference
    judged: str = ""  # the check on its growth


SERIES = (
    Series("rss_bytes", "RSS (MiB)", MIB, ".1f", 0, "tab:blue", "RSS, whole tree", judged="rss_growth_pct"),
    Series("rss_anon_bytes", "  anonymous (MiB)", MIB, ".1f", 0, "tab:cyan", "of which anonymous"),
    Series("fds", "open fds", 1, ".0f", 1, "tab:green", "open fds, whole tree", "level_growth", "fds_growth"),
    Series("shm_files", "/dev/shm files", 1, ".0f", 2, "tab:purple", "files (server's tree)", "level_growth", "shm_files_growth"),
    Series("shm_bytes", "/dev/shm MiB", MIB, ".1f", 4, "tab:orange", "MiB (right axis)", "level_growth"),
)
LATENCY_LINES = (("chunk_p50_ms", "tab:red", "p50 per chunk"), ("chunk_p95_ms", "tab:pink", "p95 per chunk"))


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
    half, window = len(x) // 2, max(1, min(5, len(x) // 4))
    later = _slope(x[half:], y[half:]) if len(x) - half >= 3 else (None, None, None)
    return Growth(
        metric, int(len(x)), float(y_all[0]), float(y[0]), float(y[-1]), start_fit, end_fit,
        100.0 * (end_fit - start_fit) / start_fit if start_fit > 0 else None, 1000.0 * slope,
        *(None if value is None else 1000.0 * value for value in (later[0], later[2])),
        float(statistics.median(y[-window:]) - statistics.median(y[:window])),
    )


def check_growth(series: dict[str, Growth], targets: SoakTargets) -> list[Check]:
    """RSS: the fitted growth after warm-up (what the run cost) and the slope over the later half (whether it
    still grows). fds and /dev/shm files: the median of the last few samples against the first few after
    warm-up. /dev/shm bytes are not judged: the Python backend grows its regions to the largest load seen."""
    rss = series["rss_bytes"]
    pct = rss.growth_pct if rss.growth_pct is not None else float("inf")
    later = rss.slope_per_1000_later_half if rss.slope_per_1000_later_half is not None else rss.slope_per_1000
    error = f" ± {rss.later_half_stderr_per_1000 / MIB:.3f}" if rss.later_half_stderr_per_1000 is not None else ""
    checks = [Check("rss_growth_pct", pct < targets.max_rss_growth_pct, "RSS growth after warm-up",
                    f"{pct:+.2f} % (least-squares fit)", f"< {targets.max_rss_growth_pct:g} %", pct),
              Check("rss_slope", later / MIB < targets.max_rss_slope_mib_per_1000, "RSS slope over the later half after warm-up",
                    f"{later / MIB:+.3f}{error} MiB per 1,000 requests (all after warm-up: {rss.slope_per_1000 / MIB:+.3f})",
                    f"< {targets.max_rss_slope_mib_per_1000:g}", later / MIB)]
    for key, name, limit in (("fds", "open file descriptors", targets.max_fd_growth),
                             ("shm_files", "/dev/shm files", targets.max_shm_file_growth)):
        g = series[key]
        checks.append(Check(f"{key}_growth", g.level_growth <= limit, f"{name} growth", f"{g.level_growth:+g} "
                            f"({g.after_warmup:g} after warm-up, {g.end:g} at the end; slope {g.slope_per_1000:+.3g} per "
                            "1,000 requests)", f"<= {limit:g}", g.level_growth))
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
            error = f"{job[0]}: {error_text(exc)[1].splitlines()[0][:200]}"
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
    return _soak_report(config, samples, latencies, time.monotonic() - began, stopped, (sent, failed, errors))


def _soak_report(config: SoakConfig, samples: list[Sample], latencies: list[float], wall_s: float, stopped: str | None,
                 counts: tuple[collections.Counter, ...]) -> dict[str, Any]:
    try:
        series = {s.key: growth(s.key, [x.requests for x in samples], [getattr(x, s.key) for x in samples], config.warmup)
                  for s in SERIES}
        not_measured = None
    except LoadTestError as exc:  # stopped before enough samples after warm-up
        series, not_measured = {}, str(exc)
    done, (sent, failed, errors) = samples[-1].requests, counts
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
    checks = ([Check("samples", False, "growth", "not measured", "3 samples after warm-up",
                     message=f"growth not measured: {report['not_measured']}")] if report["not_measured"] else
              check_growth({key: Growth(**g) for key, g in report["growth"].items()}, config.targets))
    failures, limit = sum(report["failed"].values()), config.targets.max_failures
    done, stopped = report["requests_completed"], report["stopped"]
    return [*checks, Check("max_failures", failures <= limit, "failures", f"{failures} failed requests", f"<= {limit}", failures),
            Check("completed", stopped is None and done == config.requests, "requests sent",
                  f"{done} of {config.requests}" + (f" ({stopped})" if stopped else ""), f"all {config.requests}", done)]


def soak_plot(report: dict[str, Any], path: Path) -> Path:
    """RSS, file descriptors, /dev/shm and latency against requests, the warm-up shaded, fits drawn."""
    samples, warmup, grown = report["samples"], report["load"]["warmup"], report["growth"]
    fig, grid = subplots(2, 2, figsize=(11, 7), sharex=True)
    axes = [*grid.flat, grid.flat[2].twinx()]
    lines = [(s.key, s.panel, s.scale, s.color, s.label) for s in SERIES] + [(k, 3, 1, c, n) for k, c, n in LATENCY_LINES]
    for key, panel, scale, color, label in lines:
        if points := [(s["requests"], s[key] / scale) for s in samples if s.get(key) is not None]:
            axes[panel].plot(*zip(*points), ".-", color=color, ms=3, lw=1, label=label)
    for s in SERIES[0], SERIES[2]:  # the fits of RSS and fds
        if g := grown.get(s.key):
            later, unit = g["slope_per_1000_later_half"], " MiB" if s.scale == MIB else ""
            axes[s.panel].plot([warmup, samples[-1]["requests"]], [g["fitted_after_warmup"] / s.scale, g["fitted_end"] / s.scale],
                               "--", color="black", lw=1.2, label=f"fit after warm-up: {g['slope_per_1000'] / s.scale:+.3g}{unit} "
                               "per 1,000 req" + ("" if later is None else f" (later half {later / s.scale:+.3g})"))
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


def soak_table(report: dict[str, Any]) -> Any:
    checks, g, targets = {c["name"]: c["passed"] for c in report["checks"]}, report["growth"], report["targets"]
    bounds = {"rss_growth_pct": f"growth < {targets['max_rss_growth_pct']:g} %", "fds_growth": f"growth <= {targets['max_fd_growth']}",
              "shm_files_growth": f"growth <= {targets['max_shm_file_growth']}"}

    def row(s: Series) -> tuple[str, ...]:
        values, later, error = g[s.key], g[s.key]["slope_per_1000_later_half"], g[s.key]["later_half_stderr_per_1000"]
        grown = f"{values['growth_pct']:+.2f} %" if s.growth_from == "growth_pct" else f"{values['level_growth'] / s.scale:+{s.spec}}"
        return (s.name, *(format(values[k] / s.scale, s.spec) for k in ("at_start", "after_warmup", "end")), grown,
                f"{values['slope_per_1000'] / s.scale:+.3g}",
                fmt(later and later / s.scale, "+.3g") + (f" ±{error / s.scale:.2g}" if later is not None and error else ""),
                bounds.get(s.judged, ""), verdict(checks.get(s.judged)) if s.judged else "")

    rows = [row(s) for s in SERIES] if g else []
    if g:  # the later half's slope is the RSS's second verdict
        rows.insert(1, ("  RSS still growing", "", "", "", "", "", "", f"later half < {targets['max_rss_slope_mib_per_1000']:g}",
                        verdict(checks.get("rss_slope"))))
    rows.append(("failed requests", "", "", str(sum(report["failed"].values())), "", "", "", f"<= {targets['max_failures']}",
                 verdict(checks.get("max_failures"))))
    return table(f"soak: {report['requests_completed']} requests, warm-up {report['load']['warmup']}, sampled every "
                 f"{report['load']['sample_every']}", ("metric", "start", "after warm-up", "end", "growth", "slope /1k",
                                                       "later half /1k", "target", "verdict"), rows,
                 "after warm-up: growth % and slopes per 1,000 requests from least squares; fds and shm: median of the last "
                 "samples minus the first after warm-up; shm MiB is reported, not judged")
