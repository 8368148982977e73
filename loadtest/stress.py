"""`cxrlt stress`: an overload test. What happens when clients send more than the server can do?

1. Saturation: a closed loop (loadtest.bench.drive, one gRPC client per worker) at concurrency
   1, 2, 4, 8, ... until throughput stops growing by more than `growth` (5 %). Saturation is the
   level with the highest throughput; the unloaded p50 is the one at concurrency 1.
2. Storm: an open loop (asyncio, one grpc.aio channel; each image's request built by tritonclient
   and serialised once) sending `overload` times the saturation rate for `duration_s` seconds,
   Poisson or fixed-interval arrivals, each request with a client timeout; bounded in count (`max_requests`, `max_in_flight`) and in time (the storm,
   then at most `request_timeout_s` to drain). The bounded queues of the entry models refuse what
   they cannot hold: UNAVAILABLE "Exceeds maximum queue size" (queue full) or "Request timeout
   expired" (queue timeout). A second channel asks the live endpoint twice a second meanwhile.
3. Recovery: from the moment the last storm request is sent, sequential requests (the closed
   loop's client, concurrency 1) until the p50 of the last `2 x images` of them is back within
   `recovery_factor` x the unloaded p50; the time that took.

Every answered request of all three phases is checked against the in-process reference pipeline
(evaluation.reference via the bench's RawSide: the same pipeline code on the repository's ONNX
files) for the same image: max |difference| <= `parity_tolerance` (1e-4).

Targets (timing: depend on the machine, so they fail the command only with --strict) and checks
(correctness: no wrong answer, no crash, nothing refused but by the queue policy; these always
fail it) are listed with their measured values in the report and the printed table.
Traffic goes to loopback addresses only; the server's process is found by its port, for its CPU
and to see that it is still alive.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from loadtest.bench import CpuProbe, Measurement, RawSide, ServedSide, drive, save_figure
from loadtest.payloads import IMAGE_SETS, MODELS, Payload, grpc_inputs, load_payloads, requested_outputs

REASONS = ("queue_full", "queue_timeout", "other")
QUEUE_MESSAGES = {"queue_full": "Exceeds maximum queue size", "queue_timeout": "Request timeout expired"}
ARRIVALS = ("poisson", "fixed")


class StressError(RuntimeError):
    """The stress test could not run (no server, a server that does not serve --repo, ...)."""


@dataclasses.dataclass
class StressTargets:
    max_rejection_p95_ms: float = 50.0  # overload is refused fast
    max_admitted_p95_factor: float = 2.0  # admitted p95 <= this x the p95 at saturation
    min_goodput_share: float = 0.9  # admitted throughput >= this x the saturation throughput
    recovery_factor: float = 1.5  # recovered: p50 at concurrency 1 <= this x the unloaded p50 ...
    max_recovery_s: float = 5.0  # ... within this many seconds after the storm


@dataclasses.dataclass
class StressConfig:
    repo: Path
    url: str  # gRPC HOST:PORT of a server on this host serving `repo`
    metrics_url: str | None = None  # None: Triton's default metrics port on the URL's host
    model: str = "cxr_classifier"
    overload: float = 3.0  # offered rate = overload x saturation throughput
    duration_s: float = 30.0
    arrivals: str = "poisson"
    seed: int = 0
    request_timeout_s: float = 10.0  # client timeout of each storm request (> the queue timeout)
    max_in_flight: int = 256  # storm requests outstanding at once; an arrival beyond it is not sent
    max_requests: int = 20_000  # storm requests at most
    saturation_requests: int = 60  # measured requests per concurrency level of the closed loop
    max_concurrency: int = 32
    growth: float = 0.05
    recovery_timeout_s: float = 30.0
    parity_tolerance: float = 1e-4
    image_set: str = "all"
    send_hints: bool = True
    targets: StressTargets = dataclasses.field(default_factory=StressTargets)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"--arrivals must be one of {', '.join(ARRIVALS)}, not {self.arrivals!r}")
        if self.image_set not in IMAGE_SETS:
            raise ValueError(f"image set must be one of {IMAGE_SETS}")
        for name in ("overload", "duration_s", "request_timeout_s", "recovery_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("max_in_flight", "max_requests", "saturation_requests", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        self.url = self.url.split("://", 1)[-1].rstrip("/")
        require_loopback(self.url)


# --- pure helpers (unit-tested) ------------------------------------------------------------------


def require_loopback(url: str) -> None:
    """Raise StressError unless the host of HOST:PORT is a loopback address (127.0.0.0/8, ::1, localhost)."""
    from cxrlt.server.launcher import is_loopback

    host = url.rsplit(":", 1)[0].strip("[]")
    if not is_loopback(host):
        raise StressError(f"{url}: cxrlt stress sends overload to loopback addresses only (127.0.0.0/8, ::1, "
                          "localhost): run it on the server's host")


def rejection_reason(status: str | None, message: str | None) -> str:
    """queue_full / queue_timeout (UNAVAILABLE from the queue policy), else other."""
    if "UNAVAILABLE" in (status or ""):
        for reason, text in QUEUE_MESSAGES.items():
            if text in (message or ""):
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
        rng = np.random.default_rng(seed)
        times = np.cumsum(rng.exponential(1.0 / rate, size=expected + 10 * int(np.sqrt(expected)) + 10))
    return times[times < duration_s][:max_requests]


def saturation_index(throughputs: Sequence[float], growth: float) -> tuple[int, bool]:
    """(index of the saturation level, whether the sweep stops after the last one).

    The sweep stops once a level's throughput is not more than `growth` above the best so far;
    saturation is the level with the highest throughput."""
    best = int(np.argmax(throughputs))
    stop = len(throughputs) > 1 and throughputs[-1] <= (1.0 + growth) * max(throughputs[:-1])
    return best, stop


def recovered_after(probes: Sequence[tuple[float, float | None]], threshold_ms: float, window: int) -> float | None:
    """The first time (seconds after the storm) at which the p50 of the last `window` answered probes
    is <= threshold_ms; probes are (answered at, latency ms or None when refused). A refused probe
    starts the window again."""
    latencies: collections.deque[float] = collections.deque(maxlen=window)
    for at, latency in probes:
        if latency is None:
            latencies.clear()
            continue
        latencies.append(latency)
        if len(latencies) == window and float(np.median(latencies)) <= threshold_ms:
            return at
    return None


def _figures(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    if not len(latencies_ms):
        return {"p50_ms": None, "p95_ms": None, "max_ms": None}
    values = np.asarray(latencies_ms, dtype=float)
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p95_ms": round(float(np.percentile(values, 95)), 3),
            "max_ms": round(float(values.max()), 3)}


@dataclasses.dataclass
class Check:
    name: str
    kind: str  # "target": timing, fails the command only with --strict; "check": correctness, always
    figure: str  # what is measured, e.g. "rejection latency p95"
    measured: float | None
    shown: str  # the measured value as the table prints it
    target: str  # the limit as the table prints it, e.g. "< 50 ms"
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- correctness -------------------------------------------------------------------------------


class Parity:
    """Every answered request's probabilities against the reference for the same image."""

    def __init__(self, reference: dict[str, np.ndarray], tolerance: float) -> None:
        self.reference, self.tolerance = reference, tolerance
        self.checked = 0
        self.wrong = 0
        self.max_abs_diff = 0.0
        self._lock = threading.Lock()

    def __call__(self, payload: Payload, probabilities: np.ndarray) -> bool:
        diff = float(np.max(np.abs(np.asarray(probabilities, dtype=np.float64) - self.reference[payload.name])))
        with self._lock:
            self.checked += 1
            self.max_abs_diff = max(self.max_abs_diff, diff)
            if not diff <= self.tolerance:
                self.wrong += 1
        return diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {"responses_checked": self.checked, "wrong": self.wrong, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance}


