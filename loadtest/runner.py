"""`cxrlt loadtest`: locust headless (a subprocess: locust patches its interpreter for gevent) against a Triton server, Triton's
metrics scraped around it, the targets of a profile file (loadtest/README.md, "Load test") checked, `report.json` written."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from cxrlt.contract.resources import package_file, package_root
from loadtest.kernel import IMAGE_SETS, MODELS, LoadTestError, address, check, check_server, verdicts, write_json
from loadtest.metrics import Counters, breakdown_json

TARGETS = {"min_rps": ("rps", "req/s"), "max_p95_ms": ("p95_ms", "ms"), "max_failures": ("failures", "failures")}  # figure, unit
LOAD_KEYS = ("users", "spawn_rate", "duration_s", "weights", "image_set")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


def _target_values(section: Any, where: str) -> dict[str, float]:
    if not isinstance(section, dict):
        raise ProfileError(f"{where} must be a mapping")
    if unknown := set(section) - set(TARGETS):
        raise ProfileError(f"{where}: unknown target(s) {sorted(unknown)}; known: {', '.join(TARGETS)}")
    for key, value in section.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                                  or value < 0):
            raise ProfileError(f"{where}.{key} must be a non-negative number, not {value!r}")
    return {key: float(value) for key, value in section.items() if value is not None}


def load_profile(path: Path | str | None) -> dict[str, Any]:
    """{"targets": {min_rps, max_p95_ms, max_failures (default 0), models: {model: the same keys}}, "load": {...},
    "source": the file}; without a file, no targets but zero failures."""
    if path is None:
        return {"targets": {"max_failures": 0, "models": {}}, "load": {}, "source": None}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read profile {path} (or it is not valid YAML): {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with 'targets' (and optionally 'load')")
    if unknown := set(data) - {"targets", "load", "description"}:
        raise ProfileError(f"{path}: unknown section(s) {sorted(unknown)}; expected targets, load, description")
    section = dict(data.get("targets") or {})
    models = {model: _target_values(values, f"{path}: targets.models.{model}")
              for model, values in (section.pop("models", None) or {}).items()}
    targets = {"max_failures": 0, **_target_values(section, f"{path}: targets"), "models": models}
    targets["max_failures"] = int(targets["max_failures"])
    load = dict(data.get("load") or {})
    if unknown := set(load) - set(LOAD_KEYS):
        raise ProfileError(f"{path}: unknown load key(s) {sorted(unknown)}; known: {', '.join(LOAD_KEYS)}")
    return {"targets": targets, "load": load, "source": str(path)}


def check_targets(targets: Mapping[str, Any], aggregated: Mapping[str, Any] | None,
                  per_model: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every target (e.g. "min_rps" or "cxr_findings.max_p95_ms") against locust's figures ('requests', failed
    included, 'failures', 'rps', 'p95_ms'); when nothing ran, only a failure budget is kept."""
    scopes = [("", targets, aggregated), *((f"{model}.", bounds, per_model.get(model))
                                            for model, bounds in targets.get("models", {}).items())]
    checks = []
    for (prefix, bounds, stats), (key, (figure, unit)) in itertools.product(scopes, TARGETS.items()):
        if (limit := bounds.get(key)) is not None:
            relation = ">=" if key.startswith("min") else "<="
            measured = stats.get(figure) if stats and stats.get("requests") else 0 if key == "max_failures" else None
            passed = measured is not None and (measured >= limit if relation == ">=" else measured <= limit)
            shown = "no completed requests to measure" if measured is None else f"measured {float(measured):.4g} {unit}"
            checks.append(check(prefix + key, passed, prefix + key, shown, f"{relation} {limit:g} {unit}", measured))
    return checks


