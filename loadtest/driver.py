"""`cxrlt stress` and `cxrlt soak`: two modes of one driver against one server on this host, taking the command's
options (argparse's namespace) as they are. stress: saturation, a storm at `overload` x that rate, recovery;
soak: many requests, the server's process tree sampled, its growth fitted (loadtest/README.md, "Overload", "Soak")."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np
import pandas as pd
import psutil
import tritonclient.grpc.aio as aio

from cxrlt.client.sdk import OVERLOAD_MESSAGES
from cxrlt.contract.manifest import read_manifest
from loadtest.bench import RawSide
from loadtest.kernel import (GRPC_OPTIONS, MIB, MODELS, SATURATION_GROWTH, LoadTestError, Payload, Served, address, alive, check,
                             check_server, cpu_figures, cpu_sample, cpu_used, drive, error_text, figures, fmt, images_json,
                             level_figures, load_average, load_payloads, measure_level, model_infer, probabilities, request_bytes,
                             require_loopback, sample_tree, saturation_index, saved_figure, server_health, target_server,
                             verdicts)
from loadtest.metrics import Counters, breakdown_json

REASONS = ("queue_full", "queue_timeout", "other")
QUEUE_MESSAGES = dict(zip(REASONS, OVERLOAD_MESSAGES))  # reason -> the queue policy's message, lower case
PARITY_TOLERANCE = 1e-4  # max |difference| from the reference pipeline's probabilities
STRESS_TARGETS = {"max_rejection_p95_ms": 50.0,  # overload is refused fast
                  "max_admitted_p95_factor": 2.0,  # admitted p95 <= this x the p95 at saturation
                  "min_goodput_share": 0.9,  # admitted throughput >= this x the saturation throughput
                  "recovery_factor": 1.5,  # recovered: p50 at concurrency 1 <= this x the unloaded p50 ...
                  "max_recovery_s": 5.0}  # ... within this many seconds after the storm
SERIES = ("rss_bytes", "rss_anon_bytes", "fds", "shm_files", "shm_bytes")  # the soak's sampled series, their growth fitted


def check_options(args: argparse.Namespace, mode: str) -> None:
    """What argparse leaves to check: a server on this host, for soak enough samples after the warm-up; --url -> HOST:PORT."""
    if args.url is None and args.repo is None:
        raise ValueError(f"cxrlt {mode}: give --url (a server on this host) or --repo (it starts one on it)")
    if args.url is not None:
        args.url = address(args.url).netloc
        require_loopback(args.url, f"cxrlt {mode}")
    if mode == "soak":
        if args.warmup < 0 or args.warmup >= args.requests:
            raise ValueError(f"--warmup ({args.warmup}) must be at least 0 and below --requests ({args.requests})")
        post = [b for b in chunk_bounds(args.requests, args.sample_every, args.warmup) if b >= args.warmup]
        if len(post) < 3:
            raise ValueError(f"only {len(post)} samples after the warm-up: lower --sample-every or raise --requests "
                             "(the slope needs at least 3)")


def run(args: argparse.Namespace, mode: str, server_log: Path | None = None,
        log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the mode's phases against the server; return the figures and checks (JSON-ready)."""
    check_options(args, mode)
    payloads, stress = load_payloads(args.image_set), mode == "stress"
    models = [args.model] if stress else list(MODELS)
    before, started_at = load_average(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with target_server(args.repo, args.url, server_log, getattr(args, "server_pid", None), log) as (url, metrics_url, pid):
        check_server(url, models)
        if pid is not None and not alive(pid):
            raise LoadTestError(f"no running process {pid} (--server-pid)")
        metrics_url = getattr(args, "metrics_url", None) or metrics_url
        report = (_stress if stress else _soak)(args, url, metrics_url, pid, payloads, log)
        report["health_after"] = server_health(url, models, pid)
    report.update(url=url, server_pid=pid, repository=str(args.repo) if args.repo else None, started_at=started_at,
                  server=f"started by cxrlt {mode}" if args.url is None else "given (--url)",
                  images=images_json(payloads, args.hints), load_average={"before": before, "after": load_average()},
                  cpus=os.cpu_count())
    checks = (stress_checks if stress else soak_checks)(report)
    unmet = {kind: [c["name"] for c in checks if c["kind"] == kind and not c["passed"]] for kind in ("target", "check")}
    return {**report, **verdicts(checks), "missed_targets": unmet["target"], "failed_checks": unmet["check"]}


def _stress(args: argparse.Namespace, url: str, metrics_url: str, pid: int | None, payloads: Sequence[Payload],
            log: Callable[[str], None]) -> dict[str, Any]:
    log("reference probabilities: the pipeline in process on the repository's ONNX files")
    with contextlib.closing(RawSide(args.repo, args.model, threads=1)) as raw:
        parity = Parity({p.name: np.asarray(raw(0, p), dtype=np.float64) for p in payloads})
    with contextlib.closing(Served(url, args.model, args.hints)) as served:
        served.ensure_clients(1)
        for payload in payloads:  # warms the server and refuses a server that does not serve --repo
            if not parity(payload, served(0, payload)):
                raise LoadTestError(f"{args.model} at {url} answers {payload.name} {parity.figures['max_abs_diff']:.2e} "
                                    f"away from the pipeline of {args.repo}: is the server serving --repo?")
        saturation = find_saturation(served, payloads, parity, args, log, pid)
        rate = args.overload * saturation["images_per_s"]
        log(f"storm: {rate:.1f} requests/s ({args.overload:g} x {saturation['images_per_s']:.1f}) for {args.duration_s:g} s")
        counters = Counters(metrics_url)
        storm_figures = asyncio.run(storm(args, url, payloads, parity, rate, served, saturation["unloaded_p50_ms"], pid))
        delta = counters.grown({args.model: storm_figures["admitted"]})
    return {"model": args.model, "profile": read_manifest(args.repo).get("profile"), "overload": args.overload,
            "request_timeout_s": args.timeout_s, "saturation": saturation, "storm": storm_figures,
            "parity": parity.figures, "targets": STRESS_TARGETS, "triton": None if delta is None else breakdown_json(delta)}


def rejection_reason(status: str | None, message: str | None) -> str:
    """queue_full / queue_timeout (UNAVAILABLE from the queue policy), else other."""
    policy = [reason for reason, text in QUEUE_MESSAGES.items() if text in (message or "").lower()]
    return policy[0] if policy and "UNAVAILABLE" in (status or "") else "other"


def arrival_times(rate: float, duration_s: float, arrivals: str, seed: int, max_requests: int) -> np.ndarray:
    """Send times (seconds from the start) of an open loop at `rate` requests/s for `duration_s`."""
    if not rate > 0:
        raise ValueError(f"arrival rate must be positive, not {rate!r}")
    expected = int(np.ceil(rate * duration_s))
    if arrivals == "fixed":
        times = np.arange(expected) / rate
    else:  # enough exponential gaps to pass duration_s
        times = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=expected + 10 * int(np.sqrt(expected)) + 10))
    return times[times < duration_s][:max_requests]


