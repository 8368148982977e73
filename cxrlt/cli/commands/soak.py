"""Soak a server: send N requests over gRPC (cxr_classifier, cxr_zeroshot and cxr_findings in
turn) and every K requests sample the server's whole process tree (tritonserver and its
Python-backend stubs): RSS, open file descriptors and the /dev/shm files it holds. Reports the
growth after warm-up as a percentage and as least-squares slopes per 1,000 requests, prints
PASS/MISS against the targets (RSS growth < 5 %; RSS not still growing: slope over the later
half < 1 MiB per 1,000 requests; no growth in fds or /dev/shm files; no failed request) and
exits 1 on a miss. Writes a JSON report and a PNG plot.

Against a running server: --url HOST:PORT (loopback only: its processes are read from this
machine's /proc; the server is the process listening on the port, or --server-pid PID). With --repo DIR it starts the embedded tritonserver on free
ports itself and stops it at the end."""

from __future__ import annotations

import argparse
from typing import Any

from cxrlt.cli.options import add_hints_argument, add_option, add_repo_argument, add_report_arguments, report_folder, write_report

MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cxrlt.cli.commands.loadtest import positive

    parser.add_argument("--url", help="gRPC host:port of a running server on this machine")
    parser.add_argument("--server-pid", type=int, help="PID of that tritonserver, whose process tree is sampled "
                                                       "(default: the process listening on the --url port)")
    add_repo_argument(parser, "model repository: start the embedded tritonserver on it instead (stopped at the end)")
    parser.add_argument("--requests", type=positive(int), required=True, help="requests to send in all, warm-up included")
    parser.add_argument("--sample-every", type=positive(int), default=100, metavar="K", help="sample the server every K requests")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before growth is measured")
    parser.add_argument("--concurrency", type=positive(int), default=4, help="requests in flight")
    parser.add_argument("--image-set", default="all", choices=["all", "real", "synthetic"],
                        help="all: the real CXR (1955x1841) and the synthetic frontal/lateral ones")
    add_hints_argument(parser, True, "send each image's PROJECTION_HINT")
    add_option(parser, "--timeout-s", "--request-timeout", type=positive(float), default=60.0, dest="timeout_s",
               help="seconds before a call counts as failed")
    add_option(parser, "--time-limit-s", "--time-limit", type=positive(float), default=3600.0, dest="time_limit_s",
               help="stop sending after this many seconds; the run then misses 'completed'")
    parser.add_argument("--max-rss-growth-pct", type=float, default=5.0, help="target: RSS growth after warm-up in %%")
    parser.add_argument("--max-rss-slope-mib", type=float, default=1.0,
                        help="target: RSS slope over the later half of the post-warm-up samples, in MiB per 1,000 "
                             "requests (a short run needs a larger bound, e.g. 50 for 2,000 requests)")
    add_report_arguments(parser, "soak", "plot")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.commands.loadtest import print_checks, print_wide, run_folder
    from cxrlt.cli.console import console
    from loadtest.driver import run as drive, soak_plot

    out = report_folder(args, "soak")
    with run_folder(out), console.status(f"soak: {args.requests} requests") as status:
        report = drive(args, "soak", out / "tritonserver.log" if args.url is None else None,
                       log=lambda message: status.update(f"soak: {message}"))
        write_report(report, args, out, "soak", soak_plot)

    print_wide(console, soak_table(report), width=140)
    console.print(f"{report['requests_completed']} requests in {report['wall_s']:.0f} s ({report['requests_per_s']} req/s); "
                  f"load average before {report['load_average']['before']}, after {report['load_average']['after']} "
                  f"({report['cpus']} CPUs)")
    for error, count in report["errors"].items():
        console.print(f"[red]{count} x {error}[/]")
    print_checks(console, report["checks"])
    console.print(f"report: {report['files']['json']}  plot: {report['files']['plot']}")
    if not report["passed"]:
        console.print(f"[bold red]missed target(s): {', '.join(report['missed'])}[/]")
        return 1
    return 0


# The table's rows: (series, name, scale, format, growth shown: the fitted % or the level difference, its check).
SERIES_ROWS = (
    ("rss_bytes", "RSS (MiB)", MIB, ".1f", "growth_pct", "rss_growth_pct"),
    ("rss_anon_bytes", "  anonymous (MiB)", MIB, ".1f", "growth_pct", ""),
    ("fds", "open fds", 1, ".0f", "level_growth", "fds_growth"),
    ("shm_files", "/dev/shm files", 1, ".0f", "level_growth", "shm_files_growth"),
    ("shm_bytes", "/dev/shm MiB", MIB, ".1f", "level_growth", ""),
)


def soak_table(report: dict[str, Any]) -> Any:
    from cxrlt.cli.commands.loadtest import table, verdict
    from loadtest.kernel import fmt

    checks, g, targets = {c["name"]: c["passed"] for c in report["checks"]}, report["growth"], report["targets"]
    bounds = {"rss_growth_pct": f"growth < {targets['max_rss_growth_pct']:g} %", "fds_growth": f"growth <= {targets['max_fd_growth']}",
              "shm_files_growth": f"growth <= {targets['max_shm_file_growth']}"}

    def row(key: str, name: str, scale: float, spec: str, growth_from: str, judged: str) -> tuple[str, ...]:
        values, later, error = g[key], g[key]["slope_per_1000_later_half"], g[key]["later_half_stderr_per_1000"]
        grown = f"{values['growth_pct']:+.2f} %" if growth_from == "growth_pct" else f"{values['level_growth'] / scale:+{spec}}"
        return (name, *(format(values[k] / scale, spec) for k in ("at_start", "after_warmup", "end")), grown,
                f"{values['slope_per_1000'] / scale:+.3g}",
                fmt(later and later / scale, "+.3g") + (f" ±{error / scale:.2g}" if later is not None and error else ""),
                bounds.get(judged, ""), verdict(checks.get(judged)) if judged else "")

    rows = [row(*series) for series in SERIES_ROWS] if g else []
    if g:  # the later half's slope is the RSS's second verdict
        rows.insert(1, ("  RSS still growing", "", "", "", "", "", "", f"later half < {targets['max_rss_slope_mib_per_1000']:g}",
                        verdict(checks.get("rss_slope"))))
    rows.append(("failed requests", "", "", str(sum(report["failed"].values())), "", "", "", f"<= {targets['max_failures']}",
                 verdict(checks.get("max_failures"))))
    return table(f"soak: {report['requests_completed']} requests, warm-up {report['load']['warmup']}, sampled every "
                 f"{report['load']['sample_every']}", ("metric", "start", "after warm-up", "end", "growth", "slope /1k",
                                                       "later half /1k", "target", "verdict"), rows,
                 "after warm-up: growth % and slopes per 1,000 requests from least squares; fds and shm: median of the last "
                 "samples minus the first after warm-up; shm MiB is reported, not judged")
