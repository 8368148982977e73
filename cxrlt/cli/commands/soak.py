"""Soak a server: send N requests over gRPC (cxr_classifier, cxr_zeroshot and cxr_findings in
turn) and every K requests sample the server's whole process tree (tritonserver and its
Python-backend stubs): RSS, open file descriptors and the /dev/shm files it holds. Reports the
growth after warm-up as a percentage and as least-squares slopes per 1,000 requests, prints
PASS/MISS against the targets (RSS growth < 5 %; RSS not still growing: slope over the later
half < 1 MiB per 1,000 requests; no growth in fds or /dev/shm files; no failed request) and
exits 1 on a miss. Writes a JSON report and a PNG plot.

Against a running server: --url HOST:PORT --server-pid PID (loopback only: its processes are
read from this machine's /proc). With --repo DIR it starts the embedded tritonserver on free
ports itself and stops it at the end."""

from __future__ import annotations

import argparse

from cxrlt.cli.options import add_report_arguments, report_folder, write_report
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="gRPC host:port of a running server on this machine (with --server-pid)")
    parser.add_argument("--server-pid", type=int, help="PID of that tritonserver: its process tree is sampled")
    parser.add_argument("--repo", type=Path, help="model repository: start the embedded tritonserver on it instead (stopped at the end)")
    parser.add_argument("--requests", type=int, required=True, help="requests to send in all, warm-up included")
    parser.add_argument("--sample-every", type=int, default=100, metavar="K", help="sample the server every K requests (default 100)")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before growth is measured (default 1000)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--image-set", default="all", choices=["all", "real", "synthetic"],
                        help="all: the real CXR (1955x1841) and the synthetic frontal/lateral ones (default)")
    parser.add_argument("--no-hints", action="store_true", help="send no PROJECTION_HINT")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a call counts as failed (default 60)")
    parser.add_argument("--time-limit", type=float, default=3600.0,
                        help="stop sending after this many seconds; the run then misses 'completed' (default 3600)")
    parser.add_argument("--max-rss-growth-pct", type=float, default=5.0, help="target: RSS growth after warm-up in %% (default 5)")
    parser.add_argument("--max-rss-slope-mib", type=float, default=1.0,
                        help="target: RSS slope over the later half of the post-warm-up samples, in MiB per 1,000 "
                             "requests (default 1; a short run needs a larger bound, e.g. 50 for 2,000 requests)")
    add_report_arguments(parser, "soak", "plot")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.console import console
    from loadtest.metrics import print_wide
    from loadtest.soak import SoakConfig, Targets, plot, run_soak, summary_table

    out = report_folder(args, "soak")
    config = SoakConfig(
        requests=args.requests, url=args.url, server_pid=args.server_pid, repo=args.repo, sample_every=args.sample_every,
        warmup=args.warmup, concurrency=args.concurrency, image_set=args.image_set, send_hints=not args.no_hints,
        request_timeout_s=args.request_timeout, time_limit_s=args.time_limit,
        targets=Targets(max_rss_growth_pct=args.max_rss_growth_pct, max_rss_slope_mib_per_1000=args.max_rss_slope_mib),
        server_log=out / "tritonserver.log" if args.repo else None,
    )
    with console.status(f"soak: {config.requests} requests") as status:
        report = run_soak(config, log=lambda message: status.update(f"soak: {message}"))
    write_report(report, args, out, "soak", plot)

    print_wide(console, summary_table(report), width=140)
    machine = report["machine"]
    console.print(f"{report['requests_completed']} requests in {report['wall_s']:.0f} s ({report['requests_per_s']} req/s); "
                  f"load average before {machine['load_average_before']}, after {machine['load_average_after']} "
                  f"({machine['cpus']} CPUs)")
    for error, count in report["errors"].items():
        console.print(f"[red]{count} x {error}[/]")
    for check in report["checks"]:
        console.print(f"[{'green' if check['passed'] else 'bold red'}]{check['message']}[/]")
    console.print(f"report: {report['files']['json']}  plot: {report['files']['plot']}")
    if not report["passed"]:
        console.print(f"[bold red]missed target(s): {', '.join(report['missed'])}[/]")
        return 1
    return 0