def recovered_after(probes: Sequence[tuple[float, float | None]], threshold_ms: float, window: int) -> float | None:
    """When the p50 of `window` answered probes (answered at, latency ms or None: refused) first is <= threshold_ms."""
    latencies = pd.Series([latency for _, latency in probes], dtype=float)  # refused: NaN, which no full window holds
    back = latencies.rolling(window).median() <= threshold_ms
    return probes[int(back.idxmax())][0] if back.any() else None


class Parity:
    """Every answered request's probabilities against the reference for the same image."""

    def __init__(self, reference: dict[str, np.ndarray]) -> None:
        self.reference, self.lock = reference, threading.Lock()
        self.figures = {"tolerance": PARITY_TOLERANCE, "responses_checked": 0, "wrong": 0, "max_abs_diff": 0.0}

    def __call__(self, payload: Payload, probabilities: np.ndarray) -> bool:
        diff = float(np.max(np.abs(np.asarray(probabilities, dtype=np.float64) - self.reference[payload.name])))
        with self.lock:
            self.figures["responses_checked"] += 1
            self.figures["max_abs_diff"] = max(self.figures["max_abs_diff"], diff)
            self.figures["wrong"] += not diff <= PARITY_TOLERANCE
        return diff <= PARITY_TOLERANCE