@dataclasses.dataclass
class LoadTestConfig:
    url: str = "127.0.0.1:8001"
    users: int = 2
    spawn_rate: float = 2.0
    duration_s: float = 30.0
    out: Path = Path("runs/loadtest")
    weights: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(MODELS, 1))
    image_set: str = "all"
    send_hints: bool = True
    request_timeout_s: float = 30.0
    metrics_url: str | None = None  # None: no Triton metrics
    targets: dict[str, Any] = dataclasses.field(default_factory=lambda: load_profile(None)["targets"])
    profile: str | None = None
    tls: dict[str, Any] = dataclasses.field(default_factory=dict)  # ssl, root_certificates, private_key, certificate_chain
    report_path: Path | None = None  # None: OUT/report.json

    def __post_init__(self) -> None:
        self.url, self.out = address(self.url).netloc, Path(self.out)
        if self.users < 1 or not self.spawn_rate > 0:
            raise ValueError("--users must be at least 1 and --spawn-rate positive")
        if self.image_set not in IMAGE_SETS:
            raise ValueError(f"image set must be one of {IMAGE_SETS}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"task weights must be >= 0 with at least one > 0, got {self.weights}")


def require_locust() -> None:
    """Fail in one line, naming the extra, when locust is not installed (before any folder or server)."""
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is not installed: cxrlt loadtest needs the 'loadtest' extra (pip install -e '.[loadtest]')")


def locust_command(config: LoadTestConfig) -> list[str]:
    weights = [arg for model in MODELS for arg in (f"--{model.removeprefix('cxr_')}-weight", str(config.weights.get(model, 0)))]
    tls_files = [arg for name in ("root_certificates", "private_key", "certificate_chain") if config.tls.get(name)
                 for arg in (f"--{name.replace('_', '-')}", str(config.tls[name]))]
    return [sys.executable, "-m", "locust", "-f", str(package_file("loadtest", "locustfile.py")), "--headless",
            "--host", f"grpc://{config.url}", "-u", str(config.users), "-r", f"{config.spawn_rate:g}",
            "-t", f"{max(1, math.ceil(config.duration_s))}s", "--csv", str(config.out / "locust"),
            "--html", str(config.out / "report.html"), "--only-summary", "--exit-code-on-error", "0", "--loglevel", "INFO",
            *weights, "--image-set", config.image_set, "--request-timeout", f"{config.request_timeout_s:g}",
            "--figures-json", str(config.out / "figures.json"), *["--no-hints"] * (not config.send_hints),
            *["--ssl"] * bool(config.tls.get("ssl")), *tls_files]


def run_locust(config: LoadTestConfig) -> dict[str, Any]:
    """Run locust headless; return its final figures: {"models": {model: figures}, "aggregated": figures, "failures":
    [{model, error, occurrences}]} (locustfile.write_figures). Raises LoadTestError if it wrote none."""
    config.out.mkdir(parents=True, exist_ok=True)
    log_path = config.out / "locust.log"
    budget = config.duration_s + config.users / config.spawn_rate + config.request_timeout_s + 120.0
    paths = [str(package_root("loadtest")), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.setdefault("OMP_NUM_THREADS", "1")  # the client decodes images, it does not need a thread pool
    with open(log_path, "wb") as log:
        try:  # its own session: Ctrl-C reaches this process, which stops locust (subprocess.run kills it on any exception)
            done = subprocess.run(locust_command(config), stdout=log, stderr=subprocess.STDOUT, cwd=config.out, env=env,
                                  start_new_session=True, timeout=budget)
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"locust did not finish within {budget:.0f} s and was stopped; see {log_path}") from None
    if not (config.out / "figures.json").is_file():
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-20:])
        raise LoadTestError(f"locust exited with status {done.returncode} and wrote no statistics:\n{tail}")
    return json.loads((config.out / "figures.json").read_text())


def run_loadtest(config: LoadTestConfig) -> dict[str, Any]:
    """Run the whole load test and write report.json into config.out; return the report."""
    out, report_path = config.out, config.report_path or config.out / "report.json"
    require_locust()
    check_server(config.url, [m for m, w in config.weights.items() if w > 0], tls=config.tls)
    counters, started = Counters(config.metrics_url), time.time()
    figures = run_locust(config)
    wall_s, per_model, aggregated = time.time() - started, figures["models"], figures["aggregated"]
    delta = counters.grown({model: stats["requests"] for model, stats in per_model.items()})
    load = {key: getattr(config, key) for key in ("users", "spawn_rate", "duration_s", "weights", "image_set", "send_hints",
                                                  "request_timeout_s")}
    report = {
        "url": config.url, "metrics_url": config.metrics_url, "profile": config.profile,
        "load": {**load, "locust_wall_s": round(wall_s, 2)}, "locust": figures,
        "triton": None if delta is None else {"models": breakdown_json(delta)}, "triton_error": counters.error,
        "targets": config.targets, **verdicts(check_targets(config.targets, aggregated, per_model)),
        "files": {"stats_csv": str(out / "locust_stats.csv"), "failures_csv": str(out / "locust_failures.csv"),
                  "figures": str(out / "figures.json"), "html": str(out / "report.html"), "locust_log": str(out / "locust.log"),
                  "report": str(report_path)}}
    write_json(report, report_path)
    return report
