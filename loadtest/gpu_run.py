"""The GPU run behind `loadtest/gpu_bench.sh`: builds (or takes --repo) and serves the repository, runs the
bench for each public model and a mixed locust load test, and writes gpu_bench.json with the figures the GPU
targets need, GPU memory and the execution provider the networks got (loadtest/README.md, "GPU run").
--dry-run (or CXRLT_GPU_DRY_RUN=1): the same steps on the CPU with the tiny profile and a few requests."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL
from loadtest.bench import BenchConfig, run_bench, server_thread_budget
from loadtest.kernel import IMAGE_SETS, MODELS, process_tree, target_server, write_json

CUDA = "CUDAExecutionProvider"
PLATEAU_GROWTH = 0.05  # the last level is a plateau when it is at most 5 % above the best lower one

# (model, figure, comparison, bound): the targets for the paper profile on an H100/H200-class GPU.
TARGETS = (
    (CLASSIFIER_MODEL, "p50_ms_at_concurrency_1", "<=", 15.0),
    (CLASSIFIER_MODEL, "images_per_s_at_saturation", ">=", 400.0),
    (ZEROSHOT_MODEL, "images_per_s_at_saturation", ">=", 2000.0),
)


@dataclasses.dataclass
class GpuRunConfig:
    out: Path
    dry_run: bool = False
    repo: Path | None = None  # None: build one into OUT/repository
    checkpoints: Path | None = None  # None: seeded random weights (speed does not depend on them)
    url: str | None = None  # None: start the embedded tritonserver
    metrics_url: str | None = None
    image_set: str = "all"
    profile: str = "paper"
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 256
    users: int = 32
    duration_s: float = 60.0
    preprocessing_repeats: int = 20

    def __post_init__(self) -> None:
        # Latency at concurrency 1 is a reported figure, so the sweep always has it.
        self.concurrency = tuple(sorted({1, *self.concurrency}))
        if self.url is not None and self.repo is None:
            raise ValueError("--url needs --repo: the repository that server serves, for the in-process side")
        if self.image_set not in IMAGE_SETS:
            raise ValueError(f"image set must be one of {IMAGE_SETS}, not {self.image_set!r}")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]" under MIG, "[Not Supported]"
        return None


def nvidia_smi(query: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-...=... --format=csv,noheader,nounits`, or None without it."""
    try:
        text = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[field.strip() for field in line.split(",")] for line in text.splitlines() if line.strip()]


def gpu_memory(server_pids: set[int] | None) -> dict[str, Any] | None:
    """Memory of every GPU, and what the server's processes hold on them (None: no nvidia-smi)."""
    gpus = nvidia_smi("--query-gpu=index,name,memory.used,memory.total")
    if gpus is None:
        return None
    apps = [(int(pid), _number(used)) for pid, used in (nvidia_smi("--query-compute-apps=pid,used_memory") or [])
            if pid.isdigit()]
    ours = [(pid, used) for pid, used in apps if server_pids is not None and pid in server_pids]
    return {
        "gpus": [{"index": int(index), "name": name, "memory_used_mib": _number(used), "memory_total_mib": _number(total)}
                 for index, name, used, total in gpus],
        "compute_apps": [{"pid": pid, "used_memory_mib": used} for pid, used in apps],
        # In a container nvidia-smi may show the host's process ids: then none match and this is 0.
        "server_processes_on_gpu": len(ours) if server_pids is not None else None,
        "server_memory_mib": sum(used or 0.0 for _, used in ours) if server_pids is not None else None,
    }


def model_figures(bench: dict[str, Any]) -> dict[str, Any]:
    """One model's served (and raw) latency at concurrency 1 and throughput at saturation."""
    from loadtest.driver import saturation_index

    first, best = next(row for row in bench["sweep"] if row["concurrency"] == 1), bench["best"]
    return {
        "p50_ms_at_concurrency_1": first["served"]["p50_ms"], "p95_ms_at_concurrency_1": first["served"]["p95_ms"],
        "images_per_s_at_saturation": best["served"]["images_per_s"], "saturation_concurrency": best["served"]["concurrency"],
        # False: throughput still grew at the highest level; saturation lies above the sweep.
        "plateau_reached": saturation_index([row["served"]["images_per_s"] for row in bench["sweep"]], PLATEAU_GROWTH)[1],
        "member_requests_per_image": best["served"].get("member_requests_per_image"),
        "raw": {"p50_ms_at_concurrency_1": first["raw"]["p50_ms"], "p95_ms_at_concurrency_1": first["raw"]["p95_ms"],
                "images_per_s_at_saturation": best["raw"]["images_per_s"]},
        "parity_max_abs_diff": bench["parity_max_abs_diff"],
    }


def judge(models: dict[str, Any], provider: str | None, profile: str) -> list[dict[str, Any]]:
    """Each target with its measured value; judged only for the paper profile on CUDA."""
    return [{"model": model, "figure": figure, "target": f"{comparison} {bound:g}", "measured": models[model][figure],
             "met": (models[model][figure] <= bound if comparison == "<=" else models[model][figure] >= bound)
             if profile == "paper" and provider == CUDA else None} for model, figure, comparison, bound in TARGETS]


def build(config: GpuRunConfig, log: Callable[[str], None]) -> Path:
    """The repository, its entry queues holding the sweep's highest level (else it meets "Exceeds maximum queue
    size" before saturation); a GPU run insists on CUDA, so a network that cannot get it fails to load."""
    from cxrlt.contract.profiles import get_profile
    from exporters.build_repo import BuildOptions, build_repository

    repo = config.out / "repository"
    log(f"building the {config.profile} repository into {repo}")
    queue = max(get_profile(config.profile).queue.max_queue_size, max(config.concurrency))
    build_repository(repo, BuildOptions(profile=config.profile, checkpoints=config.checkpoints, allow_random=config.checkpoints is None,
                                        max_queue_size=queue, execution_provider="auto" if config.dry_run else "cuda"), on_step=log)
    return repo