class Refusals(list):
    """Refused requests, a row each: reason, status, message, latency ms (appended from several threads: atomic)."""

    def add(self, exc: Exception, latency_ms: float) -> None:
        status, message = error_text(exc)
        self.append((rejection_reason(status, message), status, message[:300], latency_ms))

    def to_json(self) -> dict[str, Any]:
        """The total, the count and latency by reason, and each distinct (reason, status, message) with its count."""
        frame = pd.DataFrame(self, columns=["reason", "status", "message", "latency_ms"])
        kinds = frame.groupby(["reason", "status", "message"]).size().sort_values(ascending=False, kind="stable")
        return {"total": len(frame), "by_reason": frame.reason.value_counts().reindex(REASONS, fill_value=0).to_dict(),
                "latency": {"all": figures(frame.latency_ms),
                            **{r: figures(frame.latency_ms[frame.reason == r]) for r in REASONS}},
                "kinds": [{"reason": r, "status": s, "message": m, "count": int(n)} for (r, s, m), n in kinds.items()]}


def find_saturation(served: Served, payloads: Sequence[Payload], parity: Parity, args: argparse.Namespace,
                    log: Callable[[str], None], server_pid: int | None) -> dict[str, Any]:
    """The closed loop at concurrency 1, 2, 4, ... up to --max-concurrency, until throughput stops growing."""
    def call(worker: int, payload: Payload) -> None:
        try:
            parity(payload, served(worker, payload))
        except grpc.RpcError as exc:
            refusals.add(exc, 0.0)  # a closed-loop refusal's latency is not recorded

    levels = [2 ** k for k in range(args.max_concurrency.bit_length())]
    points, refused, note = [], None, f"throughput still grew at the largest concurrency ({levels[-1]})"
    for level in levels:
        served.ensure_clients(level)
        refusals, total = Refusals(), max(args.saturation_requests, 4 * level)
        log(f"saturation: closed loop at concurrency {level}, {total} requests")
        measured = measure_level(call, payloads, level, total, max(level, len(payloads)), server_pid)
        if refusals:
            refused = {"concurrency": level, **{k: v for k, v in refusals.to_json().items() if k != "latency"}}
            note = f"concurrency {level} was refused {len(refusals)} time(s): the closed loop outgrew the queue"
            break
        points.append({"concurrency": level, **level_figures([measured])})
        best, stop = saturation_index([p["images_per_s"] for p in points])
        if stop:
            note = f"throughput at concurrency {level} was not more than {100 * SATURATION_GROWTH:g} % above the best lower level"
            break
    if not points:
        raise LoadTestError(f"every request at concurrency 1 was refused: {refusals.to_json()['kinds']}")
    return {**{key: points[best][key] for key in ("concurrency", "images_per_s", "p50_ms", "p95_ms")},
            "unloaded_p50_ms": points[0]["p50_ms"], "stopped": note, "refused": refused, "cpu": points[best]["cpu"],
            "sweep": points}


