"""Drift status from a Prometheus that evaluates the rules of `cxrlt monitoring-rules`: per finding
the images and positive rate over the window, the validation baseline, the band and whether its
alert fires; then the projection mix and the OOD figures. Exits 1 while any drift alert fires,
0 otherwise (2: Prometheus unreachable or without the rules)."""

from __future__ import annotations

import argparse
import json
import urllib.parse
import urllib.request
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="per query (default 10)")


def _get(base: str, path: str, timeout: float, **query: str) -> Any:
    url = f"{base.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        payload = json.load(response)
    if payload.get("status") != "success":
        raise RuntimeError(f"Prometheus answered {payload}")
    return payload["data"]


def _by_finding(base: str, expr: str, timeout: float) -> dict[str, float]:
    return {r["metric"].get("finding", ""): float(r["value"][1]) for r in _get(base, "/api/v1/query", timeout, query=expr)["result"]}


def drift_status(base: str, timeout: float = 10.0) -> dict[str, Any]:
    """The recorded drift series and the firing drift alerts, from Prometheus's HTTP API."""
    from evaluation.drift import ALERTS, BAND, BASE_RATE, FINDING_IMAGES, LATERAL, OOD_MEAN, OOD_REFUSALS, RATE, ROUTED

    series = {name: _by_finding(base, name, timeout) for name in (RATE, FINDING_IMAGES, BASE_RATE, BAND)}
    single = {name: _by_finding(base, name, timeout).get("") for name in (LATERAL, ROUTED, OOD_REFUSALS, OOD_MEAN)}
    alerts = [a for a in _get(base, "/api/v1/alerts", timeout)["alerts"] if a["labels"].get("alertname") in ALERTS]
    return {"series": series, "single": single, "alerts": alerts}


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from cxrlt.cli.console import console
    from evaluation.drift import BAND, BASE_RATE, FINDING_IMAGES, LATERAL, OOD_MEAN, OOD_REFUSALS, RATE, ROUTED

    try:
        status = drift_status(args.prometheus, args.timeout_s)
    except (OSError, RuntimeError, ValueError) as exc:
        console.print(f"cannot read the drift status from {args.prometheus}: {exc}")
        return 2
    series, single = status["series"], status["single"]
    if not series[BASE_RATE]:
        console.print(f"{args.prometheus} has no drift rules loaded (no {BASE_RATE}): load `cxrlt monitoring-rules`'s file")
        return 2
    firing = [a for a in status["alerts"] if a.get("state") == "firing"]
    flagged = {a["labels"].get("finding") for a in firing if a["labels"].get("finding")}
    table = Table(title="drift per finding over the rules' window")
    for column in ("finding", "images", "positive rate", "baseline", "band +-", "status"):
        table.add_column(column, justify="left" if column in ("finding", "status") else "right")
    for finding in series[BASE_RATE]:
        rate, band = series[RATE].get(finding), series[BAND].get(finding)
        table.add_row(finding, f"{series[FINDING_IMAGES].get(finding, 0):.0f}", "-" if rate is None else f"{rate:.3f}",
                      f"{series[BASE_RATE][finding]:.3f}", "-" if band is None else f"{band:.3f}",
                      "[red]DRIFT[/red]" if finding in flagged else "ok")
    console.print(table)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    console.print(f"projection mix: {fmt(single[LATERAL], '.3f')} lateral of {fmt(single[ROUTED], '.0f')} routed images; "
                  f"OOD refusal rate {fmt(single[OOD_REFUSALS], '.3f')}, mean OOD score {fmt(single[OOD_MEAN], '.3g')}")
    for alert in firing:
        console.print(f"[red]FIRING[/red] {alert['labels']['alertname']} {alert['labels'].get('finding', '')}: "
                      f"{alert.get('annotations', {}).get('summary', '')}")
    if not firing:
        console.print("no drift alert fires")
    return 1 if firing else 0
