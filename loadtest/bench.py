"""`cxrlt bench`: the served pipeline against the same pipeline run in process ("raw"), and the GPU run
behind `loadtest/gpu_bench.sh` (`python -m loadtest.bench`), which benches each public model and load-tests
them on a GPU build (loadtest/README.md, "Benchmark" and "GPU run").

Raw: the Python backends' own pipeline code with the repository's config.pbtxt settings, on its ONNX
files with onnxruntime sessions in this process (no torch); an image's network calls run on a thread
pool, as the served BLS model's calls to separate network models do. Served: one gRPC channel per
worker. Both sides see the same images and are measured interleaved per concurrency (alternating
which goes first), with the server's thread budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxrlt.contract.served import CLASSIFIER_MODEL, ENCODER_MODEL, FINDINGS_MODEL, SEND_SIZE_SERVED, ZEROSHOT_MODEL
from loadtest.kernel import (IMAGE_SETS, MODELS, Measurement, Payload, Served, cpu_sample, drive, fmt, images_json,
                             load_payloads, process_tree, save_figure, subplots, table, target_server, write_json)

DEFAULT_LEVELS = (1, 2, 4, 8, 16)
SIDES = ("raw", "served")
RADIOGRAPH_SHAPE = (1955, 1841)  # the real payload's detector matrix: the preprocessing's expensive case
CUDA = "CUDAExecutionProvider"
# (model, figure, comparison, bound): the GPU run's targets for the paper profile on an H100/H200-class GPU.
TARGETS = (
    (CLASSIFIER_MODEL, "p50_ms_at_concurrency_1", "<=", 15.0),
    (CLASSIFIER_MODEL, "images_per_s_at_saturation", ">=", 400.0),
    (ZEROSHOT_MODEL, "images_per_s_at_saturation", ">=", 2000.0),
)


@dataclasses.dataclass
class BenchConfig:
    repo: Path
    url: str | None = None  # None: start the embedded tritonserver on free ports
    metrics_url: str | None = None
    concurrency: tuple[int, ...] | None = None  # None: default_levels
    requests: int = 64  # measured requests per side, concurrency and round
    rounds: int = 1  # repeats of the whole interleaved sweep, pooled
    warmup: int | None = None  # untimed requests per side and concurrency (default: max(concurrency, images))
    model: str = CLASSIFIER_MODEL
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
        for name in ("requests", "rounds", "preprocessing_repeats", "raw_pool"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.send_size is not None and self.shared_memory:
            raise ValueError("--send-size is for a remote server and --shared-memory for one on this host: choose one")


class RawSide:
    """The served pipeline's code with onnxruntime sessions in this process (torch-free); with
    `pool_threads`, the network calls run on a pool of that many threads, else one after another."""

    def __init__(self, repo: Path, model: str, threads: int, pool_threads: int | None = None, providers: str = "cpu") -> None:
        from cxrlt.contract.labels import TASK2_LABELS
        from cxrlt.contract.model_config import config_parameters
        from cxrlt.contract.text_cache import ENCODER_RECORD, load_text_cache
        from python_backends.classifier import ClassifierPipeline, ClassifierSettings
        from python_backends.in_process import LocalNetworks
        from python_backends.zeroshot import ZeroShotPipeline, ZeroShotSettings

        repo = Path(repo)
        self.model, self.used, self.loops, self.lock = model, set(), {}, threading.Lock()
        self.networks = LocalNetworks(repo, threads, providers=providers, concurrent_calls=pool_threads or 0)
        settings = {name: config_parameters(repo / name / "config.pbtxt") for name in (CLASSIFIER_MODEL, ZEROSHOT_MODEL)}
        self.classifier = ClassifierPipeline(ClassifierSettings.from_parameters(settings[CLASSIFIER_MODEL]), self.infer)
        cache = load_text_cache(repo / ZEROSHOT_MODEL / "1", TASK2_LABELS, repo / ENCODER_MODEL / "1" / ENCODER_RECORD, repo)
        self.zeroshot = ZeroShotPipeline(ZeroShotSettings.from_parameters(settings[ZEROSHOT_MODEL]), cache, self.infer)

    async def infer(self, name: str, pixel_values: np.ndarray) -> np.ndarray:
        self.used.add(name)
        return await self.networks.infer(name, pixel_values)

    async def _run(self, payload: Payload) -> np.ndarray:
        if self.model == ZEROSHOT_MODEL:
            return (await self.zeroshot.score(payload.pixels))[0]
        if self.model == CLASSIFIER_MODEL:
            return (await self.classifier.classify(payload.pixels, payload.hint)).probabilities
        task1, (task2, _) = await asyncio.gather(self.classifier.classify(payload.pixels, payload.hint),
                                                 self.zeroshot.score(payload.pixels))
        return np.concatenate([task1.probabilities, task2])

    def __call__(self, worker_id: int, payload: Payload) -> np.ndarray:
        with self.lock:  # one event loop per worker slot, reused across sweeps
            loop = self.loops.get(worker_id) or self.loops.setdefault(worker_id, asyncio.new_event_loop())
        return loop.run_until_complete(self._run(payload))

    def close(self) -> None:
        for loop in self.loops.values():
            loop.close()
        self.loops.clear()

    def session_providers(self) -> dict[str, list[str]]:
        """The execution providers each session got (onnxruntime falls back to CPU when CUDA fails to load)."""
        return {name: self.networks.runner(name).providers for name in sorted(self.used)}


def server_thread_budget(url: str, repo_models: Sequence[str]) -> dict[str, Any]:
    """Instances and onnxruntime intra-op threads of every model, as the server has them loaded."""
    import tritonclient.grpc as grpcclient

    client, models = grpcclient.InferenceServerClient(url), {}
    try:
        for name in dict.fromkeys([*MODELS, *repo_models]):
            config = client.get_model_config(name, as_json=True)["config"]
            params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
            entry = models[name] = {"instances": sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1,
                                    "max_batch_size": int(config.get("max_batch_size", 0))}
            if (batching := config.get("dynamic_batching")) is not None:
                entry["max_queue_delay_us"] = int(batching.get("max_queue_delay_microseconds", 0))
                entry["max_queue_size"] = int(batching.get("default_queue_policy", {}).get("max_queue_size", 0))
            if name not in MODELS:
                entry.update(intra_op_threads=int(params.get("intra_op_threads") or 0), engine=params.get("engine", "onnxruntime"),
                             execution_provider=params.get("execution_provider"))
            elif "member_execution" in params:
                entry["member_execution"] = params["member_execution"]
    finally:
        client.close()
    networks = [m for n, m in models.items() if n not in MODELS]
    return {"models": models, "network_intra_op_threads": max((m["intra_op_threads"] for m in networks), default=1),
            "network_compute_threads_total": sum(m["instances"] * max(1, m["intra_op_threads"]) for m in networks),
            "bls_processes_total": sum(models[m]["instances"] for m in MODELS if m in models)}


def default_levels(entry: dict[str, Any]) -> tuple[int, ...]:
    """DEFAULT_LEVELS, the highest replaced by what the model surely admits at once (its bounded queue) when
    lower: Triton frees an instance a moment after the response, so a closed loop's next requests may all queue."""
    admitted = entry["max_queue_size"] or None
    if admitted is None or admitted >= DEFAULT_LEVELS[-1]:
        return DEFAULT_LEVELS
    return tuple(sorted({*(level for level in DEFAULT_LEVELS if level < admitted), admitted}))


