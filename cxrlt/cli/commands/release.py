"""Releases of a repository (cxrlt.contract.releases, docs/releases.md): which one a server answers
with, and a safe way to change it.

  list                  the releases the repository holds, their identity and role
  shadow N --fraction F the candidate N also runs on a share F of requests; answers never change
  canary N --percent P  the candidate N answers P % of studies (sticky by study)
  promote N             N becomes the live release (no candidate)
  rollback              back to the release that was live before the last promotion
  report                the shadow candidate's agreement and latency, with a verdict (exit 1: fails)
  prune --keep K        remove all but the K newest releases (never the live one, a candidate or
                        rollback's target)

With --url the running server switches at once, each pipeline model reloaded with the new plan
(no restart; the old instance answers until the new one is ready); add --save to also write the
plan into the repository's configs, which is what a server loads at its next start. Without
--url only the configs change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrlt.cli.options import add_repo_argument
from cxrlt.contract.served import FINDINGS_MODEL, PIPELINE_MODELS

ACTIONS = ("list", "shadow", "canary", "promote", "rollback", "report", "prune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do (see above)")
    parser.add_argument("number", nargs="?", type=int, metavar="N", help="the release (shadow, canary, promote)")
    add_repo_argument(parser, "the repository the server serves (its releases' files and parameters are read from it)")
    parser.add_argument("--url", help="gRPC HOST:PORT of the server to switch (or to report on)")
    parser.add_argument("--save", action="store_true", help="with --url: also write the new plan into the repository's configs")
    parser.add_argument("--fraction", type=float, default=0.1, help="shadow: share of requests the candidate also runs (default 0.1)")
    parser.add_argument("--percent", type=float, default=10.0, help="canary: share of studies the candidate answers, in %% (default 10)")
    parser.add_argument("--keep", type=int, default=3, help="prune: the newest releases to keep (default 3)")
    parser.add_argument("--admin-key-file", type=Path, help="the server's admin key (when its model repository API is restricted)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per call to the server (default 120)")
    parser.add_argument("--metrics-url", help="report: the server's Prometheus endpoint (default: http://HOST:PORT+1/metrics of --url, "
                                                   "as Triton's 8001 and 8002)")
    parser.add_argument("--model", default=FINDINGS_MODEL, choices=PIPELINE_MODELS,
                        help="report: the pipeline model whose shadow runs to compare")
    parser.add_argument("--max-rate-diff", type=float, default=0.02, help="report: largest change of a finding's positive rate (default 0.02)")
    parser.add_argument("--max-p99-increase", type=float, default=0.10, help="report: largest p99 latency increase (default 0.10)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.console import console

    if args.action == "report":
        return _report(args, console)
    if args.repo is None:
        raise ValueError(f"`cxrlt release {args.action}` needs --repo DIR: the repository holding the releases")
    if args.action in ("shadow", "canary", "promote") and args.number is None:
        raise ValueError(f"`cxrlt release {args.action}` needs the release number, e.g. `cxrlt release {args.action} 2`")
    from cxrlt.client.releases import ReleaseControl

    key = args.admin_key_file.read_text().strip() if args.admin_key_file else None
    control = ReleaseControl(args.repo, args.url, key, args.timeout_s, save=bool(args.save) or not args.url)
    try:
        if args.action == "list":
            return _list(args, console, control)
        if args.action == "prune":
            removed = control.prune(args.keep)
            console.print(f"removed release(s) {removed}" if removed else "nothing to remove")
            _write_json(args, {"removed": removed})
            return 0
        switch = {"shadow": lambda: control.shadow(args.number, args.fraction),
                  "canary": lambda: control.canary(args.number, args.percent),
                  "promote": lambda: control.promote(args.number), "rollback": control.rollback}[args.action]()
    finally:
        control.close()
    took = f" in {switch.seconds:.1f} s" if args.url else ""
    console.print(f"{switch.before.describe()} -> [bold]{switch.after.describe()}[/]{took} ({', '.join(switch.applied_to)})")
    _write_json(args, {"before": switch.before.to_parameters(), "after": switch.after.to_parameters(),
                       "seconds": switch.seconds, "applied_to": list(switch.applied_to)})
    return 0


def _list(args: argparse.Namespace, console, control) -> int:
    from rich.table import Table

    rows = control.releases()
    table = Table(title=f"{args.repo}: {control.plan().describe()}" + (f" on {args.url}" if args.url else ""))
    for column in ("release", "role", "release sha256", "weights", "operating points", "gate"):
        table.add_column(column)
    for row in rows:
        weights = "RANDOM (seed {})".format(row["seed"]) if row["random_weights"] else str(row["checkpoints"])
        table.add_row(str(row["release"]), row["role"], row["sha256"][:16], weights,
                      "yes" if row["operating_points"] else "no", "yes" if row["ood_gate"] else "no")
    console.print(table)
    _write_json(args, {"plan": control.plan().to_parameters(), "releases": rows})
    return 0


def _report(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from cxrlt.client.release_report import Limits, read_metrics, shadow_report

    if not (args.metrics_url or args.url):
        raise ValueError("`cxrlt release report` needs --url HOST:PORT (or --metrics-url URL) of the server")
    host, port = args.url.rsplit(":", 1) if args.url else ("", "0")
    url = args.metrics_url or f"http://{host}:{int(port) + 1}/metrics"  # Triton's layout: gRPC 8001, metrics 8002
    report = shadow_report(read_metrics(url), args.model, Limits(args.max_rate_diff, args.max_p99_increase))
    _write_json(args, report)
    if not report["candidates"]:
        console.print(f"no shadow run recorded by {args.model} at {url}: start one with `cxrlt release shadow N`")
        return 1
    passed = True
    for release, entry in report["candidates"].items():
        table = Table(title=f"release {release} in shadow: {entry['images']:.0f} images compared")
        for column in ("finding", "flips", "positive rate live", "candidate", "diff", "mean |dp|", "p95 |dp|"):
            table.add_column(column, justify="right" if column != "finding" else "left")
        for finding, row in sorted(entry["findings"].items(), key=lambda item: -abs(item[1]["positive_rate_diff"])):
            table.add_row(finding, f"{row['flips']:.0f}", f"{row['positive_rate_live']:.3f}", f"{row['positive_rate_candidate']:.3f}",
                          f"{row['positive_rate_diff']:+.3f}", f"{row['mean_abs_dp']:.4f}", f"{row['p95_abs_dp']:.3f}")
        console.print(table)
        latency = entry["latency"]
        console.print(f"batch time p99: live {latency['live']['p99_s'] * 1000:.1f} ms, candidate "
                      f"{latency['candidate']['p99_s'] * 1000:.1f} ms ({latency['p99_increase']:+.0%})")
        console.print("[bold green]PASS[/]" if entry["passed"] else "[bold red]FAIL[/]: " + "; ".join(entry["failures"]))
        passed &= entry["passed"]
    return 0 if passed else 1


def _write_json(args: argparse.Namespace, value) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(value, indent=2, default=float) + "\n")
