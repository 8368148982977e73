"""`cxrlt bench`: the served pipeline against the same pipeline run in process ("raw").

Raw: the very pipeline code of the Python backends (python_backends.classifier and .zeroshot:
preprocessing, routing, TTA, ensemble, gating, zero-shot scoring, with the settings of the
repository's config.pbtxt files) on the repository's own ONNX files, with onnxruntime sessions
in this process (python_backends.in_process.LocalNetworks; no torch). Concurrency N = N worker
threads running the pipeline code; its network calls go to one shared thread pool (onnxruntime
releases the GIL), so an image's ensemble members run at the same time, as the served BLS
model's calls to separate network models do.
Served: N threads, each with its own gRPC client, calling the model on a tritonserver.

Both sides see the same images in the same order and are measured in the same run,
interleaved per concurrency (and alternating which goes first), so their ratio holds on a
noisy machine. Thread budget, read from the server: each raw onnxruntime session gets the
intra-op thread count of the served network models (--threads overrides it), and the pool
as many threads as make the served networks' compute threads (instances x intra-op threads,
summed; --raw-pool overrides it); raw sessions use the served networks' execution provider.

The default sweep (DEFAULT_LEVELS) goes to 16 images in flight, where both sides have
flattened out on a 2-core machine, but no higher than the measured model admits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from loadtest.kernel import Measurement, Served, cpu_sample, drive, pool, pyplot, save_figure, target_server
from loadtest.payloads import MODELS, Payload, load_payloads

BLS_MODELS = frozenset(MODELS)
DEFAULT_LEVELS = (1, 2, 4, 8, 16)
SIDES = ("raw", "served")


@dataclasses.dataclass
class BenchConfig:
    repo: Path
    url: str | None = None  # None: start the embedded tritonserver on free ports
    metrics_url: str | None = None
    concurrency: tuple[int, ...] | None = None  # None: default_levels
    requests: int = 64  # measured requests per side, concurrency and round
    rounds: int = 1  # repeats of the whole interleaved sweep, pooled
    warmup: int | None = None  # untimed requests per side and concurrency (default: max(concurrency, images))
    model: str = "cxr_classifier"
    threads: int | None = None  # raw onnxruntime intra-op threads per session (default: the server's)
    raw_pool: int | None = None  # raw network-call threads (default: the served compute threads / `threads`)
    raw_providers: str | None = None  # raw execution providers: auto, cpu, cuda (default: the served networks')
    preprocessing_repeats: int = 20  # timed prepare_square calls per configuration and image
    image_set: str = "all"
    send_hints: bool = True
    shared_memory: bool = False  # served: IMAGE through a system shared-memory region (the SDK's)
    send_size: int | str | None = None  # served: downscale before sending (the SDK's send_size)
    server_log: Path | None = None  # log of the server bench starts

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if self.concurrency is not None and (not self.concurrency or any(c < 1 for c in self.concurrency)):
            raise ValueError("concurrency levels must be positive integers")
        for name in ("requests", "rounds", "preprocessing_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.raw_pool is not None and self.raw_pool < 1:
            raise ValueError("--raw-pool must be at least 1")
        if self.send_size is not None and self.shared_memory:
            raise ValueError("--send-size is for a remote server and --shared-memory for one on this host: choose one")


class RawSide:
    """The served pipeline's code with onnxruntime sessions in this process (torch-free).

    With `pool_threads`, the network calls run on a pool of that many threads; without, each
    worker runs its image's calls one after another (enough for a reference answer).
    """

    def __init__(self, repo: Path, model: str, threads: int, pool_threads: int | None = None, providers: str = "cpu") -> None:
        from cxrlt.contract.labels import TASK2_LABELS
        from cxrlt.contract.model_config import config_parameters
        from cxrlt.contract.served import ENCODER_MODEL
        from cxrlt.contract.text_cache import ENCODER_RECORD, load_text_cache
        from python_backends.classifier import ClassifierPipeline, ClassifierSettings
        from python_backends.in_process import LocalNetworks
        from python_backends.zeroshot import ZeroShotPipeline, ZeroShotSettings

        repo = Path(repo)
        self.model, self.used = model, set()
        self.networks = LocalNetworks(repo, threads, providers=providers)
        self.pool = ThreadPoolExecutor(pool_threads, thread_name_prefix="raw-network") if pool_threads else None
        settings = {name: config_parameters(repo / name / "config.pbtxt") for name in ("cxr_classifier", "cxr_zeroshot")}
        self.classifier = ClassifierPipeline(ClassifierSettings.from_parameters(settings["cxr_classifier"]), self.infer)
        cache = load_text_cache(repo / "cxr_zeroshot" / "1", TASK2_LABELS, repo / ENCODER_MODEL / "1" / ENCODER_RECORD, repo)
        self.zeroshot = ZeroShotPipeline(ZeroShotSettings.from_parameters(settings["cxr_zeroshot"]), cache, self.infer)
        # One event loop per worker slot, reused across sweeps and closed by close().
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}
        self._loops_lock = threading.Lock()

    async def infer(self, name: str, pixel_values: np.ndarray) -> np.ndarray:
        self.used.add(name)
        run = self.networks.runner(name).run
        if self.pool is None:
            return run(pixel_values)
        return await asyncio.get_running_loop().run_in_executor(self.pool, run, pixel_values)

    async def _run(self, payload: Payload) -> np.ndarray:
        if self.model == "cxr_classifier":
            return (await self.classifier.classify(payload.pixels, payload.hint)).probabilities
        if self.model == "cxr_zeroshot":
            return (await self.zeroshot.score(payload.pixels))[0]
        task1, (task2, _) = await asyncio.gather(self.classifier.classify(payload.pixels, payload.hint),
                                                 self.zeroshot.score(payload.pixels))
        return np.concatenate([task1.probabilities, task2])

    def __call__(self, worker_id: int, payload: Payload) -> np.ndarray:
        with self._loops_lock:
            if worker_id not in self._loops:
                self._loops[worker_id] = asyncio.new_event_loop()
            loop = self._loops[worker_id]
        return loop.run_until_complete(self._run(payload))

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()
        if self.pool is not None:
            self.pool.shutdown()

    def session_providers(self) -> dict[str, list[str]]:
        """The execution providers each session got (onnxruntime falls back to CPU when CUDA fails to load)."""
        return {name: self.networks.runner(name).providers for name in sorted(self.used)}


def server_thread_budget(url: str, repo_models: Sequence[str]) -> dict[str, Any]:
    """instances and onnxruntime intra-op threads of every model, as the server has them loaded."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        models = {}
        for name in [*MODELS, *repo_models]:
            if name in models:
                continue
            config = client.get_model_config(name, as_json=True)["config"]
            instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
            params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
            entry: dict[str, Any] = {"instances": instances, "max_batch_size": int(config.get("max_batch_size", 0))}
            batching = config.get("dynamic_batching")
            if batching is not None:
                entry["max_queue_delay_us"] = int(batching.get("max_queue_delay_microseconds", 0))
                entry["max_queue_size"] = int(batching.get("default_queue_policy", {}).get("max_queue_size", 0))
            if name not in BLS_MODELS:
                entry["intra_op_threads"] = int(params.get("intra_op_threads") or 0)
                entry["engine"] = params.get("engine", "onnxruntime")
                entry["execution_provider"] = params.get("execution_provider")
            elif "member_execution" in params:
                entry["member_execution"] = params["member_execution"]
            models[name] = entry
    finally:
        client.close()
    networks = {n: m for n, m in models.items() if n not in BLS_MODELS}
    return {
        "models": models,
        "network_intra_op_threads": max((m["intra_op_threads"] for m in networks.values()), default=1),
        "network_compute_threads_total": sum(m["instances"] * max(1, m["intra_op_threads"]) for m in networks.values()),
        "bls_processes_total": sum(models[m]["instances"] for m in MODELS if m in models),
    }


