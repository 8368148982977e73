"""`cxrlt loadtest`: locust headless against a Triton server, Triton's metrics around it, targets.

Runs `python -m locust -f loadtest/locustfile.py --headless ...` as a subprocess (locust
monkey-patches the interpreter for gevent; the CLI process stays unpatched), keeps its CSV
and HTML report, scrapes Triton's Prometheus endpoint before and after for a per-model
queue vs compute breakdown, checks the targets and writes `report.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cxrlt.contract.resources import package_file, package_root
from loadtest import metrics as triton_metrics
from loadtest.payloads import IMAGE_SETS, MODELS
from loadtest.kernel import LoadTestError, verdicts, write_json
from loadtest.targets import Targets, check_targets

LOCUSTFILE = package_file("loadtest", "locustfile.py")
PACKAGES_ROOT = package_root("loadtest")  # what locust's interpreter needs on sys.path
REPORT = "report.json"
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str | float | int) -> float:
    """'90', '90s', '1m30s', '2m', '1h' -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text).strip().lower())
        if not match or not any(match.groups()):
            raise ValueError(f"cannot read duration {text!r}; use seconds (30, 30s) or e.g. 1m30s")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not seconds > 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return seconds


@dataclasses.dataclass
class LoadTestConfig:
    url: str = "127.0.0.1:8001"
    users: int = 2
    spawn_rate: float = 2.0
    duration_s: float = 30.0
    out: Path = Path("runs/loadtest")
    weights: dict[str, int] = dataclasses.field(default_factory=lambda: {m: 1 for m in MODELS})
    image_set: str = "all"
    send_hints: bool = True
    request_timeout_s: float = 30.0
    metrics_url: str | None = None  # None: Triton's default port on the URL's host
    targets: Targets = dataclasses.field(default_factory=Targets)
    profile: str | None = None
    tls: dict[str, Any] = dataclasses.field(default_factory=dict)  # ssl, root_certificates, private_key, certificate_chain
    report_path: Path | None = None  # None: OUT/report.json

    def __post_init__(self) -> None:
        self.url = self.url.split("://", 1)[-1].rstrip("/")
        if self.users < 1:
            raise ValueError("--users must be at least 1")
        if not self.spawn_rate > 0:
            raise ValueError("--spawn-rate must be positive")
        if self.image_set not in IMAGE_SETS:
            raise ValueError(f"image set must be one of {IMAGE_SETS}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"task weights must be >= 0 with at least one > 0, got {self.weights}")


def require_locust() -> None:
    """Fail in one line, naming the extra, when locust is not installed (before any folder or server)."""
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is not installed: cxrlt loadtest needs the 'loadtest' extra (pip install -e '.[loadtest]')")


def locust_command(config: LoadTestConfig) -> list[str]:
    out = Path(config.out)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", f"grpc://{config.url}",
        "-u", str(config.users), "-r", f"{config.spawn_rate:g}", "-t", f"{max(1, math.ceil(config.duration_s))}s",
        "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary",
        "--exit-code-on-error", "0", "--loglevel", "INFO",
        "--classifier-weight", str(config.weights.get("cxr_classifier", 0)),
        "--zeroshot-weight", str(config.weights.get("cxr_zeroshot", 0)),
        "--findings-weight", str(config.weights.get("cxr_findings", 0)),
        "--image-set", config.image_set, "--request-timeout", f"{config.request_timeout_s:g}",
    ]
    if not config.send_hints:
        command.append("--no-hints")
    if config.tls.get("ssl"):
        command.append("--ssl")
    for name in ("root_certificates", "private_key", "certificate_chain"):
        if config.tls.get(name):
            command += [f"--{name.replace('_', '-')}", str(config.tls[name])]
    return command


def _locust_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGES_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # the client decodes images, it does not need a thread pool
    return env