def reference_probabilities(repo: Path, model: str, payloads: Sequence[Payload]) -> dict[str, np.ndarray]:
    """Each image's probabilities from the in-process pipeline on the repository's ONNX files."""
    raw = RawSide(repo, model, threads=1)
    try:
        return {p.name: np.asarray(raw(0, p), dtype=np.float64) for p in payloads}
    finally:
        raw.close()


def _error_fields(exc: Exception) -> tuple[str, str]:
    """(status, message) of a tritonclient InferenceServerException or a grpc.aio.AioRpcError."""
    if hasattr(exc, "code") and hasattr(exc, "details"):  # grpc's own error
        return str(exc.code()), str(exc.details() or exc)
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") else None
    return str(status or type(exc).__name__), str(message or exc)


class Refusals:
    """Refused requests by reason, and each distinct (status, message) with its count."""

    def __init__(self) -> None:
        self.latencies_ms: dict[str, list[float]] = {reason: [] for reason in REASONS}
        self.kinds: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.by_image: dict[str, list[float]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def add(self, exc: Exception, latency_ms: float, image: str | None = None) -> str:
        status, message = _error_fields(exc)
        reason = rejection_reason(status, message)
        with self._lock:
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
            "total": self.total,
            "by_reason": {reason: len(v) for reason, v in self.latencies_ms.items()},
            "latency": {"all": _figures(every), **{reason: _figures(v) for reason, v in self.latencies_ms.items()}},
            "latency_by_image": {image: {"count": len(v), **_figures(v)} for image, v in sorted(self.by_image.items())},
            "kinds": [{"reason": r, "status": s, "message": m, "count": n} for (r, s, m), n in self.kinds.most_common()],
        }


