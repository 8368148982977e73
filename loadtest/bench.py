"""`cxrlt bench`: the served pipeline against the same pipeline run in process ("raw"), interleaved per
concurrency with the server's thread budget; and the GPU run behind `loadtest/gpu_bench.sh`, which benches
each public model and load-tests them (loadtest/README.md, "Benchmark" and "GPU run")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import timeit
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime
import pandas as pd
import tritonclient.grpc as grpcclient

from cxrlt.contract.manifest import read_manifest
from cxrlt.contract.model_config import config_parameters
from cxrlt.contract.preprocessing import PreprocessConfig, prepare_square
from cxrlt.contract.profiles import get_profile
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, SEND_SIZE_SERVED, ZEROSHOT_MODEL
from loadtest.kernel import (MODELS, Payload, Served, images_json, level_figures, load_payloads, measure_level, saturation_index,
                             saved_figure, target_server, write_json)
from loadtest.metrics import breakdown_json, member_calls_per_image, per_model
from loadtest.runner import LoadTestConfig, run_loadtest
from python_backends.in_process import LocalPipelines

DEFAULT_LEVELS = (1, 2, 4, 8, 16)
SIDES = ("raw", "served")
RADIOGRAPH_SHAPE = (1955, 1841)  # the real payload's detector matrix: the preprocessing's expensive case
CUDA = "CUDAExecutionProvider"
# (model, figure, comparison, bound): the GPU run's targets for the paper profile on an H100/H200-class GPU.
TARGETS = ((CLASSIFIER_MODEL, "p50_ms_at_concurrency_1", "<=", 15.0),
           (CLASSIFIER_MODEL, "images_per_s_at_saturation", ">=", 400.0),
           (ZEROSHOT_MODEL, "images_per_s_at_saturation", ">=", 2000.0))


class RawSide:
    """The served pipeline's code on onnxruntime in this process (torch-free), its network calls on a pool of `pool_threads`."""

    def __init__(self, repo: Path, model: str, threads: int, pool_threads: int | None = None, providers: str = "cpu") -> None:
        self.model, self.loops, self.lock = model, {}, threading.Lock()
        self.pipelines = LocalPipelines(repo, threads, providers, concurrent_calls=pool_threads or 0)

    def __call__(self, worker_id: int, payload: Payload) -> np.ndarray:
        with self.lock:  # one event loop per worker slot, reused across sweeps
            loop = self.loops.get(worker_id) or self.loops.setdefault(worker_id, asyncio.new_event_loop())
        return loop.run_until_complete(self.pipelines.probabilities(self.model, payload.pixels, payload.hint))

    def close(self) -> None:
        for loop in self.loops.values():
            loop.close()

    def session_providers(self) -> dict[str, list[str]]:
        """The execution providers each session got (onnxruntime falls back to CPU when CUDA fails to load)."""
        networks = self.pipelines.networks
        return {name: networks.runner(name).providers for name in sorted(networks.loaded())}


def server_thread_budget(url: str, repo_models: Sequence[str]) -> dict[str, Any]:
    """Instances and onnxruntime intra-op threads of every model, as the server has them loaded."""
    models: dict[str, dict[str, Any]] = {}
    with grpcclient.InferenceServerClient(url) as client:
        for name in dict.fromkeys([*MODELS, *repo_models]):
            config = client.get_model_config(name, as_json=True)["config"]
            params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
            entry = models[name] = {"instances": sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1,
                                    "max_batch_size": int(config.get("max_batch_size", 0))}
            if (batching := config.get("dynamic_batching")) is not None:
                entry["max_queue_delay_us"] = int(batching.get("max_queue_delay_microseconds", 0))
                entry["max_queue_size"] = int(batching.get("default_queue_policy", {}).get("max_queue_size", 0))
            if name not in MODELS:
                entry.update(intra_op_threads=int(params.get("intra_op_threads") or 0),
                             engine=params.get("engine", "onnxruntime"), execution_provider=params.get("execution_provider"))
            elif "member_execution" in params:
                entry["member_execution"] = params["member_execution"]
    networks = [m for n, m in models.items() if n not in MODELS]
    return {"models": models, "network_intra_op_threads": max((m["intra_op_threads"] for m in networks), default=1),
            "network_compute_threads_total": sum(m["instances"] * max(1, m["intra_op_threads"]) for m in networks),
            "bls_processes_total": sum(models[m]["instances"] for m in MODELS if m in models)}


