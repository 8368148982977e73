"""Load-test a running Triton server with locust over gRPC (headless), break the server's time
down per model (queue vs compute, from Triton's Prometheus metrics), and check targets:
minimum requests/s, maximum p95 latency, zero failures. Exits 1 naming each missed target.

Targets and the load to apply can come from a profile file (--targets loadtest/profiles/tiny_cpu.yaml);
command-line options override it. Writes locust's CSV and HTML report and report.json to --out."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

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
    import time

    from cxrlt.cli.console import console
    from loadtest.kernel import default_metrics_url
    from loadtest.runner import LoadTestConfig, load_profile, require_locust, run_loadtest

    require_locust()
    profile = load_profile(args.targets)
    load = profile["load"]
    weights = {f"cxr_{m}": int(load.get("weights", {}).get(f"cxr_{m}", 1)) for m in ("classifier", "zeroshot", "findings")}
    for m in ("classifier", "zeroshot", "findings"):
        if getattr(args, f"{m}_weight") is not None:
            weights[f"cxr_{m}"] = getattr(args, f"{m}_weight")
    overrides = {k: v for k, v in {"min_rps": args.min_rps, "max_p95_ms": args.max_p95_ms,
                                    "max_failures": args.max_failures}.items() if v is not None}
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
        targets={**profile["targets"], **overrides},
        profile=profile["source"],
    )
    with run_folder(config.out), console.status(f"locust: {config.users} users for {config.duration_s:g} s against {config.url}"):
        report = run_loadtest(config)
    print_report(report, console)
    if not report["passed"]:
        console.print(f"[bold red]missed target(s): {', '.join(report['missed'])}[/]")
        return 1
    return 0


def parse_duration(text: str | float | int) -> float:
    """'90', '90s', '1m30s', '2m', '1h' -> seconds."""
    import pandas as pd

    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = pd.Timedelta(str(text).strip().lower()).total_seconds()
        except ValueError:
            raise ValueError(f"cannot read duration {text!r}; use seconds (30, 30s) or e.g. 1m30s") from None
    if not seconds > 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return seconds


# --- shared by the load-test commands (bench, stress, soak, loadtest) ---------------------------------


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """argparse type: an int or a float above 0 (for counts: at least 1)."""
    def parse(text: str) -> Any:
        if not (value := kind(text)) > 0:
            raise argparse.ArgumentTypeError(f"must be {'at least 1' if kind is int else 'positive'}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


@contextlib.contextmanager
def run_folder(path: Path) -> Iterator[Path]:
    """A run's output folder: a run that fails removes it again when it made it (no empty runs/ folders)."""
    top = None if path.exists() else path  # the highest folder this run may create (runs/ too)
    while top is not None and not top.parent.exists():
        top = top.parent
    try:
        yield path
    except BaseException:
        if top is not None and top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        raise


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None) -> Table:
    """A rich table: the first column and those named with a leading '<' left-aligned, the others right."""
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption=caption)
    for i, column in enumerate(columns):
        out.add_column(column.lstrip("<"), justify="left" if i == 0 or column.startswith("<") else "right", no_wrap=True)
    for row in rows:
        out.add_row(*row)
    return out


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else "[green]PASS[/]" if passed else "[bold red]MISS[/]"


def print_wide(console: Console, renderable: Any, width: int = 120) -> None:
    """Print at full width when the output is a file or a pipe (rich assumes 80 columns there)."""
    wide = console.is_terminal or console.width >= width
    (console if wide else Console(file=console.file, width=width, highlight=False)).print(renderable)


def print_checks(console: Console, checks: Sequence[dict[str, Any]]) -> None:
    for check in checks:
        console.print(f"[{'green' if check['passed'] else 'bold red'}]{check['message']}[/]")


def breakdown_table(models: Mapping[str, Mapping[str, Any]], title: str) -> Table:
    """Per-model queue vs compute time, from `loadtest.metrics.breakdown_json`."""
    return table(title, ("model", "reqs", "fails", "execs", "batch", "queue", "compute", "request", "queue%"), [
        (name, str(m["requests"]), str(m["failures"]), str(m["executions"]), f"{m['avg_batch']:.2f}", f"{m['queue_ms']:.2f}",
         f"{m['compute_ms']:.2f}", f"{m['request_ms']:.2f}", f"{100 * m['queue_share']:.0f}%") for name, m in models.items()],
        "queue/compute/request: ms per successful request; batch: images per execution")


def print_report(report: dict[str, Any], console: Console) -> None:
    from loadtest.kernel import fmt

    load, locust = report["load"], report["locust"]
    rows = [*locust["models"].items(), *([("all", locust["aggregated"])] if locust["aggregated"] else [])]
    print_wide(console, table(f"locust: {load['users']} users for {load['duration_s']:g} s against {report['url']} (client side)",
                              ("model", "reqs", "fails", "req/s", "avg ms", "p50 ms", "p95 ms", "p99 ms", "bytes"),
                              [(name, str(f["requests"]), str(f["failures"]), fmt(f["rps"], ".2f"), fmt(f["avg_ms"]),
                                *(fmt(f[k], ".0f") for k in ("p50_ms", "p95_ms", "p99_ms", "avg_response_bytes")))
                               for name, f in rows]))
    if report["triton"] is not None:
        print_wide(console, breakdown_table(report["triton"]["models"], "Triton (server side): per request, queue vs compute"))
    else:
        console.print(f"[yellow]no Triton metrics breakdown: {report['triton_error']}[/]")
    for failure in locust["failures"][:5]:
        console.print(f"[red]{failure['occurrences']} x {failure['model']}: {failure['error']}[/]")
    print_checks(console, report["checks"])
    console.print(f"report: {report['files']['report']}  html: {report['files']['html']}")