async def storm(args: argparse.Namespace, url: str, payloads: Sequence[Payload], parity: Parity, rate: float,
                served: Served, unloaded_p50_ms: float, server_pid: int | None) -> dict[str, Any]:
    """The open loop (phase 2) on one grpc.aio channel, the live endpoint asked twice a second; then the recovery (phase 3)."""
    loop, refusals, done = asyncio.get_running_loop(), Refusals(), asyncio.Event()
    requests = {p.name: request_bytes(p, args.model, args.hints) for p in payloads}
    times = arrival_times(rate, args.duration_s, args.arrivals, args.seed, args.max_requests)
    admitted: list[tuple[float, float]] = []  # (answered at, latency ms), seconds from the start
    live: list[tuple[float, float | None]] = []  # (asked at, answer ms or None)
    send_lag_ms, in_flight, not_sent, start = [], set(), 0, loop.time()  # not sent: dropped at --max-in-flight

    async def one(infer: Callable, payload: Payload, sent_at: float) -> None:
        try:
            response = await infer(requests[payload.name], timeout=args.timeout_s)
        except Exception as exc:  # noqa: BLE001 - every refusal is classified, none is lost
            refusals.add(exc, 1000 * (loop.time() - start - sent_at))
        else:
            answered = loop.time() - start
            admitted.append((answered, 1000 * (answered - sent_at)))
            parity(payload, probabilities(response)[0])

    async def watch_live(monitor: Any) -> None:
        while not done.is_set():
            asked = loop.time()
            try:
                answered = await monitor.is_server_live(client_timeout=5.0)
            except Exception:  # noqa: BLE001 - no answer is the finding
                answered = False
            live.append((asked - start, 1000 * (loop.time() - asked) if answered else None))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    async with aio.InferenceServerClient(url) as monitor, grpc.aio.insecure_channel(url, options=GRPC_OPTIONS) as channel:
        watcher, infer, before = asyncio.create_task(watch_live(monitor)), model_infer(channel), cpu_sample(server_pid)
        psutil.cpu_percent()  # from here on: the next call answers the machine's busy share since this one
        try:
            for i, at in enumerate(times):
                await asyncio.sleep(max(start + at - loop.time(), 0.0))  # behind schedule: still let answers in between sends
                send_lag_ms.append(1000 * max(0.0, loop.time() - start - at))
                if len(in_flight) >= args.max_in_flight:
                    not_sent += 1
                    continue
                in_flight.add(task := asyncio.create_task(one(infer, payloads[i % len(payloads)], loop.time() - start)))
                task.add_done_callback(in_flight.discard)
            window, sent = loop.time() - start, len(times) - not_sent
            cpu_s, busy_pct = cpu_used(before, server_pid), psutil.cpu_percent()
            recovery = await recover(args, served, payloads, parity, unloaded_p50_ms)
            with contextlib.suppress(asyncio.TimeoutError):  # what the storm left outstanding: answered by now, or cancelled
                await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), args.timeout_s + 5.0)
        finally:
            done.set()
            await watcher
    in_window, answers = [ms for at, ms in admitted if at <= window], [ms for _, ms in live if ms is not None]
    return {  # send_lag: how far behind its schedule the client sent
        "rate_offered": round(rate, 3), "arrivals": args.arrivals, "duration_s": round(window, 3), "scheduled": len(times),
        "sent": sent, "not_sent_at_max_in_flight": not_sent, "rate_sent": round(sent / window, 3) if window > 0 else None,
        "send_lag": figures(send_lag_ms), "admitted": len(admitted), "admitted_in_storm": len(in_window),
        "goodput_images_per_s": round(len(in_window) / window, 3) if window > 0 else 0.0,
        "admitted_latency": figures([ms for _, ms in admitted]), "rejected": refusals.to_json(),
        "live_probes": {"asked": len(live), "unanswered": len(live) - len(answers),
                        **{k.replace("_ms", "_answer_ms"): v for k, v in figures(answers).items()}},
        "cpu": {**cpu_figures(cpu_s, window, len(in_window)), "cores": os.cpu_count(),
                "machine_busy_share": round(busy_pct / 100, 3)},
        "recovery": recovery}