def check_server(url: str, models: list[str], timeout: float = 10.0, tls: dict[str, Any] | None = None) -> None:
    """Fail early, with a clear message, when nothing is serving the models at `url`."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url, **(tls or {}))
    try:
        try:
            ready = client.is_server_ready(client_timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, ...
            raise LoadTestError(f"no Triton server answers gRPC at {url} ({exc}); start one with `cxrlt serve`") from None
        if not ready:
            raise LoadTestError(f"the Triton server at {url} is not ready")
        missing = [m for m in models if not client.is_model_ready(m, client_timeout=timeout)]
        if missing:
            raise LoadTestError(f"the Triton server at {url} has no ready model {', '.join(missing)}")
    finally:
        client.close()


def run_locust(config: LoadTestConfig) -> Path:
    """Run locust headless; return the path of its log. Raises LoadTestError if it produced no stats."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "locust.log"
    budget = config.duration_s + config.users / config.spawn_rate + config.request_timeout_s + 120.0
    with open(log_path, "wb") as log:
        process = subprocess.Popen(locust_command(config), stdout=log, stderr=subprocess.STDOUT, cwd=out,
                                   env=_locust_environment(), start_new_session=True)
        try:
            process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise LoadTestError(f"locust did not finish within {budget:.0f} s and was stopped; see {log_path}") from None
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    if not (out / "locust_stats.csv").is_file():
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-20:])
        raise LoadTestError(f"locust exited with status {process.returncode} and wrote no statistics:\n{tail}")
    return log_path


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_locust_stats(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """locust_stats.csv -> ({model: figures}, aggregated figures)."""
    per_model: dict[str, dict[str, Any]] = {}
    aggregated = None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            requests = int(row["Request Count"])
            figures = {
                "requests": requests,
                "failures": int(row["Failure Count"]),
                "rps": _float(row["Requests/s"]) or 0.0,
                "failures_per_s": _float(row["Failures/s"]) or 0.0,
                "avg_ms": _float(row["Average Response Time"]),
                "min_ms": _float(row["Min Response Time"]),
                "max_ms": _float(row["Max Response Time"]),
                "p50_ms": _float(row["50%"]) if requests else None,
                "p95_ms": _float(row["95%"]) if requests else None,
                "p99_ms": _float(row["99%"]) if requests else None,
                "avg_response_bytes": _float(row["Average Content Size"]),
            }
            if row["Name"] == "Aggregated" and not row["Type"]:
                aggregated = figures
            else:
                per_model[row["Name"]] = figures
    return per_model, aggregated


def read_locust_failures(path: Path) -> list[dict[str, Any]]:
    """locust_failures.csv -> [{model, error, occurrences}], most frequent first."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [{"model": r["Name"], "error": r["Error"], "occurrences": int(r["Occurrences"])} for r in csv.DictReader(handle)]
    return sorted(rows, key=lambda r: -r["occurrences"])


def run_loadtest(config: LoadTestConfig) -> dict[str, Any]:
    """Run the whole load test and write report.json into config.out; return the report."""
    out = Path(config.out)
    report_path = config.report_path or out / REPORT
    active = [m for m, w in config.weights.items() if w > 0]
    require_locust()
    check_server(config.url, active, tls=config.tls)
    metrics_url = config.metrics_url
    before, metrics_error = triton_metrics.try_scrape(metrics_url)
    started = time.time()
    log_path = run_locust(config)
    wall_s = time.time() - started
    per_model, aggregated = read_locust_stats(out / "locust_stats.csv")
    sent = {model: figures["requests"] for model, figures in per_model.items()}
    after, after_error = triton_metrics.try_scrape(metrics_url, before, sent) if before is not None else (None, metrics_error)
    triton = None
    if before is not None and after is not None:
        triton = triton_metrics.per_model(triton_metrics.diff(before, after))
    checks = check_targets(config.targets, aggregated, per_model)
    report = {
        "url": config.url,
        "metrics_url": metrics_url,
        "profile": config.profile,
        "load": {
            "users": config.users, "spawn_rate": config.spawn_rate, "duration_s": config.duration_s,
            "weights": config.weights, "image_set": config.image_set, "send_hints": config.send_hints,
            "request_timeout_s": config.request_timeout_s, "locust_wall_s": round(wall_s, 2),
        },
        "locust": {"models": per_model, "aggregated": aggregated,
                   "failures": read_locust_failures(out / "locust_failures.csv")},
        "triton": {"models": triton_metrics.breakdown_json(triton)} if triton is not None else None,
        "triton_error": None if triton is not None else (after_error or metrics_error),
        "targets": config.targets.to_json(),
        **verdicts(checks),
        "files": {
            "stats_csv": str(out / "locust_stats.csv"),
            "failures_csv": str(out / "locust_failures.csv"),
            "html": str(out / "report.html"),
            "locust_log": str(log_path),
            "report": str(report_path),
        },
    }
    write_json(report, report_path)
    return report


def print_report(report: dict[str, Any], console) -> None:
    from rich import box
    from rich.table import Table

    load = report["load"]
    table = Table(title=f"locust: {load['users']} users for {load['duration_s']:g} s against {report['url']} (client side)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    for column in ("reqs", "fails", "req/s", "avg ms", "p50 ms", "p95 ms", "p99 ms", "bytes"):
        table.add_column(column, justify="right", no_wrap=True)

    def fmt(value, spec=".1f"):
        return "-" if value is None else format(value, spec)

    rows = list(report["locust"]["models"].items())
    if report["locust"]["aggregated"]:
        rows.append(("all", report["locust"]["aggregated"]))
    for name, f in rows:
        table.add_row(name, str(f["requests"]), str(f["failures"]), fmt(f["rps"], ".2f"), fmt(f["avg_ms"]),
                      fmt(f["p50_ms"], ".0f"), fmt(f["p95_ms"], ".0f"), fmt(f["p99_ms"], ".0f"), fmt(f["avg_response_bytes"], ".0f"))
    triton_metrics.print_wide(console, table)
    if report["triton"] is not None:
        rows = [triton_metrics.ModelTime(**{k: v for k, v in m.items() if k in _MODEL_TIME_FIELDS})
                for m in report["triton"]["models"].values()]
        triton_metrics.print_wide(console, triton_metrics.breakdown_table(rows, "Triton (server side): per request, queue vs compute"))
    else:
        console.print(f"[yellow]no Triton metrics breakdown: {report['triton_error']}[/]")
    for failure in report["locust"]["failures"][:5]:
        console.print(f"[red]{failure['occurrences']} x {failure['model']}: {failure['error']}[/]")
    for check in report["checks"]:
        style = "green" if check["passed"] else "bold red"
        console.print(f"[{style}]{check['message']}[/]")
    console.print(f"report: {report['files']['report']}  html: {report['files']['html']}")


_MODEL_TIME_FIELDS = {f.name for f in dataclasses.fields(triton_metrics.ModelTime)}