def default_levels(entry: dict[str, Any]) -> tuple[int, ...]:
    """DEFAULT_LEVELS, the highest replaced by what the model surely admits at once (its bounded queue) when
    lower: Triton frees an instance a moment after the response, so a closed loop's next requests may all queue."""
    admitted = entry["max_queue_size"]
    if not admitted or admitted >= DEFAULT_LEVELS[-1]:
        return DEFAULT_LEVELS
    return (*(level for level in DEFAULT_LEVELS if level < admitted), admitted)


def preprocessing_timings(repo: Path, payloads: Sequence[Payload], repeats: int = 20) -> dict[str, Any]:
    """prepare_square per distinct preprocessing of the pipelines, on a seeded 12-bit random radiograph and each payload."""
    configs: dict[PreprocessConfig, list[str]] = {}
    for model in (CLASSIFIER_MODEL, ZEROSHOT_MODEL):
        configs.setdefault(PreprocessConfig.from_parameters(config_parameters(repo / model / "config.pbtxt")), []).append(model)
    images = {"random_12bit": np.random.default_rng(0).integers(0, 4096, RADIOGRAPH_SHAPE, dtype=np.uint16),
              **{p.name: p.pixels for p in payloads}}

    def timed(image: np.ndarray, config: PreprocessConfig) -> dict[str, Any]:
        times = 1000.0 * np.array(timeit.repeat(lambda: prepare_square(image, config), repeat=repeats + 1, number=1)[1:])
        return {"median_ms": round(float(np.median(times)), 3), "min_ms": round(float(times.min()), 3)}

    return {"function": "cxrlt.contract.preprocessing.prepare_square", "repetitions": repeats, "configs": [
        {"models": models, "size": config.size, "mode": config.mode,
         "images": [{"image": name, "shape": list(image.shape), **timed(image, config)} for name, image in images.items()]}
        for config, models in configs.items()]}