def preprocessing_timings(repo: Path, payloads: Sequence[Payload], repeats: int = 20) -> dict[str, Any]:
    """prepare_square in this one thread, per distinct preprocessing of the served pipelines: on a seeded
    12-bit random image of RADIOGRAPH_SHAPE and on each payload (median and min of `repeats`, after one warm-up)."""
    from cxrlt.contract.model_config import config_parameters
    from cxrlt.contract.preprocessing import PreprocessConfig, prepare_square

    configs: dict[PreprocessConfig, list[str]] = {}
    for model in (CLASSIFIER_MODEL, ZEROSHOT_MODEL):
        configs.setdefault(PreprocessConfig.from_parameters(config_parameters(repo / model / "config.pbtxt")), []).append(model)
    images = {"random_12bit": np.random.default_rng(0).integers(0, 4096, RADIOGRAPH_SHAPE, dtype=np.uint16),
              **{p.name: p.pixels for p in payloads}}

    def timed(image: np.ndarray, config: PreprocessConfig) -> dict[str, Any]:
        times = []
        for _ in range(repeats + 1):
            began = time.perf_counter()
            prepare_square(image, config)
            times.append((time.perf_counter() - began) * 1000.0)
        return {"median_ms": round(float(np.median(times[1:])), 3), "min_ms": round(min(times[1:]), 3)}

    return {"function": "cxrlt.contract.preprocessing.prepare_square", "repetitions": repeats, "configs": [
        {"models": models, "size": config.size, "mode": config.mode,
         "images": [{"image": name, "shape": list(image.shape), **timed(image, config)} for name, image in images.items()]}
        for config, models in configs.items()]}


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the sweep; return the figures (JSON-ready)."""
    import onnxruntime

    from cxrlt.contract.manifest import read_manifest

    manifest, payloads = read_manifest(config.repo), load_payloads(config.image_set)
    log("timing preprocessing")
    preprocessing = preprocessing_timings(config.repo, payloads, config.preprocessing_repeats)
    with contextlib.ExitStack() as stack:
        url, metrics_url, pid = stack.enter_context(target_server(config.repo, config.url, config.server_log, log=log))
        budget = server_thread_budget(url, list(manifest["models"]))
        served_networks = {n: m.get("execution_provider") for n, m in budget["models"].items() if n not in MODELS}
        threads = config.threads if config.threads is not None else budget["network_intra_op_threads"]
        raw_pool = config.raw_pool or max(1, budget["network_compute_threads_total"] // max(1, threads))
        preferences = set(served_networks.values())  # the networks' provider when they agree, else "auto"
        providers = config.raw_providers or (preferences.pop() if len(preferences) == 1 and None not in preferences else "auto")
        log(f"loading onnxruntime sessions (intra-op threads {threads}, pool {raw_pool}, providers {providers})")
        raw = stack.enter_context(contextlib.closing(RawSide(config.repo, config.model, threads, raw_pool, providers)))
        levels = config.concurrency or default_levels(budget["models"][config.model])
        send_size = config.send_size
        if send_size == SEND_SIZE_SERVED:  # the number of pixels cxrlt.client reads from the served configs
            from cxrlt.client import CxrltClient

            with CxrltClient(url, model=config.model, send_size=send_size) as client:
                send_size = client.model_info().input_size
        served = stack.enter_context(contextlib.closing(Served(url, config.model, config.send_hints,
                                                               shared_memory=config.shared_memory, send_size=send_size)))
        served.ensure_clients(max(levels))
        # Warm both sides on every image (creates all raw sessions single-threaded) and compare outputs.
        parity = max(float(np.max(np.abs(raw(0, p) - served(0, p)))) for p in payloads)
        server_pid = pid if config.url is None else None  # --url: the server's processes are not ours to measure
        sweep = _sweep(config, levels, payloads, {"raw": raw, "served": served}, config.metrics_url or metrics_url, server_pid, log)
        raw_json = {"pool_threads": raw_pool, "intra_op_threads_per_session": threads,
                    "compute_threads_total": raw_pool * max(1, threads), "sessions": len(raw.networks),
                    "workers": "= concurrency (threads running the pipeline code; its network calls run on the pool)"}
        providers_json = {"available": onnxruntime.get_available_providers(), "raw_preference": providers,
                          "raw_sessions": raw.session_providers(), "served_configured": served_networks}
    return {
        "model": config.model, "repository": str(config.repo), "profile": manifest.get("profile"),
        "url": config.url or "embedded (started by cxrlt bench)", "images": images_json(payloads, config.send_hints),
        "requests_per_point": config.requests, "admitted_concurrency": budget["models"][config.model]["max_queue_size"] or None,
        "rounds": config.rounds, "thread_budget": {"served": budget, "raw": raw_json},
        "execution_providers": providers_json, "preprocessing_ms": preprocessing,
        "image_transport": "system shared memory" if config.shared_memory else "gRPC message", "send_size": send_size,
        "parity_max_abs_diff": parity, "sweep": sweep, **_best(sweep),
    }


def _sweep(config: BenchConfig, levels: Sequence[int], payloads: Sequence[Payload], sides: dict[str, Callable],
           metrics_url: str | None, server_pid: int | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every round over every level, both sides back to back (which goes first alternates)."""
    from loadtest.metrics import add, diff, try_scrape

    measured: dict[tuple[int, str], list[Measurement]] = {(c, s): [] for c in levels for s in SIDES}
    cpu = {(c, s): np.zeros(2) for c in levels for s in SIDES}  # [this process s, server s]
    deltas: dict[int, Any] = dict.fromkeys(levels)
    orders: dict[int, list[list[str]]] = {c: [] for c in levels}
    for round_index in range(config.rounds):
        for index, concurrency in enumerate(levels):
            warmup = config.warmup if config.warmup is not None else max(concurrency, len(payloads))
            total = max(config.requests, concurrency)
            orders[concurrency].append(list(SIDES if (index + round_index) % 2 == 0 else SIDES[::-1]))
            for side in orders[concurrency][-1]:
                if warmup:
                    drive(sides[side], payloads, concurrency, warmup)
                before = try_scrape(metrics_url)[0] if side == "served" else None
                log(f"round {round_index + 1}/{config.rounds}, concurrency {concurrency}: {side}, {total} requests")
                cpu_before = cpu_sample(server_pid)
                measured[concurrency, side].append(drive(sides[side], payloads, concurrency, total))
                cpu[concurrency, side] += [b - a if a is not None else math.nan
                                           for a, b in zip(cpu_before, cpu_sample(server_pid))]
                if before is not None and (after := try_scrape(metrics_url, before, {config.model: total})[0]) is not None:
                    deltas[concurrency] = add(deltas[concurrency], diff(before, after))
    return [_row(config.model, c, orders[c], {s: measured[c, s] for s in SIDES}, {s: cpu[c, s] for s in SIDES}, deltas[c])
            for c in levels]