# --- phase 1: saturation -----------------------------------------------------------------------


def find_saturation(served: ServedSide, payloads: Sequence[Payload], parity: Parity, config: StressConfig,
                    log: Callable[[str], None], server_pid: int | None = None) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    refusals: dict[int, Refusals] = {}

    def call(worker: int, payload: Payload) -> None:
        try:
            probabilities = served(worker, payload)
        except InferenceServerException as exc:
            refusals[level].add(exc, 0.0)
            return
        parity(payload, probabilities)

    levels = [2 ** k for k in range(config.max_concurrency.bit_length()) if 2 ** k <= config.max_concurrency]
    points: list[tuple[int, Measurement]] = []
    cpu = CpuProbe(server_pid)
    cpu_by_level: dict[int, dict[str, float | None]] = {}
    refused: dict[str, Any] | None = None
    note = f"throughput still grew at the largest concurrency ({levels[-1]})"
    for level in levels:
        served.ensure_clients(level)
        refusals[level] = Refusals()
        drive(call, payloads, level, max(level, len(payloads)))  # warm-up, untimed
        total = max(config.saturation_requests, 4 * level)
        log(f"saturation: closed loop at concurrency {level}, {total} requests")
        before = cpu.sample()
        measurement = drive(call, payloads, level, total)
        cpu_by_level[level] = _cpu_figures(before, cpu.sample(), measurement.wall_s, measurement.requests)
        if refusals[level].total:
            figures = refusals[level].to_json()  # a closed-loop refusal's latency is not recorded
            refused = {"concurrency": level, **{k: figures[k] for k in ("total", "by_reason", "kinds")}}
            note = f"concurrency {level} was refused {refusals[level].total} time(s): the closed loop outgrew the queue"
            break
        points.append((level, measurement))
        _, stop = saturation_index([m.images_per_s for _, m in points], config.growth)
        if stop:
            note = f"throughput at concurrency {level} was not more than {100 * config.growth:g} % above the best lower level"
            break
    if not points:
        raise StressError(f"every request at concurrency 1 was refused: {refusals[1].to_json()['kinds']}")
    best, _ = saturation_index([m.images_per_s for _, m in points], config.growth)
    level, at = points[best]
    return {
        "concurrency": level,
        "images_per_s": round(at.images_per_s, 3),
        "p50_ms": round(at.percentile(50), 3),
        "p95_ms": round(at.percentile(95), 3),
        "unloaded_p50_ms": round(points[0][1].percentile(50), 3),
        "stopped": note,
        "refused": refused,
        "cpu": cpu_by_level[level],
        "sweep": [{"concurrency": c, **m.to_json(), "cpu": cpu_by_level[c]} for c, m in points],
    }