def run_bench(args: argparse.Namespace, server_log: Path | None = None, preprocessing_repeats: int = 20,
              log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the sweep with `cxrlt bench`'s options; return the figures (JSON-ready)."""
    manifest, payloads = read_manifest(args.repo), load_payloads(args.image_set)
    log("timing preprocessing")
    preprocessing = preprocessing_timings(args.repo, payloads, preprocessing_repeats)
    with contextlib.ExitStack() as stack:
        url, metrics_url, pid = stack.enter_context(target_server(args.repo, args.url, server_log, log=log))
        budget = server_thread_budget(url, list(manifest["models"]))
        served_networks = {n: m.get("execution_provider") for n, m in budget["models"].items() if n not in MODELS}
        threads = args.threads if args.threads is not None else budget["network_intra_op_threads"]
        raw_pool = args.raw_pool or max(1, budget["network_compute_threads_total"] // max(1, threads))
        preferences = set(served_networks.values())  # the networks' provider when they agree, else "auto"
        providers = args.raw_providers or (preferences.pop() if len(preferences) == 1 and None not in preferences else "auto")
        log(f"loading onnxruntime sessions (intra-op threads {threads}, pool {raw_pool}, providers {providers})")
        raw = stack.enter_context(contextlib.closing(RawSide(args.repo, args.model, threads, raw_pool, providers)))
        levels = args.concurrency or default_levels(budget["models"][args.model])
        served = stack.enter_context(contextlib.closing(Served(url, args.model, args.hints,
                                                               shared_memory=args.shared_memory, send_size=args.send_size)))
        served.ensure_clients(max(levels))
        # "served": the number of pixels cxrlt.client reads from the served configs
        send_size = served.clients[0].model_info().input_size if args.send_size == SEND_SIZE_SERVED else args.send_size
        # Warm both sides on every image (creates all raw sessions single-threaded) and compare outputs.
        parity = max(float(np.max(np.abs(raw(0, p) - served(0, p)))) for p in payloads)
        server_pid = pid if args.url is None else None  # --url: the server's processes are not ours to measure
        sweep = _sweep(args, levels, payloads, {"raw": raw, "served": served}, args.metrics_url or metrics_url, server_pid, log)
        raw_json = {"pool_threads": raw_pool, "intra_op_threads_per_session": threads,
                    "compute_threads_total": raw_pool * max(1, threads), "sessions": len(raw.pipelines.networks.loaded()),
                    "workers": "= concurrency (threads running the pipeline code; its network calls run on the pool)"}
        providers_json = {"available": onnxruntime.get_available_providers(), "raw_preference": providers,
                          "raw_sessions": raw.session_providers(), "served_configured": served_networks}
    return {"model": args.model, "repository": str(args.repo), "profile": manifest.get("profile"),
            "url": args.url or "embedded (started by cxrlt bench)", "images": images_json(payloads, args.hints),
            "requests_per_point": args.requests, "admitted_concurrency": budget["models"][args.model]["max_queue_size"] or None,
            "rounds": args.rounds, "thread_budget": {"served": budget, "raw": raw_json}, "execution_providers": providers_json,
            "preprocessing_ms": preprocessing,
            "image_transport": "system shared memory" if args.shared_memory else "gRPC message", "send_size": send_size,
            "parity_max_abs_diff": parity, "sweep": sweep, **_best(sweep)}


def _sweep(args: argparse.Namespace, levels: Sequence[int], payloads: Sequence[Payload], sides: dict[str, Callable],
           metrics_url: str | None, server_pid: int | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every round over every level, both sides back to back (which goes first alternates)."""
    runs = {c: {"orders": [], **{side: [] for side in SIDES}} for c in levels}
    for round_index in range(args.rounds):
        for index, concurrency in enumerate(levels):
            warmup = args.warmup if args.warmup is not None else max(concurrency, len(payloads))
            total = max(args.requests, concurrency)
            runs[concurrency]["orders"].append(order := list(SIDES if (index + round_index) % 2 == 0 else SIDES[::-1]))
            for side in order:
                log(f"round {round_index + 1}/{args.rounds}, concurrency {concurrency}: {side}, {total} requests")
                runs[concurrency][side].append(measure_level(sides[side], payloads, concurrency, total, warmup, server_pid,
                                                             metrics_url if side == "served" else None, args.model))
    return [_row(args.model, c, runs[c]) for c in levels]


def _row(model: str, concurrency: int, runs: dict[str, list]) -> dict[str, Any]:
    """One level's figures per side, its rounds pooled (Triton's counters summed), the served/raw ratio (pooled and per round)."""
    row: dict[str, Any] = {"concurrency": concurrency, "order": runs["orders"][0], "orders": runs["orders"],
                           **{side: level_figures(runs[side]) for side in SIDES}}
    if deltas := [r["triton"] for r in runs["served"] if r["triton"] is not None]:
        delta = pd.concat(deltas).groupby(level=0).sum()
        row["served"].update(triton=breakdown_json(delta), **member_calls_per_image(per_model(delta), model))
    raw_rate = row["raw"]["images_per_s"]
    row["ratio"] = round(row["served"]["images_per_s"] / raw_rate, 4) if raw_rate else None
    rates = {side: [len(r["latencies_ms"]) / r["wall_s"] for r in runs[side]] for side in SIDES}
    row["ratio_per_round"] = [round(s / r, 4) for r, s in zip(rates["raw"], rates["served"]) if r]
    return row


def _best(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """Each side's best level and the served/raw ratio there; Triton's overhead per image at the lowest level."""
    raw, served = (max(sweep, key=lambda r: r[side]["images_per_s"]) for side in SIDES)
    first, served_keys = sweep[0], ("images_per_s", "member_requests_per_image", "member_executions_per_image")
    return {"best": {"raw": {"concurrency": raw["concurrency"], "images_per_s": raw["raw"]["images_per_s"]},
                     "served": {"concurrency": served["concurrency"], **{key: served["served"].get(key) for key in served_keys}},
                     "ratio": round(served["served"]["images_per_s"] / raw["raw"]["images_per_s"], 4)},
            "overhead_per_image_ms": {"concurrency": first["concurrency"], **{
                key: round(first["served"][f"{key}_ms"] - first["raw"][f"{key}_ms"], 3) for key in ("p50", "mean")}}}


def comparison_row(report: dict[str, Any]) -> dict[str, Any]:
    """One repository's row of `cxrlt bench --compare`: its provider and precision, the served figures, CPU per image."""
    execution = read_manifest(report["repository"]).get("execution") or {"execution_provider": "auto", "precision": "fp32"}
    first, best = report["sweep"][0], report["best"]["served"]
    cpu = next(r for r in report["sweep"] if r["concurrency"] == best["concurrency"])["served"]["cpu"]
    runtime = sorted({sessions[0] for sessions in report["execution_providers"]["raw_sessions"].values() if sessions})
    cpu_ms = None if cpu["server_ms_per_image"] is None else round(cpu["client_ms_per_image"] + cpu["server_ms_per_image"], 1)
    return {"repository": report["repository"], "execution_provider": execution["execution_provider"],
            "precision": execution["precision"], "runtime": runtime, "images_per_s": best["images_per_s"],
            "best_concurrency": best["concurrency"], "p50_ms": first["served"]["p50_ms"], "p95_ms": first["served"]["p95_ms"],
            "latency_concurrency": first["concurrency"], "cpu_ms_per_image": cpu_ms,
            "raw_images_per_s": report["best"]["raw"]["images_per_s"],
            "served_vs_raw_max_abs_diff": report["parity_max_abs_diff"]}


def run_comparison(args: argparse.Namespace, repositories: Sequence[Path], out: Path,
                   log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """`cxrlt bench --compare`: the sweep on each repository in turn (one server at a time: they never share the cores)."""
    rows, paths = [], []
    for index, repo in enumerate(repositories):
        log(f"[{index + 1}/{len(repositories)}] {repo}")
        one = argparse.Namespace(**{**vars(args), "repo": Path(repo)})
        report = run_bench(one, out / f"tritonserver-{index}.log", log=lambda message, i=index: log(f"[{i + 1}] {message}"))
        paths.append(str(write_json(report, out / f"bench-{index}.json")))
        rows.append(comparison_row(report))
    return {"model": args.model, "rows": rows, "reports": paths}


def plot(report: dict[str, Any], path: Path) -> Path:
    """Throughput and p50 / p95 latency per concurrency, raw and served."""
    sweep = pd.json_normalize(report["sweep"]).set_index("concurrency")
    title = (f"{report['model']} ({report['profile']} profile): raw (onnxruntime in process) vs served (Triton, gRPC), "
             f"served/raw at best = {report['best']['ratio']:.2f}")
    with saved_figure(path, title, 1, 2, (11, 4.2)) as (throughput, latency):
        sweep[[f"{side}.images_per_s" for side in SIDES]].plot(ax=throughput, style="o-", title="throughput", ylabel="images/s")
        sweep[[f"{side}.{q}_ms" for side in SIDES for q in ("p50", "p95")]].plot(ax=latency, style="o-", title="latency",
                                                                                  ylabel="ms per image")
        for ax in (throughput, latency):
            ax.set_xscale("log", base=2)
            ax.set(xticks=sweep.index, xticklabels=sweep.index, ylim=(0, None))
    return path


def gpu_model_figures(bench: dict[str, Any]) -> dict[str, Any]:
    """One model's served (and raw) latency at concurrency 1 (the sweep's first level) and throughput at saturation."""
    first, best = bench["sweep"][0], bench["best"]
    sides = {side: {"p50_ms_at_concurrency_1": first[side]["p50_ms"], "p95_ms_at_concurrency_1": first[side]["p95_ms"],
                    "images_per_s_at_saturation": best[side]["images_per_s"]} for side in SIDES}
    return {**sides["served"], "saturation_concurrency": best["served"]["concurrency"],
            # False: throughput still grew at the highest level; saturation lies above the sweep.
            "plateau_reached": saturation_index([r["served"]["images_per_s"] for r in bench["sweep"]])[1],
            "member_requests_per_image": best["served"].get("member_requests_per_image"), "raw": sides["raw"],
            "parity_max_abs_diff": bench["parity_max_abs_diff"]}


def judge(models: dict[str, Any], provider: str | None, profile: str) -> list[dict[str, Any]]:
    """Each target with its measured value; judged only for the paper profile on CUDA."""
    return [{"model": model, "figure": figure, "target": f"{comparison} {bound:g}", "measured": models[model][figure],
             "met": (models[model][figure] <= bound if comparison == "<=" else models[model][figure] >= bound)
             if profile == "paper" and provider == CUDA else None} for model, figure, comparison, bound in TARGETS]


def build_gpu_repository(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """The repository, its entry queues holding the sweep's highest level (else it meets "Exceeds maximum queue
    size" before saturation); a GPU run insists on CUDA, so a network that cannot get it fails to load."""
    from exporters.build_repo import BuildOptions, build_repository  # the export extra: only when building

    repo = args.out / "repository"
    log(f"building the {args.profile} repository into {repo}")
    queue = max(get_profile(args.profile).queue.max_queue_size, max(args.concurrency))
    build_repository(repo, BuildOptions(profile=args.profile, checkpoints=args.checkpoints, allow_random=args.checkpoints is None,
                                        max_queue_size=queue, execution_provider="auto" if args.dry_run else "cuda"), on_step=log)
    return repo


def gpu_run(args: argparse.Namespace, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Build (or take --repo) and serve the repository, bench each public model, load-test them; write the report."""
    if not args.dry_run and CUDA not in onnxruntime.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDA execution provider: install onnxruntime-gpu "
                           "(loadtest/gpu_bench.sh does), or rehearse on the CPU with --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    repo, benches, files = args.repo or build_gpu_repository(args, log), {}, {}
    with target_server(repo, args.url, args.out / "tritonserver.log", log=log) as (url, metrics_url, _):
        metrics_url = args.metrics_url or metrics_url
        entries = server_thread_budget(url, [])["models"]
        for model in MODELS:  # a repository given with --repo may bound its queues below the sweep
            queue = entries[model]["max_queue_size"]
            levels = tuple(c for c in args.concurrency if not queue or c <= queue)
            log(f"bench {model} at concurrency {', '.join(map(str, levels))}")
            options = argparse.Namespace(**{**vars(args.bench), "repo": repo, "url": url, "metrics_url": metrics_url,
                                            "model": model, "concurrency": levels, "requests": args.requests,
                                            "image_set": args.image_set})
            benches[model] = run_bench(options, preprocessing_repeats=args.preprocessing_repeats, log=log)
            files[f"bench_{model}"] = str(write_json(benches[model], args.out / f"bench_{model}.json"))
        log(f"load test: {args.users} users for {args.duration_s:g} s")
        loadtest = run_loadtest(LoadTestConfig(url=url, users=args.users, spawn_rate=float(args.users),
                                               duration_s=args.duration_s, out=args.out / "loadtest", image_set=args.image_set,
                                               metrics_url=metrics_url))
    models = {model: gpu_model_figures(bench) for model, bench in benches.items()}
    providers = benches[FINDINGS_MODEL]["execution_providers"]  # its raw side holds every network's session
    first = {sessions[0] for sessions in providers["raw_sessions"].values() if sessions}
    # provider: what every network session got; None when they differ
    provider = {"provider": first.pop() if len(first) == 1 else None, **providers}
    report = {
        "dry_run": args.dry_run, "profile": benches[CLASSIFIER_MODEL]["profile"], "repository": str(repo),
        "url": args.url or "embedded (started by this run)", "image_set": args.image_set,
        "sweep": {"concurrency": {model: [row["concurrency"] for row in bench["sweep"]] for model, bench in benches.items()},
                  "requests_per_point": args.requests},
        "models": models, "execution_provider": provider, "preprocessing_ms": benches[CLASSIFIER_MODEL]["preprocessing_ms"],
        "loadtest": {"users": args.users, "duration_s": args.duration_s, "passed": loadtest["passed"],
                     "models": {model: {key: figures.get(key) for key in ("requests", "failures", "rps", "p50_ms", "p95_ms")}
                                for model, figures in loadtest["locust"]["models"].items()}},
        "targets": judge(models, provider["provider"], args.profile),
        "files": {"report": str(args.out / "gpu_bench.json"), "loadtest": loadtest["files"]["report"], **files},
    }
    write_json(report, args.out / "gpu_bench.json")
    return report