def run(config: GpuRunConfig, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run every step; write and return the report."""
    import onnxruntime

    from loadtest.metrics import default_metrics_url
    from loadtest.runner import LoadTestConfig, run_loadtest

    if not config.dry_run and CUDA not in onnxruntime.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDA execution provider: install onnxruntime-gpu "
                           "(loadtest/gpu_bench.sh does), or rehearse on the CPU with --dry-run")
    config.out.mkdir(parents=True, exist_ok=True)
    repo, memory_before, benches, files = config.repo or build(config, log), gpu_memory(None), {}, {}
    with target_server(repo, config.url, config.out / "tritonserver.log", log=log) as (url, metrics_url, pid):
        server_pids = set(process_tree(pid)) if config.url is None else None
        metrics_url = config.metrics_url or metrics_url or default_metrics_url(url)
        entries = server_thread_budget(url, [])["models"]
        for model in MODELS:  # a repository given with --repo may bound its queues below the sweep
            levels = tuple(c for c in config.concurrency if not entries[model]["max_queue_size"]
                           or c <= entries[model]["max_queue_size"])
            log(f"bench {model} at concurrency {', '.join(map(str, levels))}")
            benches[model] = run_bench(BenchConfig(
                repo=repo, url=url, metrics_url=metrics_url, concurrency=levels, requests=config.requests,
                model=model, image_set=config.image_set, preprocessing_repeats=config.preprocessing_repeats), log)
            files[f"bench_{model}"] = str(write_json(benches[model], config.out / f"bench_{model}.json"))
        log(f"load test: {config.users} users for {config.duration_s:g} s")
        loadtest = run_loadtest(LoadTestConfig(url=url, users=config.users, spawn_rate=float(config.users),
                                               duration_s=config.duration_s, out=config.out / "loadtest",
                                               image_set=config.image_set, metrics_url=metrics_url))
        memory = gpu_memory(server_pids)  # with every session loaded and warm
    models = {model: model_figures(bench) for model, bench in benches.items()}
    providers = benches[FINDINGS_MODEL]["execution_providers"]  # its raw side holds every network's session
    first = {sessions[0] for sessions in providers["raw_sessions"].values() if sessions}
    provider = {"provider": first.pop() if len(first) == 1 else None,  # what every network session got; None: they differ
                **providers, "server_gpu_memory_mib": memory["server_memory_mib"] if memory else None}
    report = {
        "dry_run": config.dry_run, "profile": benches[CLASSIFIER_MODEL]["profile"], "repository": str(repo),
        "url": config.url or "embedded (started by this run)", "image_set": config.image_set,
        "sweep": {"concurrency": {model: [row["concurrency"] for row in bench["sweep"]] for model, bench in benches.items()},
                  "requests_per_point": config.requests},
        "models": models, "execution_provider": provider,
        "gpu_memory": {"before_server": memory_before, "loaded": memory} if memory is not None else None,
        "preprocessing_ms": benches[CLASSIFIER_MODEL]["preprocessing_ms"],
        "loadtest": {"users": config.users, "duration_s": config.duration_s, "passed": loadtest["passed"],
                     "models": {model: {key: figures.get(key) for key in ("requests", "failures", "rps", "p50_ms", "p95_ms")}
                                for model, figures in loadtest["locust"]["models"].items()}},
        "targets": judge(models, provider["provider"], config.profile),
        "files": {"report": str(config.out / "gpu_bench.json"), "loadtest": loadtest["files"]["report"], **files},
    }
    write_json(report, config.out / "gpu_bench.json")
    return report


def parse_args(argv: list[str] | None) -> GpuRunConfig:
    parser = argparse.ArgumentParser(prog="loadtest/gpu_bench.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("CXRLT_GPU_DRY_RUN") == "1",
                        help="tiny profile on the CPU, few requests (also CXRLT_GPU_DRY_RUN=1)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_bench"), help="output folder (default runs/gpu_bench)")
    for flag, kind, text in (
            ("--repo", Path, "a repository built already (default: build one into OUT/repository)"),
            ("--checkpoints", Path, "checkpoints to build from (default: seeded random weights)"),
            ("--url", str, "gRPC host:port of a server already serving --repo (default: start one)"),
            ("--metrics-url", str, "its metrics endpoint (default: port 8002 on the --url host)"),
            ("--image-set", str, f"one of {', '.join(IMAGE_SETS)} (default all)"),
            ("--concurrency", lambda text: tuple(int(level) for level in text.split(",")),
             "comma-separated bench levels (1 is always added)"),
            ("--requests", int, "measured bench requests per side and level"), ("--users", int, "load-test users"),
            ("--duration-s", float, "load-test duration")):
        parser.add_argument(flag, type=kind, help=text)
    args = vars(parser.parse_args(argv))
    dry = {"profile": "tiny", "concurrency": (1, 2), "requests": 4, "users": 2, "duration_s": 3.0, "preprocessing_repeats": 3}
    return GpuRunConfig(**{**(dry if args["dry_run"] else {}), **{k: v for k, v in args.items() if v is not None}})


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        report = run(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as exc:  # bad options, no CUDA provider, a server that did not start
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
    if not config.dry_run and provider != CUDA:
        print(f"error: the networks ran on {provider}, not {CUDA}: check the CUDA and cuDNN libraries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