def _row(model: str, concurrency: int, orders: list[list[str]], measured: dict[str, list[Measurement]],
         cpu: dict[str, np.ndarray], delta: Any) -> dict[str, Any]:
    from loadtest.metrics import member_calls_per_image, per_model

    row: dict[str, Any] = {"concurrency": concurrency, "order": orders[0], "orders": orders}
    for side in SIDES:
        runs = measured[side]
        pooled = Measurement(concurrency, sum(m.requests for m in runs), sum(m.wall_s for m in runs),
                             [x for m in runs for x in m.latencies_ms])
        own, server = (None if math.isnan(s) else round(1000 * s / pooled.requests, 3) for s in cpu[side])
        row[side] = {**pooled.to_json(), "cpu_ms_per_image": {"this_process": own, "server": server}}
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
    best = {side: max(sweep, key=lambda r: r[side]["images_per_s"]) for side in SIDES}
    first, served = min(sweep, key=lambda r: r["concurrency"]), best["served"]["served"]
    return {
        "best": {"raw": {"concurrency": best["raw"]["concurrency"], "images_per_s": best["raw"]["raw"]["images_per_s"]},
                 "served": {"concurrency": best["served"]["concurrency"], "images_per_s": served["images_per_s"],
                            "member_requests_per_image": served.get("member_requests_per_image"),
                            "member_executions_per_image": served.get("member_executions_per_image")},
                 "ratio": round(served["images_per_s"] / best["raw"]["raw"]["images_per_s"], 4)},
        "overhead_per_image_ms": {"concurrency": first["concurrency"], **{
            key: round(first["served"][f"{key}_ms"] - first["raw"][f"{key}_ms"], 3) for key in ("p50", "mean")}},
    }