async def recover(args: argparse.Namespace, served: Served, payloads: Sequence[Payload], parity: Parity,
                  unloaded_p50_ms: float) -> dict[str, Any]:
    """Sequential requests from the end of the storm until the p50 of the last window is back."""
    loop, probes, recovered_at = asyncio.get_running_loop(), [], None
    window, threshold, storm_end = 2 * len(payloads), STRESS_TARGETS["recovery_factor"] * unloaded_p50_ms, loop.time()
    for payload in itertools.cycle(payloads):
        if recovered_at is not None or loop.time() - storm_end >= args.recovery_timeout_s:
            break
        sent, latency = loop.time(), None
        with contextlib.suppress(grpc.RpcError):
            parity(payload, await asyncio.to_thread(served, 0, payload))
            latency = 1000 * (loop.time() - sent)
        probes.append((loop.time() - storm_end, latency))
        recovered_at = recovered_after(probes[-window:], threshold, window)
    answered = [ms for _, ms in probes if ms is not None]
    return {"recovered": recovered_at is not None, "seconds": None if recovered_at is None else round(recovered_at, 3),
            "threshold_p50_ms": round(threshold, 3), "window_requests": window, "probes": len(probes),
            "probes_refused": len(probes) - len(answered),
            "p50_of_last_window_ms": round(float(np.median(answered[-window:])), 3) if answered else None,
            "gave_up_after_s": args.recovery_timeout_s}


def stress_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    t, saturation, storm, parity = STRESS_TARGETS, report["saturation"], report["storm"], report["parity"]
    rejected, recovery, after = storm["rejected"], storm["recovery"], report["health_after"]
    down = after["process_alive"] is False or storm["live_probes"]["unanswered"] > 0 or not after["live"] or not after["ready"]
    crashes = report["server_crashes"] = int(down)
    rejection_p95, admitted_p95 = rejected["latency"]["all"]["p95_ms"], storm["admitted_latency"]["p95_ms"]
    admitted_limit = t["max_admitted_p95_factor"] * saturation["p95_ms"]
    goodput, goodput_limit = storm["goodput_images_per_s"], t["min_goodput_share"] * saturation["images_per_s"]
    other = rejected["by_reason"]["other"] + ((saturation["refused"] or {}).get("by_reason") or {}).get("other", 0)
    return [
        check("rejection_p95", rejection_p95 is not None and rejection_p95 < t["max_rejection_p95_ms"], "rejection latency p95",
              fmt(rejection_p95, unit="ms"), f"< {t['max_rejection_p95_ms']:g} ms", rejection_p95, "target"),
        check("admitted_p95", admitted_p95 is not None and admitted_p95 <= admitted_limit, "admitted p95",
              fmt(admitted_p95, unit="ms"), f"<= {t['max_admitted_p95_factor']:g} x p95 at saturation = {admitted_limit:.0f} ms",
              admitted_p95, "target"),
        check("goodput", goodput >= goodput_limit, "goodput (admitted img/s)", fmt(goodput, unit="img/s"),
              f">= {100 * t['min_goodput_share']:g} % of saturation = {goodput_limit:.1f} img/s", goodput, "target"),
        check("recovery", recovery["recovered"] and recovery["seconds"] <= t["max_recovery_s"], "recovery (p50 at concurrency 1)",
              fmt(recovery["seconds"], ".2f", "s") if recovery["recovered"] else f"not in {recovery['gave_up_after_s']:g} s",
              f"<= {t['max_recovery_s']:g} s to p50 <= {t['recovery_factor']:g} x unloaded = "
              f"{recovery['threshold_p50_ms']:.0f} ms", recovery["seconds"], "target"),
        check("wrong_responses", parity["wrong"] == 0, f"wrong answers (of {parity['responses_checked']})",
              f"{parity['wrong']} (max |diff| {parity['max_abs_diff']:.1e})", f"0 (|diff| <= {parity['tolerance']:g})",
              parity["wrong"]),
        check("server_crashes", crashes == 0 and after["model_ready"], "server crashes", str(crashes), "0", crashes),
        check("other_rejections", other == 0, "refused not by the queue policy", str(other), "0", other),
    ]


