"""`cxrlt bench`: the served pipeline against the same pipeline run in process ("raw").

Raw: evaluation.reference.ReferencePipeline with engine "onnxruntime", i.e. the very pipeline
code of the Python backends (preprocessing, routing, TTA, ensemble, gating, zero-shot
scoring) on the repository's own ONNX files, with onnxruntime sessions in this process.
Concurrency N = N worker threads running the pipeline code; its network calls go to one
shared thread pool (onnxruntime releases the GIL and an InferenceSession may be run from
several threads at once), so an image's ensemble members run at the same time, as the served
BLS model's calls to separate network models do.
Served: N threads, each with its own gRPC client, calling the model on a tritonserver.

Both sides see the same images in the same order and are measured in the same run,
interleaved per concurrency (and alternating which goes first), so their ratio holds on a
noisy machine. Thread budget, read from the server: each raw onnxruntime session gets the
intra-op thread count of the served network models (--threads overrides it), and the pool
as many threads as make the served networks' compute threads (instances x intra-op threads,
summed; --raw-pool overrides it); raw sessions use the served networks' execution provider.
The report writes down both sides' budgets.

The default sweep (DEFAULT_LEVELS) goes to 16 images in flight, where both sides have
flattened out on a 2-core machine, but no higher than the measured model admits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from loadtest.payloads import MODELS, Payload, grpc_inputs, load_payloads, requested_outputs

BLS_MODELS = frozenset(MODELS)
# Up to 16 images in flight: where both sides have reached their plateau on a small machine.
DEFAULT_LEVELS = (1, 2, 4, 8, 16)


@dataclasses.dataclass
class BenchConfig:
    repo: Path
    url: str | None = None  # None: start the embedded tritonserver on free ports
    metrics_url: str | None = None
    concurrency: tuple[int, ...] | None = None  # None: default_levels
    requests: int = 64  # measured requests per side, concurrency and round
    rounds: int = 1  # repeats of the whole interleaved sweep, pooled (more rounds: steadier on a busy machine)
    warmup: int | None = None  # untimed requests per side and concurrency (default: max(concurrency, images))
    model: str = "cxr_classifier"
    threads: int | None = None  # raw onnxruntime intra-op threads per session (default: the server's)
    raw_pool: int | None = None  # raw network-call threads (default: the served compute threads / `threads`)
    raw_providers: str | None = None  # raw execution providers: auto, cpu, cuda (default: the served networks')
    preprocessing_repeats: int = 20  # timed prepare_square calls per configuration and image
    image_set: str = "all"
    send_hints: bool = True
    # Served side: send IMAGE through a system shared-memory region (client and server on one
    # host) instead of inside the gRPC message; each request still copies its image in.
    shared_memory: bool = False
    # Served side: downscale each image to at most this long side before sending, in every request
    # (cxrlt.client's send_size; "served": the served networks' largest input size)
    send_size: int | str | None = None
    server_log: Path | None = None  # log of the server bench starts (default: a temporary file)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if self.concurrency is not None and (not self.concurrency or any(c < 1 for c in self.concurrency)):
            raise ValueError("concurrency levels must be positive integers")
        if self.requests < 1:
            raise ValueError("--requests must be at least 1")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.raw_pool is not None and self.raw_pool < 1:
            raise ValueError("--raw-pool must be at least 1")
        if self.preprocessing_repeats < 1:
            raise ValueError("preprocessing repeats must be at least 1")
        if self.send_size is not None and self.shared_memory:
            raise ValueError("--send-size is for a remote server and --shared-memory for one on this host: choose one")


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
        return {
            "requests": self.requests,
            "wall_s": round(self.wall_s, 4),
            "images_per_s": round(self.images_per_s, 3),
            "p50_ms": round(self.percentile(50), 3),
            "p95_ms": round(self.percentile(95), 3),
            "mean_ms": round(float(np.mean(self.latencies_ms)), 3),
        }


def drive(call: Callable[[int, Payload], Any], payloads: Sequence[Payload], concurrency: int, total: int) -> Measurement:
    """`total` calls spread over `concurrency` threads (a shared counter hands out the images)."""
    counter = itertools.count()
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)

    def worker(worker_id: int) -> list[float]:
        latencies = []
        start_gate.wait()
        while True:
            with lock:
                index = next(counter)
            if index >= total:
                return latencies
            payload = payloads[index % len(payloads)]
            began = time.perf_counter()
            call(worker_id, payload)
            latencies.append((time.perf_counter() - began) * 1000.0)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as pool:
        futures = [pool.submit(worker, i) for i in range(concurrency)]
        start_gate.wait()
        began = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - began
    latencies = [x for r in results for x in r]
    return Measurement(concurrency, len(latencies), wall, latencies)


def pool(measurements: Sequence[Measurement]) -> Measurement:
    """Several rounds of one point as one measurement (requests and wall time summed, latencies pooled)."""
    return Measurement(measurements[0].concurrency, sum(m.requests for m in measurements),
                       sum(m.wall_s for m in measurements), [x for m in measurements for x in m.latencies_ms])


class RawSide:
    """The served pipeline's code with onnxruntime sessions in this process.

    With `pool_threads`, the network calls run on a pool of that many threads; without, each
    worker runs its image's calls one after another (enough for a reference answer).
    """

    def __init__(self, repo: Path, model: str, threads: int, pool_threads: int | None = None, providers: str = "cpu") -> None:
        from evaluation.reference import ReferencePipeline

        self.pool = ThreadPoolExecutor(pool_threads, thread_name_prefix="raw-network") if pool_threads else None
        self.pipeline = ReferencePipeline(repo, engine="onnxruntime", threads=threads, executor=self.pool, providers=providers)
        self.model = model
        # One event loop per worker slot, reused across sweeps and closed by close(): worker threads
        # come and go with each measurement, a loop left to the garbage collector fails to close.
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}
        self._loops_lock = threading.Lock()

    def _loop(self, worker_id: int) -> asyncio.AbstractEventLoop:
        with self._loops_lock:
            loop = self._loops.get(worker_id)
            if loop is None:
                loop = self._loops[worker_id] = asyncio.new_event_loop()
        return loop

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()
        if self.pool is not None:
            self.pool.shutdown()

    async def _run(self, payload: Payload) -> np.ndarray:
        hint = payload.hint
        if self.model == "cxr_classifier":
            return (await self.pipeline.classifier.classify(payload.pixels, hint)).probabilities
        if self.model == "cxr_zeroshot":
            return (await self.pipeline.zeroshot.score(payload.pixels))[0]
        task1, (task2, _) = await asyncio.gather(self.pipeline.classifier.classify(payload.pixels, hint),
                                                 self.pipeline.zeroshot.score(payload.pixels))
        return np.concatenate([task1.probabilities, task2])

    def __call__(self, worker_id: int, payload: Payload) -> np.ndarray:
        return self._loop(worker_id).run_until_complete(self._run(payload))

    def sessions(self) -> int:
        return len(self.pipeline._runners)

    def session_providers(self) -> dict[str, list[str]]:
        """The execution providers each session got (onnxruntime falls back to CPU when CUDA fails to load)."""
        return {name: self.pipeline._onnx.runner(name).providers for name in sorted(self.pipeline._runners)}


class ServedSide:
    """One gRPC client per worker, every image's request tensors serialised once.

    With `shared_memory`, each worker owns a system shared-memory region registered with the
    server; a request copies its image into it and names it in IMAGE, so the 16-bit image does
    not travel inside the gRPC message (what a gateway on the server's host can do).
    With `send_size`, every request downscales its image and serialises it anew, as a remote
    client with `--send-size` does, so the served side pays that CPU.
    """

    def __init__(self, url: str, model: str, payloads: Sequence[Payload], send_hints: bool, shared_memory: bool = False,
                 send_size: int | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._grpcclient = grpcclient
        self.url, self.model = url, model
        self.clients: list = []
        self.outputs = requested_outputs(model)
        self.inputs = {p.name: grpc_inputs(p, model, send_hints) for p in payloads}
        self.send_hints, self.send_size = send_hints, send_size
        self._region_bytes = max(p.pixels.nbytes for p in payloads)
        self._pool = None
        self._regions: list = []  # one cxrlt.client.shared_memory.Region per worker
        if shared_memory:
            from cxrlt.client.shared_memory import RegionPool

            self._pool = RegionPool("cxrlt_bench")

    def ensure_clients(self, count: int) -> None:
        while len(self.clients) < count:
            client = self._grpcclient.InferenceServerClient(self.url)
            if self._pool is not None:  # one region per worker, big enough for every image
                region, _ = self._pool.acquire(self._region_bytes)
                client.register_system_shared_memory(region.name, region.key, region.byte_size)
                self._regions.append(region)
            self.clients.append(client)

    def _shared_memory_inputs(self, worker_id: int, payload: Payload) -> list:
        batch = payload.pixels[None]
        image = self._grpcclient.InferInput("IMAGE", list(batch.shape), "UINT16")
        self._regions[worker_id].attach(image, batch)
        return [image, *self.inputs[payload.name][1:]]  # the hint, when sent, stays in the message

    def _downscaled_inputs(self, payload: Payload) -> list:
        from cxrlt.contract.preprocessing import downscale_for_sending

        smaller = dataclasses.replace(payload, pixels=downscale_for_sending(payload.pixels, self.send_size))
        return grpc_inputs(smaller, self.model, self.send_hints)

    def __call__(self, worker_id: int, payload: Payload) -> np.ndarray:
        if self._pool is not None:
            inputs = self._shared_memory_inputs(worker_id, payload)
        elif self.send_size is not None:
            inputs = self._downscaled_inputs(payload)
        else:
            inputs = self.inputs[payload.name]
        result = self.clients[worker_id].infer(self.model, inputs, outputs=self.outputs)
        return result.as_numpy("PROBABILITIES")[0]

    def close(self) -> None:
        from cxrlt.client.shared_memory import RegionPool

        regions = self._pool.drain() if self._pool is not None else []
        try:
            for client, region in zip(self.clients, regions):
                client.unregister_system_shared_memory(region.name)
        finally:
            RegionPool.destroy(regions)
            for client in self.clients:
                client.close()


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


class CpuProbe:
    """CPU seconds (user + system) spent by this process and, when known, the server's process tree.

    On a CPU-bound machine the served/raw throughput ratio is about the inverse ratio of CPU
    spent per image, so this says where the served side's extra time goes: this process holds
    the raw pipeline (raw side) or the gRPC clients (served side); the server's tree is
    tritonserver and its Python-backend stubs.
    """

    def __init__(self, server_pid: int | None) -> None:
        import psutil  # a dependency of locust

        self._psutil = psutil
        self.me = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None

    def _cpu(self, process) -> float:
        try:
            times = process.cpu_times()
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            return 0.0
        return times.user + times.system

    def sample(self) -> tuple[float, float | None]:
        if self.server is None:
            return self._cpu(self.me), None
        try:
            tree = [self.server, *self.server.children(recursive=True)]
        except self._psutil.NoSuchProcess:
            tree = []
        return self._cpu(self.me), sum(self._cpu(p) for p in tree)


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the sweep; return the figures (JSON-ready)."""
    from cxrlt.server.launcher import TritonServer, free_port
    from cxrlt.contract.manifest import read_manifest

    from loadtest.metrics import add, diff, member_calls_per_image, per_model, try_scrape

    manifest = read_manifest(config.repo)
    payloads = load_payloads(config.image_set)
    log("timing preprocessing")
    preprocessing = preprocessing_timings(config.repo, payloads, config.preprocessing_repeats)
    server = raw = served = None
    url, metrics_url = config.url, config.metrics_url
    try:
        if url is None:
            log(f"starting tritonserver on {config.repo}")
            if config.server_log is not None:
                config.server_log.parent.mkdir(parents=True, exist_ok=True)
            server = TritonServer(config.repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                                  log_file=config.server_log)
            server.start(timeout=300)
            url, metrics_url = server.endpoints.grpc, server.endpoints.metrics
        budget = server_thread_budget(url, list(manifest["models"]))
        raw_threads = config.threads if config.threads is not None else budget["network_intra_op_threads"]
        raw_pool = config.raw_pool or max(1, budget["network_compute_threads_total"] // max(1, raw_threads))
        raw_providers = config.raw_providers or served_provider_preference(budget)
        log(f"loading onnxruntime sessions (intra-op threads {raw_threads}, pool {raw_pool}, providers {raw_providers})")
        raw = RawSide(config.repo, config.model, raw_threads, raw_pool, raw_providers)
        levels = config.concurrency or default_levels(budget["models"][config.model])
        send_size = served_send_size(url, config.model, config.send_size)
        served = ServedSide(url, config.model, payloads, config.send_hints, config.shared_memory, send_size)
        served.ensure_clients(max(levels))

        # Warm both sides on every image (creates all raw sessions single-threaded) and compare outputs.
        parity = 0.0
        for payload in payloads:
            parity = max(parity, float(np.max(np.abs(raw(0, payload) - served(0, payload)))))

        # measurements[concurrency][side] -> one Measurement per round; Triton deltas summed over rounds
        measurements: dict[int, dict[str, list[Measurement]]] = {c: {"raw": [], "served": []} for c in levels}
        deltas: dict[int, Any] = {c: None for c in levels}
        probe = CpuProbe(server.process.pid if server is not None else None)
        cpu: dict[tuple[int, str], list[float]] = {}  # (concurrency, side) -> [this process s, server s]
        orders: dict[int, list[list[str]]] = {c: [] for c in levels}
        for round_index in range(config.rounds):
            for index, concurrency in enumerate(levels):
                warmup = config.warmup if config.warmup is not None else max(concurrency, len(payloads))
                total = max(config.requests, concurrency)
                sides = ("raw", "served") if (index + round_index) % 2 == 0 else ("served", "raw")
                orders[concurrency].append(list(sides))
                for side in sides:
                    call = raw if side == "raw" else served
                    if warmup:
                        drive(call, payloads, concurrency, warmup)
                    before = try_scrape(metrics_url)[0] if side == "served" else None
                    log(f"round {round_index + 1}/{config.rounds}, concurrency {concurrency}: {side}, {total} requests")
                    cpu_before = probe.sample()
                    measurements[concurrency][side].append(drive(call, payloads, concurrency, total))
                    cpu_after = probe.sample()
                    spent = cpu.setdefault((concurrency, side), [0.0, 0.0])
                    spent[0] += cpu_after[0] - cpu_before[0]
                    spent[1] += (cpu_after[1] - cpu_before[1]) if cpu_before[1] is not None else float("nan")
                    after = try_scrape(metrics_url, before, {config.model: total})[0] if before is not None else None
                    if after is not None:
                        deltas[concurrency] = add(deltas[concurrency], diff(before, after))
        session_providers = raw.session_providers()
        sweep = []
        for concurrency in levels:
            row: dict[str, Any] = {"concurrency": concurrency, "order": orders[concurrency][0], "orders": orders[concurrency]}
            for side in ("raw", "served"):
                pooled = pool(measurements[concurrency][side])
                row[side] = pooled.to_json()
                own, server_cpu = cpu[concurrency, side]
                row[side]["cpu_ms_per_image"] = {
                    "this_process": round(1000 * own / pooled.requests, 3),
                    "server": None if math.isnan(server_cpu) else round(1000 * server_cpu / pooled.requests, 3),
                }
            if deltas[concurrency] is not None:
                rows = per_model(deltas[concurrency])
                row["served"]["triton"] = {m.model: m.to_json() for m in rows}
                row["served"].update(member_calls_per_image(rows, config.model))
            row["ratio"] = round(row["served"]["images_per_s"] / row["raw"]["images_per_s"], 4) if row["raw"]["images_per_s"] else None
            per_round = [s.images_per_s / r.images_per_s for r, s in zip(measurements[concurrency]["raw"], measurements[concurrency]["served"])
                         if r.images_per_s]
            row["ratio_per_round"] = [round(x, 4) for x in per_round]
            sweep.append(row)
    finally:
        try:
            if served is not None:
                served.close()
        finally:
            if raw is not None:
                raw.close()
            if server is not None:
                server.stop()

    best_raw = max(sweep, key=lambda r: r["raw"]["images_per_s"])
    best_served = max(sweep, key=lambda r: r["served"]["images_per_s"])
    first = min(sweep, key=lambda r: r["concurrency"])
    return {
        "model": config.model,
        "repository": str(config.repo),
        "profile": manifest.get("profile"),
        "url": config.url or "embedded (started by cxrlt bench)",
        "images": [{"name": p.name, "shape": list(p.pixels.shape), "hint": p.hint if config.send_hints else None} for p in payloads],
        "requests_per_point": config.requests,
        "admitted_concurrency": admitted_concurrency(budget["models"][config.model]),
        "rounds": config.rounds,
        "thread_budget": {
            "served": budget,
            "raw": {"pool_threads": raw_pool, "intra_op_threads_per_session": raw_threads,
                    "compute_threads_total": raw_pool * max(1, raw_threads), "sessions": raw.sessions(),
                    "workers": "= concurrency (threads running the pipeline code; its network calls run on the pool)"},
        },
        "execution_providers": {
            "available": available_providers(),
            "raw_preference": raw_providers,
            "raw_sessions": session_providers,
            "served_configured": {n: m.get("execution_provider") for n, m in budget["models"].items() if n not in BLS_MODELS},
        },
        "preprocessing_ms": preprocessing,
        "image_transport": "system shared memory" if config.shared_memory else "gRPC message",
        "send_size": send_size,
        "parity_max_abs_diff": parity,
        "sweep": sweep,
        "best": {
            "raw": {"concurrency": best_raw["concurrency"], "images_per_s": best_raw["raw"]["images_per_s"]},
            "served": {"concurrency": best_served["concurrency"], "images_per_s": best_served["served"]["images_per_s"],
                       "member_requests_per_image": best_served["served"].get("member_requests_per_image"),
                       "member_executions_per_image": best_served["served"].get("member_executions_per_image")},
            "ratio": round(best_served["served"]["images_per_s"] / best_raw["raw"]["images_per_s"], 4),
        },
        "overhead_per_image_ms": {
            "concurrency": first["concurrency"],
            "p50": round(first["served"]["p50_ms"] - first["raw"]["p50_ms"], 3),
            "mean": round(first["served"]["mean_ms"] - first["raw"]["mean_ms"], 3),
        },
    }


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in report["sweep"]]
    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"raw": "tab:blue", "served": "tab:orange"}
    labels = {"raw": "raw (onnxruntime in process)", "served": "served (Triton, gRPC)"}
    for side in ("raw", "served"):
        ax_tput.plot(levels, [r[side]["images_per_s"] for r in report["sweep"]], "o-", color=colors[side], label=labels[side])
        ax_lat.plot(levels, [r[side]["p50_ms"] for r in report["sweep"]], "o-", color=colors[side], label=f"{side} p50")
        ax_lat.plot(levels, [r[side]["p95_ms"] for r in report["sweep"]], "s--", color=colors[side], label=f"{side} p95")
    for ax, title, ylabel in ((ax_tput, "throughput", "images/s"), (ax_lat, "latency", "ms per image")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    best = report["best"]
    fig.suptitle(f"{report['model']} ({report['profile']} profile): served/raw at best = {best['ratio']:.2f}")
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (the bench, stress and soak plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


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