def served_send_size(url: str, model: str, send_size: int | str | None) -> int | None:
    """--send-size as a number of pixels ("served": what cxrlt.client reads from the served configs)."""
    from cxrlt.contract.served import SEND_SIZE_SERVED

    if send_size != SEND_SIZE_SERVED:
        return send_size
    from cxrlt.client import CxrltClient

    with CxrltClient(url, model=model, send_size=send_size) as client:
        return client.model_info().input_size


def admitted_concurrency(entry: dict[str, Any]) -> int | None:
    """How many requests a model surely takes at once: its bounded queue (None: unbounded).

    Not the queue plus one per instance: Triton frees an instance a moment after the client has
    its response, so a closed loop's next requests can all be queued while every instance still
    counts as busy, and a loop above the queue's size meets "Exceeds maximum queue size"."""
    return entry["max_queue_size"] or None


def default_levels(entry: dict[str, Any]) -> tuple[int, ...]:
    """DEFAULT_LEVELS, the highest replaced by what the model admits when that is lower."""
    admitted = admitted_concurrency(entry)
    if admitted is None or admitted >= DEFAULT_LEVELS[-1]:
        return DEFAULT_LEVELS
    return tuple(sorted({*(level for level in DEFAULT_LEVELS if level < admitted), admitted}))