def stress_plot(report: dict[str, Any], path: Path) -> Path:
    """The saturation sweep's throughput and latency per concurrency, against the storm's rate, goodput and admitted p95."""
    storm, sweep = report["storm"], pd.DataFrame(report["saturation"]["sweep"]).set_index("concurrency")
    title = f"{report['model']} ({report['profile']} profile): {report['overload']:g} x saturation"
    with saved_figure(path, title, 1, 2, (11, 4.2)) as (throughput, latency):
        sweep[["images_per_s"]].plot(ax=throughput, style="o-", title="throughput", ylabel="images/s")
        throughput.axhline(storm["rate_offered"], color="tab:red", ls=":", label="offered in the storm")
        throughput.axhline(storm["goodput_images_per_s"], color="tab:green", ls="--", label="goodput in the storm")
        sweep[["p50_ms", "p95_ms"]].plot(ax=latency, style="o-", title="latency", ylabel="ms")
        if storm["admitted_latency"]["p95_ms"] is not None:
            latency.axhline(storm["admitted_latency"]["p95_ms"], color="tab:green", ls="--", label="admitted p95 in the storm")
        for ax in (throughput, latency):
            ax.set(xlabel="concurrency (closed loop)", ylim=(0, None))
    return path


def chunk_bounds(requests: int, sample_every: int, warmup: int) -> list[int]:
    """Request counts at which to sample: 0, every `sample_every`, the end of the warm-up, and the last."""
    return sorted({0, warmup, requests, *range(sample_every, requests, sample_every)})


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope, intercept and the slope's standard error (from the fit's covariance, scaled by the residuals)."""
    (slope, intercept), covariance = np.polyfit(x, y, 1, cov=True)
    return float(slope), float(intercept), float(np.sqrt(covariance[0, 0]))


def growth(metric: str, requests: Sequence[int], values: Sequence[float], warmup: int) -> dict[str, Any]:
    """How `values` (sampled at `requests`) moved after the warm-up: the least-squares fit's growth and slopes, and the level
    growth (last few samples against the first few); the later half's slope tells a leak from an allocator settling."""
    x_all, y_all = np.asarray(requests, dtype=float), np.asarray(values, dtype=float)
    x, y = x_all[x_all >= warmup], y_all[x_all >= warmup]
    if len(x) < 3:
        raise LoadTestError(f"{metric}: {len(x)} samples after the warm-up; at least 3 are needed for a slope")
    slope, intercept, _ = _slope(x, y)
    start_fit, end_fit = float(slope * x[0] + intercept), float(slope * x[-1] + intercept)
    half, window = len(x) // 2, max(1, min(5, len(x) // 4))
    later = [1000.0 * value for value in _slope(x[half:], y[half:])] if len(x) - half >= 3 else [None] * 3  # per 1,000 requests
    figures = {"at_start": float(y_all[0]), "after_warmup": float(y[0]), "end": float(y[-1]), "fitted_after_warmup": start_fit,
               "fitted_end": end_fit, "growth_pct": 100.0 * (end_fit - start_fit) / start_fit if start_fit > 0 else None,
               "slope_per_1000": 1000.0 * slope, "slope_per_1000_later_half": later[0], "later_half_stderr_per_1000": later[2],
               "level_growth": float(np.median(y[-window:]) - np.median(y[:window]))}
    return {"metric": metric, "samples": int(len(x)), **{k: v if v is None else round(v, 6) for k, v in figures.items()}}


