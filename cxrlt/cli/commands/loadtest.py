"""Load-test a running Triton server with locust over gRPC (headless), break the server's time
down per model (queue vs compute, from Triton's Prometheus metrics), and check targets:
minimum requests/s, maximum p95 latency, zero failures. Exits 1 naming each missed target.

Targets and the load to apply can come from a profile file (--targets loadtest/profiles/tiny_cpu.yaml);
command-line options override it. Writes locust's CSV and HTML report and report.json to --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_hints_argument, add_option, add_tls_arguments, tls_options

DEFAULT_USERS = 2
DEFAULT_SPAWN_RATE = 2.0
DEFAULT_DURATION = "30s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint host:port")
    add_tls_arguments(parser)
    parser.add_argument("--users", type=int, help=f"concurrent locust users (default: profile, else {DEFAULT_USERS})")
    parser.add_argument("--spawn-rate", type=float, help=f"users started per second (default: profile, else {DEFAULT_SPAWN_RATE:g})")
    add_option(parser, "--duration-s", "--duration", dest="duration_s",
               help=f"run time: seconds or e.g. 2m, 1m30s (default: profile, else {DEFAULT_DURATION})")
    parser.add_argument("--targets", type=Path, metavar="FILE", help="profile YAML with targets (and load), e.g. loadtest/profiles/tiny_cpu.yaml")
    parser.add_argument("--min-rps", type=float, help="target: minimum aggregate requests/s")
    parser.add_argument("--max-p95-ms", type=float, help="target: maximum aggregate p95 latency in ms")
    parser.add_argument("--max-failures", type=int, help="target: failed requests allowed (default 0)")
    parser.add_argument("--metrics-url", help="Triton metrics endpoint (default http://<url host>:8002/metrics)")
    parser.add_argument("--no-metrics", action="store_true", help="do not scrape Triton's metrics")
    parser.add_argument("--out", type=Path, help="output directory for locust's files (default runs/loadtest-<time>)")
    parser.add_argument("--json", type=Path, help="report JSON (default OUT/report.json)")
    for model in ("classifier", "zeroshot", "findings"):
        parser.add_argument(f"--{model}-weight", type=int, help=f"task weight of cxr_{model} (default: profile, else 1; 0 leaves it out)")
    parser.add_argument("--image-set", choices=["all", "real", "synthetic"], help="images to send (default all: real CXR + synthetic frontal/lateral)")
    add_hints_argument(parser, True, "send each image's PROJECTION_HINT")
    add_option(parser, "--timeout-s", "--request-timeout", type=float, default=30.0, dest="timeout_s",
               help="seconds before a call counts as failed")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from cxrlt.cli.console import console
    from loadtest.kernel import run_folder
    from loadtest.metrics import default_metrics_url
    from loadtest.runner import (LoadTestConfig, Profile, Targets, load_profile, parse_duration, print_report, require_locust,
                                 run_loadtest)

    require_locust()
    profile = load_profile(args.targets) if args.targets else Profile(Targets(), {}, None)
    load = profile.load
    weights = {f"cxr_{m}": int(load.get("weights", {}).get(f"cxr_{m}", 1)) for m in ("classifier", "zeroshot", "findings")}
    for m in ("classifier", "zeroshot", "findings"):
        if getattr(args, f"{m}_weight") is not None:
            weights[f"cxr_{m}"] = getattr(args, f"{m}_weight")
    overrides = {k: v for k, v in {"min_rps": args.min_rps, "max_p95_ms": args.max_p95_ms,
                                    "max_failures": args.max_failures}.items() if v is not None}
    targets = dataclasses.replace(profile.targets, **overrides)
    metrics_url = None if args.no_metrics else (args.metrics_url or default_metrics_url(args.url))
    config = LoadTestConfig(
        url=args.url,
        users=args.users if args.users is not None else int(load.get("users", DEFAULT_USERS)),
        spawn_rate=args.spawn_rate if args.spawn_rate is not None else float(load.get("spawn_rate", DEFAULT_SPAWN_RATE)),
        duration_s=parse_duration(args.duration_s if args.duration_s is not None else load.get("duration_s", DEFAULT_DURATION)),
        out=args.out or Path("runs") / time.strftime("loadtest-%Y%m%d-%H%M%S"),
        weights=weights,
        image_set=args.image_set or load.get("image_set", "all"),
        send_hints=args.hints,
        request_timeout_s=args.timeout_s,
        report_path=args.json,
        metrics_url=metrics_url,
        tls=tls_options(args),
        targets=targets,
        profile=profile.source,
    )
    with run_folder(config.out), console.status(f"locust: {config.users} users for {config.duration_s:g} s against {config.url}"):
        report = run_loadtest(config)
    print_report(report, console)
    if not report["passed"]:
        console.print(f"[bold red]missed target(s): {', '.join(report['missed'])}[/]")
        return 1
    return 0