# --- phase 2 and 3: the storm, then recovery ----------------------------------------------------


class _Storm:
    def __init__(self, config: StressConfig, url: str, payloads: Sequence[Payload], parity: Parity) -> None:
        self.config, self.url, self.payloads, self.parity = config, url, payloads, parity
        self.refusals = Refusals()
        self.admitted: list[tuple[float, float, str]] = []  # (answered at, latency ms, image), seconds from the storm's start
        self.sends: list[tuple[float, str]] = []  # (sent at, outcome: admitted / reason)
        self.not_sent = 0  # arrivals dropped at max_in_flight
        self.in_flight = 0
        self.live: list[tuple[float, float | None]] = []  # (asked at, answer ms or None)
        self.recovery_probes: list[tuple[float, float | None]] = []

    def _requests(self) -> dict[str, bytes]:
        """Each image's ModelInferRequest, serialised once (tritonclient's own request builder).

        tritonclient's infer() serialises the request again on every call: 7 MB for the real
        image, in the event loop, which on a busy machine held the loop for seconds and made
        the client, not the server, the bottleneck of the storm."""
        from tritonclient.grpc._utils import _get_inference_request

        outputs = requested_outputs(self.config.model)
        return {p.name: _get_inference_request(self.config.model, grpc_inputs(p, self.config.model, self.config.send_hints), "",
                                               "", outputs, 0, False, False, 0, None, None).SerializeToString()
                for p in self.payloads}

    async def run(self, rate: float, served: ServedSide, unloaded_p50_ms: float, server_pid: int | None) -> dict[str, Any]:
        import grpc
        import tritonclient.grpc.aio as aio
        from tritonclient.grpc import InferResult, service_pb2

        config = self.config
        # tritonclient's channel options (no message size limit, keepalive), its ModelInfer method
        # taking the serialised request as it is; the live probes ask over a channel of their own.
        monitor = aio.InferenceServerClient(self.url)
        channel = grpc.aio.insecure_channel(self.url, options=[("grpc.max_send_message_length", -1),
                                                               ("grpc.max_receive_message_length", -1)])
        model_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                          response_deserializer=service_pb2.ModelInferResponse.FromString)
        requests = self._requests()
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = asyncio.Event()
        send_lag_ms: list[float] = []

        async def one(payload: Payload, index: int) -> None:
            sent = loop.time()
            self.in_flight += 1
            try:
                response = await model_infer(requests[payload.name], timeout=config.request_timeout_s)
            except Exception as exc:  # noqa: BLE001 - every refusal is classified, none is lost
                reason = self.refusals.add(exc, 1000 * (loop.time() - sent), payload.name)
                self.sends[index] = (self.sends[index][0], reason)
            else:
                answered = loop.time()
                self.admitted.append((answered - start, 1000 * (answered - sent), payload.name))
                self.sends[index] = (self.sends[index][0], "admitted")
                self.parity(payload, InferResult(response).as_numpy("PROBABILITIES")[0])
            finally:
                self.in_flight -= 1

        async def watch_live() -> None:
            while not done.is_set():
                asked = loop.time()
                try:
                    live = await monitor.is_server_live(client_timeout=5.0)
                except Exception:  # noqa: BLE001 - no answer is the finding
                    live = False
                self.live.append((asked - start, 1000 * (loop.time() - asked) if live else None))
                try:
                    await asyncio.wait_for(done.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        times = arrival_times(rate, config.duration_s, config.arrivals, config.seed, config.max_requests)
        watcher = asyncio.create_task(watch_live())
        tasks: set[asyncio.Task] = set()
        cpu = CpuProbe(server_pid)
        cpu_before, machine_before = cpu.sample(), _machine_cpu()
        try:
            for i, at in enumerate(times):
                delay = start + at - loop.time()
                await asyncio.sleep(max(delay, 0.0))  # behind schedule: still let answers in between sends
                send_lag_ms.append(1000 * max(0.0, loop.time() - start - at))
                if self.in_flight >= config.max_in_flight:
                    self.not_sent += 1
                    continue
                self.sends.append((loop.time() - start, "pending"))
                task = asyncio.create_task(one(self.payloads[i % len(self.payloads)], len(self.sends) - 1))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            storm_end = loop.time()
            cpu_storm, machine_storm = cpu.sample(), _machine_cpu()
            recovery = await self._recover(served, unloaded_p50_ms, storm_end)
            if tasks:  # whatever the storm left outstanding: answered by now, or given up on
                _, pending = await asyncio.wait(set(tasks), timeout=config.request_timeout_s + 5.0)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            done.set()
            await watcher
            await channel.close()
            await monitor.close()
        window = storm_end - start
        in_window = [latency for at, latency, _ in self.admitted if at <= window]
        admitted_by_image: dict[str, list[float]] = collections.defaultdict(list)
        for _, latency, image in self.admitted:
            admitted_by_image[image].append(latency)
        busy = (machine_storm[0] - machine_before[0]) / max(machine_storm[1] - machine_before[1], 1e-9)
        return {
            "rate_offered": round(rate, 3),
            "arrivals": config.arrivals,
            "duration_s": round(window, 3),
            "scheduled": int(len(times)),
            "sent": len(self.sends),
            "not_sent_at_max_in_flight": self.not_sent,
            "rate_sent": round(len(self.sends) / window, 3) if window > 0 else None,
            "send_lag": _figures(send_lag_ms),  # how far behind its schedule the client sent
            "admitted": len(self.admitted),
            "admitted_in_storm": len(in_window),
            "goodput_images_per_s": round(len(in_window) / window, 3) if window > 0 else 0.0,
            "admitted_latency": _figures([latency for _, latency, _ in self.admitted]),
            "admitted_latency_by_image": {image: {"count": len(v), **_figures(v)} for image, v in sorted(admitted_by_image.items())},
            "rejected": self.refusals.to_json(),
            "live_probes": {
                "asked": len(self.live),
                "unanswered": sum(1 for _, ms in self.live if ms is None),
                **{k.replace("_ms", "_answer_ms"): v for k, v in _figures([ms for _, ms in self.live if ms is not None]).items()},
            },
            "cpu": {**_cpu_figures(cpu_before, cpu_storm, window, len(in_window)),
                    "machine_busy_share": round(busy, 3), "cores": os.cpu_count()},
            "timeline": _timeline(self.sends, self.admitted, window),
            "recovery": recovery,
        }

    async def _recover(self, served: ServedSide, unloaded_p50_ms: float, storm_end: float) -> dict[str, Any]:
        """Sequential requests from the end of the storm until the p50 of the last window is back."""
        from tritonclient.utils import InferenceServerException

        config, loop = self.config, asyncio.get_running_loop()
        window = 2 * len(self.payloads)
        threshold = config.targets.recovery_factor * unloaded_p50_ms
        recovered_at = None
        index = 0
        while recovered_at is None and loop.time() - storm_end < config.recovery_timeout_s:
            payload = self.payloads[index % len(self.payloads)]
            index += 1
            sent = loop.time()
            try:
                probabilities = await asyncio.to_thread(served, 0, payload)
            except InferenceServerException:
                latency = None
            else:
                latency = 1000 * (loop.time() - sent)
                self.parity(payload, probabilities)
            self.recovery_probes.append((loop.time() - storm_end, latency))
            recovered_at = recovered_after(self.recovery_probes, threshold, window)
        answered = [ms for _, ms in self.recovery_probes if ms is not None]
        return {
            "recovered": recovered_at is not None,
            "seconds": None if recovered_at is None else round(recovered_at, 3),
            "threshold_p50_ms": round(threshold, 3),
            "window_requests": window,
            "probes": len(self.recovery_probes),
            "probes_refused": len(self.recovery_probes) - len(answered),
            "p50_of_last_window_ms": round(float(np.median(answered[-window:])), 3) if answered else None,
            "gave_up_after_s": config.recovery_timeout_s,
            "probe_latencies": [[round(at, 3), None if ms is None else round(ms, 2)] for at, ms in self.recovery_probes],
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


def _listening_pid(url: str) -> int | None:
    """The process listening on the URL's port on this host (the server's CPU is then measured), if visible."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    pids = {c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    return pids.pop() if len(pids) == 1 else None


def _machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds, all CPU seconds) of the whole machine, from /proc/stat via psutil."""
    import psutil

    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    busy = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
    return busy, busy + idle


def _timeline(sends: Sequence[tuple[float, str]], admitted: Sequence[tuple[float, float, str]], window: float) -> list[dict[str, Any]]:
    """Per second of the storm: requests sent and how they ended, and the p95 of what was answered then."""
    seconds = int(np.ceil(window)) or 1
    rows = [{"second": s, "sent": 0, "admitted": 0, **{r: 0 for r in REASONS}, "admitted_p95_ms": None} for s in range(seconds)]
    for at, outcome in sends:
        row = rows[min(int(at), seconds - 1)]
        row["sent"] += 1
        if outcome in row:
            row[outcome] += 1
    by_second: dict[int, list[float]] = collections.defaultdict(list)
    for at, latency, _ in admitted:
        by_second[min(int(at), seconds - 1)].append(latency)
    for second, latencies in by_second.items():
        rows[second]["admitted_p95_ms"] = _figures(latencies)["p95_ms"]
    return rows


# --- the whole run -----------------------------------------------------------------------------


def server_health(url: str, model: str, pid: int | None = None) -> dict[str, Any]:
    """Is the server process (when known) alive, and do its live, ready and model-ready endpoints say yes?"""
    import psutil
    import tritonclient.grpc as grpcclient

    alive = None
    if pid is not None:
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
    health: dict[str, Any] = {"process_alive": alive}
    client = grpcclient.InferenceServerClient(url)
    try:
        for key, ask in (("live", client.is_server_live), ("ready", client.is_server_ready),
                         ("model_ready", lambda **kw: client.is_model_ready(model, **kw))):
            try:
                health[key] = bool(ask(client_timeout=5.0))
            except Exception:  # noqa: BLE001 - no answer is the finding
                health[key] = False
    finally:
        client.close()
    return health


def _shown(value: float | None, unit: str, spec: str = ".1f") -> str:
    return "-" if value is None else f"{value:{spec}} {unit}"


def evaluate(report: dict[str, Any], config: StressConfig) -> list[Check]:
    t, saturation, storm = config.targets, report["saturation"], report["storm"]
    rejected, recovery, after = storm["rejected"], storm["recovery"], report["health_after"]
    rejection_p95 = rejected["latency"]["all"]["p95_ms"]
    admitted_p95 = storm["admitted_latency"]["p95_ms"]
    admitted_limit = t.max_admitted_p95_factor * saturation["p95_ms"]
    goodput, goodput_limit = storm["goodput_images_per_s"], t.min_goodput_share * saturation["images_per_s"]
    crashes, parity = report["server_crashes"], report["parity"]
    other = rejected["by_reason"]["other"] + ((saturation["refused"] or {}).get("by_reason") or {}).get("other", 0)
    return [
        Check("rejection_p95", "target", "rejection latency p95", rejection_p95, _shown(rejection_p95, "ms"),
              f"< {t.max_rejection_p95_ms:g} ms", rejection_p95 is not None and rejection_p95 < t.max_rejection_p95_ms),
        Check("admitted_p95", "target", "admitted p95", admitted_p95, _shown(admitted_p95, "ms"),
              f"<= {t.max_admitted_p95_factor:g} x p95 at saturation = {admitted_limit:.0f} ms",
              admitted_p95 is not None and admitted_p95 <= admitted_limit),
        Check("goodput", "target", "goodput (admitted img/s)", goodput, _shown(goodput, "img/s"),
              f">= {100 * t.min_goodput_share:g} % of saturation = {goodput_limit:.1f} img/s", goodput >= goodput_limit),
        Check("recovery", "target", "recovery (p50 at concurrency 1)", recovery["seconds"],
              _shown(recovery["seconds"], "s", ".2f") if recovery["recovered"] else f"not in {recovery['gave_up_after_s']:g} s",
              f"<= {t.max_recovery_s:g} s to p50 <= {t.recovery_factor:g} x unloaded = {recovery['threshold_p50_ms']:.0f} ms",
              recovery["recovered"] and recovery["seconds"] <= t.max_recovery_s),
        Check("wrong_responses", "check", f"wrong answers (of {parity['responses_checked']})", parity["wrong"],
              f"{parity['wrong']} (max |diff| {parity['max_abs_diff']:.1e})", f"0 (|diff| <= {parity['tolerance']:g})",
              parity["wrong"] == 0),
        Check("server_crashes", "check", "server crashes", crashes,
              str(crashes), "0", crashes == 0 and after["model_ready"]),
        Check("other_rejections", "check", "refused not by the queue policy", other, str(other), "0", other == 0),
    ]


def run_stress(config: StressConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the three phases against the server at config.url; return the figures and checks (JSON-ready)."""
    from cxrlt.contract.manifest import read_manifest

    from loadtest.metrics import breakdown_json, default_metrics_url, diff, per_model, try_scrape
    from loadtest.runner import LoadTestError, check_server

    manifest = read_manifest(config.repo)
    payloads = load_payloads(config.image_set)
    url, metrics_url = config.url, config.metrics_url or default_metrics_url(config.url)
    try:
        check_server(url, [config.model])
    except LoadTestError as exc:
        raise StressError(str(exc)) from None
    server_pid = _listening_pid(url)  # its CPU and whether it is still alive afterwards, when this host shows it
    load_before = os.getloadavg()
    log("reference probabilities: the pipeline in process on the repository's ONNX files")
    parity = Parity(reference_probabilities(config.repo, config.model, payloads), config.parity_tolerance)
    served = ServedSide(url, config.model, payloads, config.send_hints)
    try:
        served.ensure_clients(1)
        for payload in payloads:  # warms the server and refuses a server that does not serve --repo
            if not parity(payload, served(0, payload)):
                raise StressError(f"{config.model} at {url} answers {payload.name} {parity.max_abs_diff:.2e} away from "
                                  f"the pipeline of {config.repo}: is the server serving --repo?")
        saturation = find_saturation(served, payloads, parity, config, log, server_pid)
        rate = config.overload * saturation["images_per_s"]
        log(f"storm: {rate:.1f} requests/s ({config.overload:g} x {saturation['images_per_s']:.1f}) for {config.duration_s:g} s")
        before = try_scrape(metrics_url)[0]
        storm = asyncio.run(_Storm(config, url, payloads, parity).run(rate, served, saturation["unloaded_p50_ms"], server_pid))
        after = try_scrape(metrics_url, before, {config.model: storm["admitted"]})[0] if before is not None else None
    finally:
        served.close()
    health = server_health(url, config.model, server_pid)
    load_after = os.getloadavg()
    live = storm["live_probes"]
    down = (health["process_alive"] is False) or live["unanswered"] > 0 or not health["live"] or not health["ready"]
    report: dict[str, Any] = {
        "model": config.model,
        "repository": str(config.repo),
        "profile": manifest.get("profile"),
        "url": url,
        "server_pid": server_pid,
        "images": [{"name": p.name, "shape": list(p.pixels.shape), "hint": p.hint if config.send_hints else None} for p in payloads],
        "overload": config.overload,
        "request_timeout_s": config.request_timeout_s,
        "saturation": saturation,
        "storm": storm,
        "parity": parity.to_json(),
        "health_after": health,
        "server_crashes": int(down),
        "triton": dict(breakdown_json(per_model(diff(before, after)))) if after is not None else None,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "targets": dataclasses.asdict(config.targets),
    }
    checks = evaluate(report, config)
    report["checks"] = [c.to_json() for c in checks]
    report["missed_targets"] = [c.name for c in checks if c.kind == "target" and not c.passed]
    report["failed_checks"] = [c.name for c in checks if c.kind == "check" and not c.passed]
    return report


def summary_table(report: dict[str, Any]):
    from rich import box
    from rich.table import Table

    saturation, storm = report["saturation"], report["storm"]
    rejected = storm["rejected"]
    table = Table(title=f"{report['model']}: {report['overload']:g} x the saturation rate for {storm['duration_s']:.0f} s "
                        f"({storm['arrivals']} arrivals)", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="target: timing, fails the command only with --strict; check: always")
    for column, justify in (("figure", "left"), ("measured", "right"), ("target", "left"), ("", "left")):
        table.add_column(column, justify=justify, no_wrap=True)

    def ms(value) -> str:
        return _shown(value, "ms")

    by = rejected["by_reason"]
    for figure, measured in (
        (f"saturation (closed loop, concurrency {saturation['concurrency']})", f"{saturation['images_per_s']:.1f} img/s"),
        ("p50 / p95 at saturation", f"{ms(saturation['p50_ms'])} / {ms(saturation['p95_ms'])}"),
        ("unloaded p50 (concurrency 1)", ms(saturation["unloaded_p50_ms"])),
        ("offered / sent (send lag p95)", f"{storm['rate_offered']:.1f} / {storm['rate_sent']:.1f} req/s "
                                          f"({ms(storm['send_lag']['p95_ms'])})"),
        ("sent: admitted / rejected", f"{storm['sent']}: {storm['admitted']} / {rejected['total']}"),
        ("rejected: queue full / timeout / other", f"{by['queue_full']} / {by['queue_timeout']} / {by['other']}"),
        ("rejection latency p50", ms(rejected["latency"]["all"]["p50_ms"])),
    ):
        table.add_row(figure, measured, "", "")
    for check in report["checks"]:
        verdict = "[green]PASS[/]" if check["passed"] else "[bold red]MISS[/]"
        table.add_row(check["figure"], check["shown"], check["target"], verdict)
    return table


def plot(report: dict[str, Any], path: Path) -> Path:
    """Per second of the storm: sent, admitted and rejected; admitted p95; then the recovery probes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storm, saturation = report["storm"], report["saturation"]
    rows = storm["timeline"]
    seconds = [r["second"] + 0.5 for r in rows]
    fig, (ax_count, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_count.plot(seconds, [r["sent"] for r in rows], "k-", label="sent")
    ax_count.plot(seconds, [r["admitted"] for r in rows], "o-", color="tab:green", label="admitted")
    ax_count.plot(seconds, [r["queue_full"] for r in rows], "s-", color="tab:red", label="queue full")
    ax_count.plot(seconds, [r["queue_timeout"] + r["other"] for r in rows], "^-", color="tab:purple", label="timeout / other")
    ax_count.axhline(saturation["images_per_s"], color="tab:blue", ls="--", label="saturation")
    ax_count.set_xlabel("second of the storm (by send time)")
    ax_count.set_ylabel("requests per second")
    ax_lat.plot(seconds, [r["admitted_p95_ms"] for r in rows], "o-", color="tab:green", label="admitted p95 (storm)")
    probes = [(storm["duration_s"] + at, ms) for at, ms in storm["recovery"]["probe_latencies"] if ms is not None]
    if probes:
        ax_lat.plot(*zip(*probes), ".", color="tab:orange", label="recovery probes (concurrency 1)")
    ax_lat.axhline(saturation["p95_ms"], color="tab:blue", ls="--", label="p95 at saturation")
    ax_lat.axvline(storm["duration_s"], color="grey", ls=":")
    ax_lat.set_xlabel("seconds from the storm's start")
    ax_lat.set_ylabel("ms")
    for ax in (ax_count, ax_lat):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} ({report['profile']} profile): {report['overload']:g} x saturation")
    return save_figure(fig, path)