def check_growth(series: dict[str, dict[str, Any]], targets: dict[str, float]) -> list[dict[str, Any]]:
    """RSS's fitted growth and later-half slope, the level growth of fds and /dev/shm files (not their bytes: the Python
    backend grows its regions to the largest load seen)."""
    rss = series["rss_bytes"]
    pct = rss["growth_pct"] if rss["growth_pct"] is not None else float("inf")
    later = rss["slope_per_1000_later_half"] if rss["slope_per_1000_later_half"] is not None else rss["slope_per_1000"]
    error = f" ± {rss['later_half_stderr_per_1000'] / MIB:.3f}" if rss["later_half_stderr_per_1000"] is not None else ""
    max_pct, max_slope = targets["max_rss_growth_pct"], targets["max_rss_slope_mib_per_1000"]
    checks = [check("rss_growth_pct", pct < max_pct, "RSS growth after warm-up", f"{pct:+.2f} % (least-squares fit)",
                    f"< {max_pct:g} %", pct),
              check("rss_slope", later / MIB < max_slope, "RSS slope over the later half after warm-up",
                    f"{later / MIB:+.3f}{error} MiB per 1,000 requests (all after warm-up: {rss['slope_per_1000'] / MIB:+.3f})",
                    f"< {max_slope:g}", later / MIB)]
    for key, name, limit in (("fds", "open file descriptors", targets["max_fd_growth"]),
                             ("shm_files", "/dev/shm files", targets["max_shm_file_growth"])):
        g = series[key]
        checks.append(check(f"{key}_growth", g["level_growth"] <= limit, f"{name} growth", f"{g['level_growth']:+g} "
                            f"({g['after_warmup']:g} after warm-up, {g['end']:g} at the end; slope {g['slope_per_1000']:+.3g} "
                            "per 1,000 requests)", f"<= {limit:g}", g["level_growth"]))
    return checks


def jobs(payloads: Sequence[Payload]) -> list[tuple[str, Payload]]:
    """The request cycle: the models take turns, and each model sees every image."""
    return [(model, payload) for payload in payloads for model in MODELS]


def _soak(args: argparse.Namespace, url: str, metrics_url: str, pid: int | None, payloads: Sequence[Payload],
          log: Callable[[str], None]) -> dict[str, Any]:
    if pid is None:
        raise LoadTestError(f"no process listening on {url} is visible here: give --server-pid, the server's PID")
    cycle, outcomes = jobs(payloads), []  # outcomes: (model, the error's first line or None), from several threads

    def call(worker: int, job: tuple[str, Payload]) -> None:
        try:
            served(worker, job)
            outcomes.append((job[0], None))
        except Exception as exc:  # noqa: BLE001 - every failure is counted by model and message
            outcomes.append((job[0], error_text(exc)[1].splitlines()[0][:200]))

    began, latencies, stopped, samples = time.monotonic(), [], None, [sample_tree(pid, 0, 0.0)]
    with contextlib.closing(Served(url, MODELS[0], args.hints, timeout_s=args.timeout_s)) as served:
        served.ensure_clients(args.concurrency)
        for start, stop in itertools.pairwise(chunk_bounds(args.requests, args.sample_every, args.warmup)):
            if time.monotonic() - began > args.time_limit_s:
                stopped = f"time limit of {args.time_limit_s:g} s reached after {start} requests"
                break
            offset = start % len(cycle)
            chunk, _ = drive(call, cycle[offset:] + cycle[:offset], args.concurrency, stop - start)
            latencies.extend(chunk)
            try:
                if not alive(pid):
                    raise LoadTestError(f"process {pid} exited")
                sample = sample_tree(pid, stop, time.monotonic() - began)
            except LoadTestError as exc:
                stopped = f"the server stopped after {stop} requests ({exc})"
                break
            samples.append({**sample, **{f"chunk_{k}": v for k, v in figures(chunk).items() if k in ("p50_ms", "p95_ms")}})
            log(f"{stop}/{args.requests} requests: RSS {sample['rss_bytes'] / MIB:.0f} MiB, {sample['fds']} fds, "
                f"{sample['shm_files']} shm files, {sum(error is not None for _, error in outcomes)} failures")
    wall_s, done, failed = time.monotonic() - began, samples[-1]["requests"], [(m, e) for m, e in outcomes if e is not None]
    try:
        series = {key: growth(key, [s["requests"] for s in samples], [s[key] for s in samples], args.warmup) for key in SERIES}
        not_measured = None
    except LoadTestError as exc:  # stopped before enough samples after warm-up
        series, not_measured = {}, str(exc)
    load = {key: getattr(args, key) for key in ("requests", "warmup", "sample_every", "concurrency", "image_set", "hints",
                                                "timeout_s", "time_limit_s")}
    return {"load": {**load, "models": list(MODELS)}, "requests_completed": done, "wall_s": round(wall_s, 2), "stopped": stopped,
            "not_measured": not_measured, "requests_per_s": round(done / wall_s, 3) if wall_s > 0 else None,
            "latency": figures(latencies), "sent": dict(collections.Counter(m for m, _ in outcomes)),
            "failed": dict(collections.Counter(m for m, _ in failed)),
            "errors": dict(collections.Counter(f"{m}: {e}" for m, e in failed).most_common(10)), "growth": series,
            "samples": samples, "targets": {"max_rss_growth_pct": args.max_rss_growth_pct, "max_failures": 0,
                                            "max_rss_slope_mib_per_1000": args.max_rss_slope_mib, "max_fd_growth": 0,
                                            "max_shm_file_growth": 0}}