def plot(report: dict[str, Any], path: Path) -> Path:
    levels, sweep = [r["concurrency"] for r in report["sweep"]], report["sweep"]
    fig, axes = subplots(1, 2, figsize=(11, 4.2))
    for side, color, label in (("raw", "tab:blue", "raw (onnxruntime in process)"), ("served", "tab:orange", "served (Triton, gRPC)")):
        axes[0].plot(levels, [r[side]["images_per_s"] for r in sweep], "o-", color=color, label=label)
        for q, style in (("p50", "o-"), ("p95", "s--")):
            axes[1].plot(levels, [r[side][f"{q}_ms"] for r in sweep], style, color=color, label=f"{side} {q}")
    for ax, title, ylabel in zip(axes, ("throughput", "latency"), ("images/s", "ms per image")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set(xlabel="concurrency", ylabel=ylabel, title=title)
    return save_figure(fig, path, f"{report['model']} ({report['profile']} profile): served/raw at best = "
                                  f"{report['best']['ratio']:.2f}", axes)


def summary_table(report: dict[str, Any]):
    return table(f"{report['model']}: raw (onnxruntime in process) vs served (Triton, gRPC)",
                 ("conc", "raw img/s", "raw p50", "raw p95", "srv img/s", "srv p50", "srv p95", "srv/raw", "member req/img"),
                 [(str(r["concurrency"]), *(f"{r[side][key]:{spec}}" for side in SIDES for key, spec in
                                            (("images_per_s", ".2f"), ("p50_ms", ".1f"), ("p95_ms", ".1f"))),
                   fmt(r["ratio"], ".2f"), fmt(r["served"].get("member_requests_per_image"), ".2f")) for r in report["sweep"]],
                 "img/s: images per second; p50/p95: latency per image in ms; member req/img: "
                 "network requests (BLS calls) per image, from Triton's statistics")


# --- the GPU run -----------------------------------------------------------------------------


def gpu_model_figures(bench: dict[str, Any]) -> dict[str, Any]:
    """One model's served (and raw) latency at concurrency 1 (the sweep's first level) and throughput at saturation."""
    from loadtest.driver import SATURATION_GROWTH, saturation_index

    first, best = bench["sweep"][0], bench["best"]
    sides = {side: {"p50_ms_at_concurrency_1": first[side]["p50_ms"], "p95_ms_at_concurrency_1": first[side]["p95_ms"],
                    "images_per_s_at_saturation": best[side]["images_per_s"]} for side in SIDES}
    return {**sides["served"], "saturation_concurrency": best["served"]["concurrency"],
            # False: throughput still grew at the highest level; saturation lies above the sweep.
            "plateau_reached": saturation_index([r["served"]["images_per_s"] for r in bench["sweep"]], SATURATION_GROWTH)[1],
            "member_requests_per_image": best["served"].get("member_requests_per_image"), "raw": sides["raw"],
            "parity_max_abs_diff": bench["parity_max_abs_diff"]}


def judge(models: dict[str, Any], provider: str | None, profile: str) -> list[dict[str, Any]]:
    """Each target with its measured value; judged only for the paper profile on CUDA."""
    return [{"model": model, "figure": figure, "target": f"{comparison} {bound:g}", "measured": models[model][figure],
             "met": (models[model][figure] <= bound if comparison == "<=" else models[model][figure] >= bound)
             if profile == "paper" and provider == CUDA else None} for model, figure, comparison, bound in TARGETS]


def gpu_memory(server_pids: set[int] | None) -> dict[str, Any] | None:
    """Memory of every GPU, and what the server's processes hold on them (None: no nvidia-smi)."""
    def query(what: str) -> list[list[str]] | None:
        try:
            text = subprocess.run(["nvidia-smi", what, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return [[field.strip() for field in line.split(",")] for line in text.splitlines() if line.strip()]

    def mib(text: str) -> float | None:
        return float(text) if text.replace(".", "", 1).isdigit() else None  # "[N/A]" under MIG, "[Not Supported]"

    if (gpus := query("--query-gpu=index,name,memory.used,memory.total")) is None:
        return None
    apps = [(int(pid), mib(used)) for pid, used in query("--query-compute-apps=pid,used_memory") or [] if pid.isdigit()]
    ours = [used or 0.0 for pid, used in apps if server_pids is not None and pid in server_pids]
    return {"gpus": [{"index": int(index), "name": name, "memory_used_mib": mib(used), "memory_total_mib": mib(total)}
                     for index, name, used, total in gpus],
            "compute_apps": [{"pid": pid, "used_memory_mib": used} for pid, used in apps],
            # In a container nvidia-smi may show the host's process ids: then none match and this is 0.
            "server_processes_on_gpu": len(ours) if server_pids is not None else None,
            "server_memory_mib": sum(ours) if server_pids is not None else None}


def build_gpu_repository(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """The repository, its entry queues holding the sweep's highest level (else it meets "Exceeds maximum queue
    size" before saturation); a GPU run insists on CUDA, so a network that cannot get it fails to load."""
    from cxrlt.contract.profiles import get_profile
    from exporters.build_repo import BuildOptions, build_repository

    repo = args.out / "repository"
    log(f"building the {args.profile} repository into {repo}")
    queue = max(get_profile(args.profile).queue.max_queue_size, max(args.concurrency))
    build_repository(repo, BuildOptions(profile=args.profile, checkpoints=args.checkpoints, allow_random=args.checkpoints is None,
                                        max_queue_size=queue, execution_provider="auto" if args.dry_run else "cuda"), on_step=log)
    return repo


def gpu_run(args: argparse.Namespace, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Build (or take --repo) and serve the repository, bench each public model, load-test them; write the report."""
    import onnxruntime

    from loadtest.metrics import default_metrics_url
    from loadtest.runner import LoadTestConfig, run_loadtest

    if not args.dry_run and CUDA not in onnxruntime.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDA execution provider: install onnxruntime-gpu "
                           "(loadtest/gpu_bench.sh does), or rehearse on the CPU with --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    repo, memory_before, benches, files = args.repo or build_gpu_repository(args, log), gpu_memory(None), {}, {}
    with target_server(repo, args.url, args.out / "tritonserver.log", log=log) as (url, metrics_url, pid):
        server_pids = set(process_tree(pid)) if args.url is None else None
        metrics_url = args.metrics_url or metrics_url or default_metrics_url(url)
        entries = server_thread_budget(url, [])["models"]
        for model in MODELS:  # a repository given with --repo may bound its queues below the sweep
            queue = entries[model]["max_queue_size"]
            levels = tuple(c for c in args.concurrency if not queue or c <= queue)
            log(f"bench {model} at concurrency {', '.join(map(str, levels))}")
            benches[model] = run_bench(BenchConfig(
                repo=repo, url=url, metrics_url=metrics_url, concurrency=levels, requests=args.requests, model=model,
                image_set=args.image_set, preprocessing_repeats=args.preprocessing_repeats), log)
            files[f"bench_{model}"] = str(write_json(benches[model], args.out / f"bench_{model}.json"))
        log(f"load test: {args.users} users for {args.duration_s:g} s")
        loadtest = run_loadtest(LoadTestConfig(url=url, users=args.users, spawn_rate=float(args.users), duration_s=args.duration_s,
                                               out=args.out / "loadtest", image_set=args.image_set, metrics_url=metrics_url))
        memory = gpu_memory(server_pids)  # with every session loaded and warm
    return _gpu_report(args, repo, benches, loadtest, (memory_before, memory), files)


def _gpu_report(args: argparse.Namespace, repo: Path, benches: dict[str, Any], loadtest: dict[str, Any],
                memory: tuple[Any, Any], files: dict[str, str]) -> dict[str, Any]:
    models = {model: gpu_model_figures(bench) for model, bench in benches.items()}
    providers = benches[FINDINGS_MODEL]["execution_providers"]  # its raw side holds every network's session
    first = {sessions[0] for sessions in providers["raw_sessions"].values() if sessions}
    provider = {"provider": first.pop() if len(first) == 1 else None,  # what every network session got; None: they differ
                **providers, "server_gpu_memory_mib": memory[1]["server_memory_mib"] if memory[1] else None}
    report = {
        "dry_run": args.dry_run, "profile": benches[CLASSIFIER_MODEL]["profile"], "repository": str(repo),
        "url": args.url or "embedded (started by this run)", "image_set": args.image_set,
        "sweep": {"concurrency": {model: [row["concurrency"] for row in bench["sweep"]] for model, bench in benches.items()},
                  "requests_per_point": args.requests},
        "models": models, "execution_provider": provider,
        "gpu_memory": {"before_server": memory[0], "loaded": memory[1]} if memory[1] is not None else None,
        "preprocessing_ms": benches[CLASSIFIER_MODEL]["preprocessing_ms"],
        "loadtest": {"users": args.users, "duration_s": args.duration_s, "passed": loadtest["passed"],
                     "models": {model: {key: figures.get(key) for key in ("requests", "failures", "rps", "p50_ms", "p95_ms")}
                                for model, figures in loadtest["locust"]["models"].items()}},
        "targets": judge(models, provider["provider"], args.profile),
        "files": {"report": str(args.out / "gpu_bench.json"), "loadtest": loadtest["files"]["report"], **files},
    }
    write_json(report, args.out / "gpu_bench.json")
    return report


def gpu_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest/gpu_bench.sh", description="The GPU run: bench each public model, "
                                     "load-test them, write gpu_bench.json")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("CXRLT_GPU_DRY_RUN") == "1",
                        help="tiny profile on the CPU, few requests (also CXRLT_GPU_DRY_RUN=1)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_bench"), help="output folder (default runs/gpu_bench)")
    for flag, kind, text in (
            ("--repo", Path, "a repository built already (default: build one into OUT/repository)"),
            ("--checkpoints", Path, "checkpoints to build from (default: seeded random weights)"),
            ("--url", str, "gRPC host:port of a server already serving --repo (default: start one)"),
            ("--metrics-url", str, "its metrics endpoint (default: port 8002 on the --url host)"),
            ("--concurrency", lambda text: tuple(int(level) for level in text.split(",")),
             "comma-separated bench levels (1 is always added)"),
            ("--requests", int, "measured bench requests per side and level"), ("--users", int, "load-test users"),
            ("--duration-s", float, "load-test duration")):
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--image-set", choices=IMAGE_SETS, default="all", help="the images sent (default all)")
    args = parser.parse_args(argv)
    if args.url is not None and args.repo is None:
        parser.error("--url needs --repo: the repository that server serves, for the in-process side")
    dry = {"profile": "tiny", "concurrency": (1, 2), "requests": 4, "users": 2, "duration_s": 3.0, "preprocessing_repeats": 3}
    full = {"profile": "paper", "concurrency": (1, 4, 16, 64), "requests": 256, "users": 32, "duration_s": 60.0,
            "preprocessing_repeats": 20}
    for key, value in (dry if args.dry_run else full).items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    args.concurrency = tuple(sorted({1, *args.concurrency}))  # latency at concurrency 1 is a reported figure
    return args


def main(argv: list[str] | None = None) -> int:
    args = gpu_arguments(argv)
    try:
        report = gpu_run(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as exc:  # no CUDA provider, a server that did not start
        print(f"gpu_bench: error: {exc}", file=sys.stderr)
        return 1
    provider = report["execution_provider"]["provider"]
    for model, figures in report["models"].items():
        print(f"{model}: p50 {figures['p50_ms_at_concurrency_1']:.1f} ms / p95 {figures['p95_ms_at_concurrency_1']:.1f} ms at "
              f"concurrency 1; {figures['images_per_s_at_saturation']:.1f} images/s at concurrency {figures['saturation_concurrency']}"
              + ("" if figures["plateau_reached"] else " (still growing at the highest level: raise --concurrency)"))
    for check in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not judged (paper profile on CUDA only)"}[check["met"]]
        print(f"target {check['model']} {check['figure']} {check['target']}: measured {check['measured']:.1f}, {verdict}")
    print(f"execution provider: {provider}; report: {report['files']['report']}")
    if not args.dry_run and provider != CUDA:
        print(f"error: the networks ran on {provider}, not {CUDA}: check the CUDA and cuDNN libraries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