def available_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def served_provider_preference(budget: dict[str, Any]) -> str:
    """The networks' `execution_provider` parameter when they agree, else "auto"."""
    preferences = {m.get("execution_provider") for n, m in budget["models"].items() if n not in BLS_MODELS}
    return preferences.pop() if len(preferences) == 1 and None not in preferences else "auto"


# The real payload's shape: a detector matrix, the preprocessing's expensive case.
RADIOGRAPH_SHAPE = (1955, 1841)


def preprocessing_timings(repo: Path, payloads: Sequence[Payload], repeats: int = 20) -> dict[str, Any]:
    """prepare_square in this one thread, per distinct preprocessing of the served pipelines:
    on a seeded 12-bit random image of RADIOGRAPH_SHAPE and on each payload."""
    from cxrlt.contract.model_config import config_parameters
    from cxrlt.contract.preprocessing import PreprocessConfig, prepare_square

    configs: dict[PreprocessConfig, list[str]] = {}
    for model in ("cxr_classifier", "cxr_zeroshot"):
        configs.setdefault(PreprocessConfig.from_parameters(config_parameters(repo / model / "config.pbtxt")), []).append(model)
    images = {"random_12bit": np.random.default_rng(0).integers(0, 4096, RADIOGRAPH_SHAPE, dtype=np.uint16),
              **{p.name: p.pixels for p in payloads}}

    def timed(image: np.ndarray, config: PreprocessConfig) -> dict[str, Any]:
        prepare_square(image, config)  # warm-up: first-call allocations and imports
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            prepare_square(image, config)
            times.append((time.perf_counter() - began) * 1000.0)
        return {"median_ms": round(float(np.median(times)), 3), "min_ms": round(min(times), 3)}

    return {
        "function": "cxrlt.contract.preprocessing.prepare_square",
        "repetitions": repeats,
        "configs": [
            {"models": models, "size": config.size, "mode": config.mode,
             "images": [{"image": name, "shape": list(image.shape), **timed(image, config)} for name, image in images.items()]}
            for config, models in configs.items()
        ],
    }