def soak_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = ([check("samples", False, "growth", "not measured", "3 samples after warm-up",
                     message=f"growth not measured: {report['not_measured']}")] if report["not_measured"] else
              check_growth(report["growth"], report["targets"]))
    failures, limit = sum(report["failed"].values()), report["targets"]["max_failures"]
    done, stopped, wanted = report["requests_completed"], report["stopped"], report["load"]["requests"]
    return [*checks, check("max_failures", failures <= limit, "failures", f"{failures} failed requests", f"<= {limit}", failures),
            check("completed", stopped is None and done == wanted, "requests sent",
                  f"{done} of {wanted}" + (f" ({stopped})" if stopped else ""), f"all {wanted}", done)]


def soak_plot(report: dict[str, Any], path: Path) -> Path:
    """RSS, file descriptors, /dev/shm and latency against requests, the warm-up shaded, the fits of RSS and fds drawn."""
    samples, warmup, load = pd.DataFrame(report["samples"]).set_index("requests"), report["load"]["warmup"], report["load"]
    samples[["rss_bytes", "rss_anon_bytes", "shm_bytes"]] /= MIB
    title = (f"cxrlt soak: {report['requests_completed']} requests at concurrency {load['concurrency']} "
             f"({', '.join(load['models'])}), " + ("PASS" if report["passed"] else "MISS: " + ", ".join(report["missed"])))
    with saved_figure(path, title, 2, 2, (11, 7), "lower right", sharex=True) as grid:
        rss, fds, shm, latency = grid
        samples[["rss_bytes", "rss_anon_bytes"]].plot(ax=rss, style=".-", title="RSS of tritonserver and its children (MiB)")
        samples[["fds"]].plot(ax=fds, style=".-", title="open file descriptors")
        samples[["shm_files"]].plot(ax=shm, style=".-", title="/dev/shm held by the server: files, MiB (right axis)")
        samples[["shm_bytes"]].plot(ax=shm, style=".-", secondary_y=True, legend=False)
        samples[["chunk_p50_ms", "chunk_p95_ms"]].plot(ax=latency, style=".-", title="client latency per chunk (ms)")
        for key, ax, scale in (("rss_bytes", rss, MIB), ("fds", fds, 1)):
            if g := report["growth"].get(key):
                ax.plot([warmup, samples.index[-1]], [g["fitted_after_warmup"] / scale, g["fitted_end"] / scale], "--",
                        color="black", label=f"fit after warm-up: {g['slope_per_1000'] / scale:+.3g} per 1,000 requests")
        for ax in grid:
            ax.axvspan(0, warmup, color="0.85", label="warm-up")
            ax.set(xlabel="requests completed", ylim=(0, max(1.0, 1.25 * max(line.get_ydata().max() for line in ax.get_lines()))))
    return path
