"""Overload test: find the saturation throughput of a model with a closed loop (concurrency
1, 2, 4, ... until throughput stops growing by more than 5 %), then send --overload times that
rate as an open loop (asyncio gRPC, Poisson arrivals) for --duration-s seconds, and measure what
the bounded queues do: requests admitted and rejected (queue full, queue timeout, other), how
fast a rejection comes back, the latency and throughput (goodput) of what is admitted, whether
the server stays live, and how long it takes to get back to its unloaded latency afterwards.
Every answered request is compared with the in-process reference pipeline of --repo (max
|difference| <= 1e-4).

Prints each target with its measured value and PASS/MISS, and writes stress.json and stress.png
to --out. Exits 1 when an answer was wrong, the server went down, or a request was refused by
anything but the queue policy; a missed timing target exits 1 only with --strict. The server
(e.g. `cxrlt serve`; without --url, stress starts the embedded tritonserver on --repo) runs on this host: the overload goes to loopback addresses only, and the
server's process is found by its port to measure its CPU and see that it is still alive."""

from __future__ import annotations

import argparse
from typing import Any

from cxrlt.cli.options import add_hints_argument, add_option, add_repo_argument, add_report_arguments, report_folder, write_report
from cxrlt.contract.served import CLASSIFIER_MODEL, PIPELINE_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cxrlt.cli.commands.loadtest import positive

    parser.add_argument("--url", help="gRPC host:port of a server on this host (loopback) serving --repo (default: start one on --repo)")
    add_repo_argument(parser, "the model repository it serves (the reference pipeline's files)", required=True)
    parser.add_argument("--metrics-url", help="its metrics endpoint (default http://<url host>:8002/metrics)")
    parser.add_argument("--model", default=CLASSIFIER_MODEL, choices=PIPELINE_MODELS)
    parser.add_argument("--overload", type=positive(float), default=3.0, help="offered rate as a multiple of the saturation throughput")
    parser.add_argument("--duration-s", type=positive(float), default=30.0, help="length of the overload in seconds")
    parser.add_argument("--arrivals", default="poisson", choices=["poisson", "fixed"], help="open-loop arrivals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    add_option(parser, "--timeout-s", "--request-timeout-s", type=positive(float), default=10.0, dest="timeout_s",
               help="client timeout of each overload request (keep it above the queue timeout)")
    parser.add_argument("--max-in-flight", type=positive(int), default=256, help="overload requests outstanding at most")
    parser.add_argument("--max-requests", type=positive(int), default=20_000, help="overload requests sent at most")
    parser.add_argument("--saturation-requests", type=positive(int), default=60, help="measured requests per concurrency level of the saturation sweep")
    parser.add_argument("--max-concurrency", type=positive(int), default=32, help="largest concurrency of the sweep")
    parser.add_argument("--recovery-timeout-s", type=positive(float), default=30.0, help="give up waiting for recovery after this")
    parser.add_argument("--image-set", default="all", choices=["all", "real", "synthetic"],
                        help="all: the real CXR (1955x1841) and the synthetic frontal/lateral ones")
    add_hints_argument(parser, True, "send each image's projection hint (--no-hints: the router decides)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a missed timing target too")
    add_report_arguments(parser, "stress", "timeline plot")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.commands.loadtest import breakdown_table, print_wide, run_folder
    from cxrlt.cli.console import console
    from loadtest.driver import run as drive, stress_plot

    out = report_folder(args, "stress")
    with run_folder(out), console.status("stress test") as status:
        report = drive(args, "stress", None if args.url else out / "tritonserver.log", log=lambda message: status.update(message))
        write_report(report, args, out, "stress", stress_plot)

    print_wide(console, stress_table(report), width=150)
    if report["triton"]:
        print_wide(console, breakdown_table(report["triton"], "Triton during the storm: per admitted request, queue vs compute"))
    for kind in report["storm"]["rejected"]["kinds"][:5]:
        console.print(f"{kind['count']} x {kind['reason']}: {kind['status']} {kind['message']}")
    load, cpu, at_saturation = report["load_average"], report["storm"]["cpu"], report["saturation"]["cpu"]
    server_cpu = "" if cpu["server_cores"] is None else (
        f", the server {cpu['server_cores']:.2f} ({cpu['server_ms_per_image']} ms CPU per admitted image; "
        f"{at_saturation['server_cores']:.2f} cores and {at_saturation['server_ms_per_image']} ms at saturation)")
    console.print(f"storm: this client used {cpu['client_cores']:.2f} cores{server_cpu} of {cpu['cores']}; the machine was "
                  f"{100 * cpu['machine_busy_share']:.0f} % busy; load average before {' '.join(map(str, load['before']))}, "
                  f"after {' '.join(map(str, load['after']))}")
    console.print(f"report: {report['files']['json']}  plot: {report['files']['plot']}")
    if report["failed_checks"]:
        console.print(f"[bold red]failed check(s): {', '.join(report['failed_checks'])}[/]")
        return 1
    if report["missed_targets"]:
        console.print(f"[{'bold red' if args.strict else 'yellow'}]missed target(s): {', '.join(report['missed_targets'])}"
                      f"{'' if args.strict else ' (exit 0 without --strict)'}[/]")
        return 1 if args.strict else 0
    return 0


def stress_table(report: dict[str, Any]) -> Any:
    from cxrlt.cli.commands.loadtest import table, verdict
    from loadtest.kernel import fmt

    saturation, storm = report["saturation"], report["storm"]
    rejected, by = storm["rejected"], storm["rejected"]["by_reason"]
    rows = [
        (f"saturation (closed loop, concurrency {saturation['concurrency']})", f"{saturation['images_per_s']:.1f} img/s"),
        ("p50 / p95 at saturation", f"{fmt(saturation['p50_ms'], unit='ms')} / {fmt(saturation['p95_ms'], unit='ms')}"),
        ("unloaded p50 (concurrency 1)", fmt(saturation["unloaded_p50_ms"], unit="ms")),
        ("offered / sent (send lag p95)", f"{storm['rate_offered']:.1f} / {storm['rate_sent']:.1f} req/s "
                                          f"({fmt(storm['send_lag']['p95_ms'], unit='ms')})"),
        ("sent: admitted / rejected", f"{storm['sent']}: {storm['admitted']} / {rejected['total']}"),
        ("rejected: queue full / timeout / other", f"{by['queue_full']} / {by['queue_timeout']} / {by['other']}"),
        ("rejection latency p50", fmt(rejected["latency"]["all"]["p50_ms"], unit="ms")),
    ]
    return table(f"{report['model']}: {report['overload']:g} x the saturation rate for {storm['duration_s']:.0f} s "
                 f"({storm['arrivals']} arrivals)", ("figure", "measured", "<target", "<"),
                 [(*row, "", "") for row in rows] + [(c["figure"], c["shown"], c["limit"], verdict(c["passed"]))
                                                     for c in report["checks"]],
                 "target: timing, fails the command only with --strict; check: always")