def _raw_budget(config: BenchConfig, budget: dict[str, Any]) -> tuple[int, int, str]:
    threads = config.threads if config.threads is not None else budget["network_intra_op_threads"]
    raw_pool = config.raw_pool or max(1, budget["network_compute_threads_total"] // max(1, threads))
    return threads, raw_pool, config.raw_providers or served_provider_preference(budget)


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the sweep; return the figures (JSON-ready)."""
    from cxrlt.contract.manifest import read_manifest

    manifest, payloads = read_manifest(config.repo), load_payloads(config.image_set)
    log("timing preprocessing")
    preprocessing = preprocessing_timings(config.repo, payloads, config.preprocessing_repeats)
    with contextlib.ExitStack() as stack:
        url, metrics_url, pid = stack.enter_context(target_server(config.repo, config.url, config.server_log, log=log))
        server_pid = pid if config.url is None else None  # --url: the server's processes are not ours to measure
        budget = server_thread_budget(url, list(manifest["models"]))
        threads, raw_pool, providers = _raw_budget(config, budget)
        log(f"loading onnxruntime sessions (intra-op threads {threads}, pool {raw_pool}, providers {providers})")
        raw = stack.enter_context(contextlib.closing(RawSide(config.repo, config.model, threads, raw_pool, providers)))
        levels = config.concurrency or default_levels(budget["models"][config.model])
        send_size = served_send_size(url, config.model, config.send_size)
        served = stack.enter_context(contextlib.closing(Served(url, config.model, config.send_hints,
                                                               shared_memory=config.shared_memory, send_size=send_size)))
        served.ensure_clients(max(levels))
        # Warm both sides on every image (creates all raw sessions single-threaded) and compare outputs.
        parity = max(float(np.max(np.abs(raw(0, p) - served(0, p)))) for p in payloads)
        sides = {"raw": raw, "served": served}
        sweep = _sweep(config, levels, payloads, sides, config.metrics_url or metrics_url, server_pid, log)
        raw_json = {"pool_threads": raw_pool, "intra_op_threads_per_session": threads,
                    "compute_threads_total": raw_pool * max(1, threads), "sessions": len(raw.networks),
                    "workers": "= concurrency (threads running the pipeline code; its network calls run on the pool)"}
        providers_json = {"available": available_providers(), "raw_preference": providers, "raw_sessions": raw.session_providers(),
                          "served_configured": {n: m.get("execution_provider") for n, m in budget["models"].items()
                                                if n not in BLS_MODELS}}
    return {
        "model": config.model, "repository": str(config.repo), "profile": manifest.get("profile"),
        "url": config.url or "embedded (started by cxrlt bench)",
        "images": [{"name": p.name, "shape": list(p.pixels.shape), "hint": p.hint if config.send_hints else None} for p in payloads],
        "requests_per_point": config.requests, "admitted_concurrency": admitted_concurrency(budget["models"][config.model]),
        "rounds": config.rounds, "thread_budget": {"served": budget, "raw": raw_json},
        "execution_providers": providers_json, "preprocessing_ms": preprocessing,
        "image_transport": "system shared memory" if config.shared_memory else "gRPC message", "send_size": send_size,
        "parity_max_abs_diff": parity, "sweep": sweep, **_best(sweep),
    }


def _sweep(config: BenchConfig, levels: Sequence[int], payloads: Sequence[Payload], sides: dict[str, Callable],
           metrics_url: str | None, server_pid: int | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every round over every level, both sides back to back (which goes first alternates)."""
    from loadtest.metrics import add, diff, try_scrape

    measured: dict[tuple[int, str], list[Measurement]] = {}
    cpu: dict[tuple[int, str], list[float]] = {}  # (concurrency, side) -> [this process s, server s]
    deltas: dict[int, Any] = {c: None for c in levels}
    orders: dict[int, list[list[str]]] = {c: [] for c in levels}
    for round_index in range(config.rounds):
        for index, concurrency in enumerate(levels):
            warmup = config.warmup if config.warmup is not None else max(concurrency, len(payloads))
            total = max(config.requests, concurrency)
            order = SIDES if (index + round_index) % 2 == 0 else SIDES[::-1]
            orders[concurrency].append(list(order))
            for side in order:
                if warmup:
                    drive(sides[side], payloads, concurrency, warmup)
                before = try_scrape(metrics_url)[0] if side == "served" else None
                log(f"round {round_index + 1}/{config.rounds}, concurrency {concurrency}: {side}, {total} requests")
                cpu_before = cpu_sample(server_pid)
                measured.setdefault((concurrency, side), []).append(drive(sides[side], payloads, concurrency, total))
                cpu_after = cpu_sample(server_pid)
                spent = cpu.setdefault((concurrency, side), [0.0, 0.0])
                spent[0] += cpu_after[0] - cpu_before[0]
                spent[1] += cpu_after[1] - cpu_before[1] if server_pid is not None else math.nan
                after = try_scrape(metrics_url, before, {config.model: total})[0] if before is not None else None
                if after is not None:
                    deltas[concurrency] = add(deltas[concurrency], diff(before, after))
    return [_row(config.model, c, orders[c], {s: measured[c, s] for s in SIDES}, {s: cpu[c, s] for s in SIDES}, deltas[c])
            for c in levels]


def _row(model: str, concurrency: int, orders: list[list[str]], measured: dict[str, list[Measurement]],
         cpu: dict[str, list[float]], delta: Any) -> dict[str, Any]:
    from loadtest.metrics import member_calls_per_image, per_model

    row: dict[str, Any] = {"concurrency": concurrency, "order": orders[0], "orders": orders}
    for side in SIDES:
        pooled = pool(measured[side])
        own, server_cpu = cpu[side]
        row[side] = {**pooled.to_json(), "cpu_ms_per_image": {
            "this_process": round(1000 * own / pooled.requests, 3),
            "server": None if math.isnan(server_cpu) else round(1000 * server_cpu / pooled.requests, 3)}}
    if delta is not None:
        rows = per_model(delta)
        row["served"]["triton"] = {m.model: m.to_json() for m in rows}
        row["served"].update(member_calls_per_image(rows, model))
    raw_rate = row["raw"]["images_per_s"]
    row["ratio"] = round(row["served"]["images_per_s"] / raw_rate, 4) if raw_rate else None
    row["ratio_per_round"] = [round(s.images_per_s / r.images_per_s, 4) for r, s in zip(measured["raw"], measured["served"])
                              if r.images_per_s]
    return row


def _best(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    best_raw = max(sweep, key=lambda r: r["raw"]["images_per_s"])
    best_served = max(sweep, key=lambda r: r["served"]["images_per_s"])
    first = min(sweep, key=lambda r: r["concurrency"])
    served = best_served["served"]
    return {
        "best": {"raw": {"concurrency": best_raw["concurrency"], "images_per_s": best_raw["raw"]["images_per_s"]},
                 "served": {"concurrency": best_served["concurrency"], "images_per_s": served["images_per_s"],
                            "member_requests_per_image": served.get("member_requests_per_image"),
                            "member_executions_per_image": served.get("member_executions_per_image")},
                 "ratio": round(served["images_per_s"] / best_raw["raw"]["images_per_s"], 4)},
        "overhead_per_image_ms": {"concurrency": first["concurrency"],
                                  "p50": round(first["served"]["p50_ms"] - first["raw"]["p50_ms"], 3),
                                  "mean": round(first["served"]["mean_ms"] - first["raw"]["mean_ms"], 3)},
    }


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    levels = [r["concurrency"] for r in report["sweep"]]
    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"raw": "tab:blue", "served": "tab:orange"}
    labels = {"raw": "raw (onnxruntime in process)", "served": "served (Triton, gRPC)"}
    for side in SIDES:
        ax_tput.plot(levels, [r[side]["images_per_s"] for r in report["sweep"]], "o-", color=colors[side], label=labels[side])
        ax_lat.plot(levels, [r[side]["p50_ms"] for r in report["sweep"]], "o-", color=colors[side], label=f"{side} p50")
        ax_lat.plot(levels, [r[side]["p95_ms"] for r in report["sweep"]], "s--", color=colors[side], label=f"{side} p95")
    for ax, title, ylabel in ((ax_tput, "throughput", "images/s"), (ax_lat, "latency", "ms per image")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set(xlabel="concurrency", ylabel=ylabel, title=title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} ({report['profile']} profile): served/raw at best = {report['best']['ratio']:.2f}")
    return save_figure(fig, path)


def summary_table(report: dict[str, Any]):
    from rich import box
    from rich.table import Table

    table = Table(title=f"{report['model']}: raw (onnxruntime in process) vs served (Triton, gRPC)", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="img/s: images per second; p50/p95: latency per image in ms; member req/img: "
                          "network requests (BLS calls) per image, from Triton's statistics")
    for column in ("conc", "raw img/s", "raw p50", "raw p95", "srv img/s", "srv p50", "srv p95", "srv/raw", "member req/img"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in report["sweep"]:
        members = r["served"].get("member_requests_per_image")
        table.add_row(str(r["concurrency"]), f"{r['raw']['images_per_s']:.2f}", f"{r['raw']['p50_ms']:.1f}",
                      f"{r['raw']['p95_ms']:.1f}", f"{r['served']['images_per_s']:.2f}", f"{r['served']['p50_ms']:.1f}",
                      f"{r['served']['p95_ms']:.1f}", f"{r['ratio']:.2f}" if r["ratio"] is not None else "-",
                      f"{members:.2f}" if members is not None else "-")
    return table
