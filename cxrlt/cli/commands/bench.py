"""Benchmark a repository's pipeline served by Triton (gRPC) against the same pipeline run in
process with onnxruntime on the same ONNX files (same preprocessing, TTA and ensemble math),
at a sweep of concurrencies, both sides interleaved in one run; the in-process side runs an
image's network calls concurrently on a thread pool as large as the served networks' thread
budget. Prints images/s and p50/p95 latency per side, the served/raw ratio per concurrency and
at the best concurrency, network requests per image from Triton's statistics, Triton's
overhead per image at concurrency 1 and the preprocessing time per image; writes a JSON of the
figures and a PNG plot.

Starts the embedded tritonserver on the repository itself (free ports) unless --url is given.

Run as `python -m cxrlt.cli.commands.bench` (what loadtest/gpu_bench.sh does), it is the GPU run's
command line: bench each public model, load-test them, write gpu_bench.json (loadtest/README.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cxrlt.cli.options import (add_hints_argument, add_repo_argument, add_report_arguments, add_send_size_argument,
                               report_folder, write_report)
from cxrlt.contract.served import CLASSIFIER_MODEL, PIPELINE_MODELS


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8, not {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return tuple(sorted(set(levels)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cxrlt.cli.commands.loadtest import positive

    add_repo_argument(parser, "model repository built by `cxrlt build-repo`", required=True)
    parser.add_argument("--url", help="gRPC host:port of a server already serving --repo (default: start one)")
    parser.add_argument("--metrics-url", help="its metrics endpoint, for queue vs compute per concurrency (with --url)")
    parser.add_argument("--concurrency", type=_levels,
                        help="comma-separated levels (default 1,2,4,8,16, the highest lowered to what --model admits at "
                             "once, its instances plus max_queue_size: 1,2,4,8,12 for a default build)")
    parser.add_argument("--requests", type=positive(int), default=64, help="measured requests per side, concurrency and round (default 64)")
    parser.add_argument("--rounds", type=positive(int), default=1,
                        help="repeat the interleaved sweep this many times and pool the figures (default 1)")
    parser.add_argument("--warmup", type=int, help="untimed requests per side and concurrency (default max(concurrency, images))")
    parser.add_argument("--model", default=CLASSIFIER_MODEL, choices=PIPELINE_MODELS)
    parser.add_argument("--threads", type=int, help="raw side onnxruntime intra-op threads per session (default: the served networks')")
    parser.add_argument("--raw-pool", type=positive(int), help="raw side threads running network calls (default: the served networks' "
                                                     "compute threads, instances x intra-op threads summed, / --threads)")
    parser.add_argument("--raw-providers", choices=["auto", "cpu", "cuda", "openvino"],
                        help="raw side onnxruntime execution providers (default: the served networks' execution_provider)")
    parser.add_argument("--image-set", default="all", choices=["all", "real", "synthetic"],
                        help="all: the real CXR (1955x1841) and the synthetic frontal/lateral ones")
    add_hints_argument(parser, True, "send each image's projection hint (--no-hints: the router decides)")
    parser.add_argument("--shared-memory", action="store_true",
                        help="served side: pass each image through a system shared-memory region registered with the "
                             "server instead of inside the gRPC message (client and server on one host)")
    add_send_size_argument(parser, "the served side's images (each request pays for it)")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="REPO",
                        help="more repositories (e.g. the same weights built with other --execution-provider / "
                             "--precision) benched after --repo in the same run, one server at a time; prints their "
                             "served images/s, p50/p95 and CPU per image side by side (writes OUT/compare.json)")
    add_report_arguments(parser, "bench", "throughput/latency plot")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.commands.loadtest import print_wide, run_folder
    from cxrlt.cli.console import console
    from loadtest.bench import plot, run_bench

    if args.send_size is not None and args.shared_memory:
        raise ValueError("--send-size is for a remote server and --shared-memory for one on this host: choose one")
    out = report_folder(args, "bench")
    if args.compare:
        return run_compare(args, out)
    with run_folder(out), console.status("benchmarking") as status:
        report = run_bench(args, None if args.url else out / "tritonserver.log", log=lambda message: status.update(message))
        write_report(report, args, out, "bench", plot)

    print_wide(console, summary_table(report))
    best, overhead = report["best"], report["overhead_per_image_ms"]
    budget = report["thread_budget"]
    console.print(
        f"best raw: {best['raw']['images_per_s']:.2f} img/s at concurrency {best['raw']['concurrency']}; "
        f"best served: {best['served']['images_per_s']:.2f} img/s at concurrency {best['served']['concurrency']}; "
        f"served/raw at best = [bold]{best['ratio']:.2f}[/]"
    )
    console.print(
        f"Triton overhead per image at concurrency {overhead['concurrency']}: "
        f"{overhead['p50']:+.1f} ms (p50), {overhead['mean']:+.1f} ms (mean)"
    )
    console.print(
        f"threads: served networks {budget['served']['network_intra_op_threads']} intra-op x instances "
        f"({budget['served']['network_compute_threads_total']} in all, {budget['served']['bls_processes_total']} BLS processes); "
        f"raw pool of {budget['raw']['pool_threads']} threads x {budget['raw']['intra_op_threads_per_session']} intra-op per session "
        f"({budget['raw']['compute_threads_total']} in all), workers = concurrency"
    )
    if best["served"].get("member_requests_per_image") is not None:
        console.print(f"network requests per image at the best served concurrency: {best['served']['member_requests_per_image']:.2f} "
                      f"({best['served']['member_executions_per_image']:.2f} executions)")
    for entry in report["preprocessing_ms"]["configs"]:
        timings = ", ".join(f"{i['image']} {i['shape'][0]}x{i['shape'][1]} {i['median_ms']:.1f} ms (min {i['min_ms']:.1f})"
                            for i in entry["images"])
        console.print(f"preprocessing of {' and '.join(entry['models'])} ({entry['size']} px, {entry['mode']}; prepare_square "
                      f"in one thread, median): {timings}", markup=False)
    console.print(f"served images travel in the {report['image_transport']}"
                  + (f", downscaled by the client to {report['send_size']} px on the long side" if report.get("send_size") else ""))
    served_model = budget["served"]["models"].get(report["model"], {})
    if served_model.get("member_execution") == "in_process":
        console.print(f"{report['model']} runs its networks in process (member_execution in_process): no BLS hops")
    at = next(r for r in report["sweep"] if r["concurrency"] == best["served"]["concurrency"])
    raw_cpu, served_cpu = at["raw"]["cpu"], at["served"]["cpu"]
    if served_cpu["server_ms_per_image"] is not None:
        console.print(
            f"CPU per image at concurrency {at['concurrency']}: raw {raw_cpu['client_ms_per_image']:.1f} ms; served "
            f"{served_cpu['client_ms_per_image'] + served_cpu['server_ms_per_image']:.1f} ms "
            f"({served_cpu['client_ms_per_image']:.1f} gRPC client + {served_cpu['server_ms_per_image']:.1f} tritonserver "
            "and its Python stubs)"
        )
    if report["parity_max_abs_diff"] > 1e-3:
        console.print(f"[yellow]served and raw outputs differ by up to {report['parity_max_abs_diff']:.2e}: "
                      "is the server serving --repo?[/]")
    console.print(f"figures: {report['files']['json']}  plot: {report['files']['plot']}")
    return 0


def run_compare(args: argparse.Namespace, out: Path) -> int:
    from cxrlt.cli.commands.loadtest import print_wide, run_folder, table
    from cxrlt.cli.console import console
    from loadtest.bench import run_comparison
    from loadtest.kernel import fmt, write_json

    if args.url:
        raise ValueError("--compare starts a server per repository: it does not take --url")
    with run_folder(out), console.status("benchmarking") as status:
        result = run_comparison(args, [args.repo, *args.compare], out, log=lambda message: status.update(message))
        write_json(result, args.json or out / "compare.json")
    rows = [(r["repository"], r["execution_provider"], r["precision"], ", ".join(r["runtime"]), f"{r['images_per_s']:.3f}",
             str(r["best_concurrency"]), f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", fmt(r["cpu_ms_per_image"], ".0f"),
             f"{r['raw_images_per_s']:.3f}") for r in result["rows"]]
    print_wide(console, table(f"{args.model}: served, side by side", ("repository", "provider", "precision", "runtime",
                                                                      "img/s", "at conc", "p50 ms", "p95 ms", "CPU ms/img",
                                                                      "raw img/s"), rows,
                              "img/s: best served images per second over the levels; p50/p95: served latency per image at "
                              "the lowest level; CPU ms/img: gRPC client + tritonserver and its stubs, at the best level"))
    console.print(f"figures: {args.json or out / 'compare.json'} (each repository's report: {', '.join(result['reports'])})")
    return 0


def summary_table(report: dict[str, Any]) -> Any:
    from cxrlt.cli.commands.loadtest import table
    from loadtest.kernel import fmt

    return table(f"{report['model']}: raw (onnxruntime in process) vs served (Triton, gRPC)",
                 ("conc", "raw img/s", "raw p50", "raw p95", "srv img/s", "srv p50", "srv p95", "srv/raw", "member req/img"),
                 [(str(r["concurrency"]), *(f"{r[side][key]:{spec}}" for side in ("raw", "served") for key, spec in
                                            (("images_per_s", ".2f"), ("p50_ms", ".1f"), ("p95_ms", ".1f"))),
                   fmt(r["ratio"], ".2f"), fmt(r["served"].get("member_requests_per_image"), ".2f")) for r in report["sweep"]],
                 "img/s: images per second; p50/p95: latency per image in ms; member req/img: "
                 "network requests (BLS calls) per image, from Triton's statistics")


# --- the GPU run (loadtest/gpu_bench.sh) ----------------------------------------------------


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
            ("--concurrency", _levels, "comma-separated bench levels (1 is always added)"),
            ("--requests", int, "measured bench requests per side and level"), ("--users", int, "load-test users"),
            ("--duration-s", float, "load-test duration")):
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--image-set", choices=["all", "real", "synthetic"], default="all", help="the images sent (default all)")
    args = parser.parse_args(argv)
    if args.url is not None and args.repo is None:
        parser.error("--url needs --repo: the repository that server serves, for the in-process side")
    dry = {"profile": "tiny", "concurrency": (1, 2), "requests": 4, "users": 2, "duration_s": 3.0, "preprocessing_repeats": 3}
    full = {"profile": "paper", "concurrency": (1, 4, 16, 64), "requests": 256, "users": 32, "duration_s": 60.0,
            "preprocessing_repeats": 20}
    for key, value in (dry if args.dry_run else full).items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    args.concurrency = tuple(sorted({1, *args.concurrency}))  # latency at concurrency 1 is a reported figure
    bench = argparse.ArgumentParser()
    add_arguments(bench)
    args.bench = bench.parse_args(["--repo", "."])  # each model's bench: `cxrlt bench`'s defaults
    return args


def gpu_main(argv: list[str] | None = None) -> int:
    from loadtest.bench import CUDA, gpu_run

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
    sys.exit(gpu_main())
