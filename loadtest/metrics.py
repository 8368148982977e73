"""Triton's Prometheus metrics: scrape before and after a run, diff, and break time down per model.

Durations are summed over successful requests in microseconds. queue: waiting in the model's
scheduler; compute: input copy + execute + output copy (a BLS model's execute includes its calls
to the networks); request: end to end inside Triton.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from collections import defaultdict
from typing import Any, Iterable, Mapping

import pandas as pd

from loadtest.kernel import MODELS

# per_model's column -> Triton counter: counts, then durations (averaged per successful request, in ms)
COUNTS = {"requests": "nv_inference_request_success", "failures": "nv_inference_request_failure",
          "inferences": "nv_inference_count", "executions": "nv_inference_exec_count"}
DURATIONS = {"queue_ms": "nv_inference_queue_duration_us", "compute_input_ms": "nv_inference_compute_input_duration_us",
             "compute_infer_ms": "nv_inference_compute_infer_duration_us",
             "compute_output_ms": "nv_inference_compute_output_duration_us",
             "request_ms": "nv_inference_request_duration_us"}
COUNTERS = (*COUNTS.values(), *DURATIONS.values())
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Snapshot = dict[str, dict[str, float]]  # {metric: {model: value}}, summed over versions (and failure reasons)


class MetricsError(RuntimeError):
    """The metrics endpoint could not be read."""


def parse_prometheus(text: str, names: Iterable[str] = COUNTERS) -> Snapshot:
    """The per-model values of the named metrics in Prometheus text exposition format."""
    snapshot: Snapshot = {name: defaultdict(float) for name in names}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or match.group(1) not in snapshot:
            continue
        name, labels, value = match.groups()
        model = dict(_LABEL.findall(labels or "")).get("model")
        try:
            number = float(value)
        except ValueError:
            continue
        if model is not None and math.isfinite(number):
            snapshot[name][model] += number
    return {name: dict(values) for name, values in snapshot.items()}


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_prometheus(response.read().decode("utf-8", errors="replace"))
    except OSError as exc:
        raise MetricsError(f"could not read Triton metrics at {url}: {exc}") from exc


def scrape_settled(url: str, before: Snapshot, expected: Mapping[str, int], timeout: float = 3.0,
                   interval: float = 0.05) -> Snapshot:
    """Scrape after a run, waiting (up to `timeout`) until each model in `expected` has counted that many
    requests: Triton counts a request when it releases it, a moment after the client has its response,
    and a request that never reached Triton (a client timeout) never counts."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(url)
        delta = diff(before, after)
        if time.monotonic() >= deadline or all(sum(delta.get(COUNTS[k], {}).get(model, 0.0) for k in ("requests", "failures"))
                                               >= wanted for model, wanted in expected.items()):
            return after
        time.sleep(interval)


def try_scrape(url: str | None, before: Snapshot | None = None,
               expected: Mapping[str, int] | None = None) -> tuple[Snapshot | None, str | None]:
    """(snapshot, None), or (None, why there is none): a run reports without Triton's figures rather than
    failing. With `before`, the scrape after a run (`scrape_settled`)."""
    if url is None:
        return None, "metrics disabled"
    try:
        return (scrape(url) if before is None else scrape_settled(url, before, expected or {})), None
    except MetricsError as exc:
        return None, str(exc)


def diff(before: Snapshot, after: Snapshot) -> Snapshot:
    return {name: {model: value - before.get(name, {}).get(model, 0.0) for model, value in values.items()}
            for name, values in after.items()}


def add(total: Snapshot | None, delta: Snapshot) -> Snapshot:
    """Sum two diffs (e.g. the served runs of several benchmark rounds)."""
    out = {name: dict(values) for name, values in (total or {}).items()}
    for name, values in delta.items():
        for model, value in values.items():
            out.setdefault(name, {})[model] = out.get(name, {}).get(model, 0.0) + value
    return out


def per_model(delta: Snapshot) -> pd.DataFrame:
    """One row per model from a diff of two scrapes, the public models first, models without requests left out:
    its counts (requests: successful ones, for a network model the BLS calls from the pipelines; inferences: images
    inferred; executions: a dynamic batch is one) and its times averaged per successful request in ms."""
    frame = pd.DataFrame({key: pd.Series(delta.get(name, {}), dtype=float) for key, name in {**COUNTS, **DURATIONS}.items()})
    frame = frame.fillna(0.0)
    frame = frame[(frame.requests > 0) | (frame.failures > 0)]
    frame[list(DURATIONS)] = frame[list(DURATIONS)].div(frame.requests.where(frame.requests > 0), axis=0).fillna(0.0) / 1000.0
    frame[list(COUNTS)] = frame[list(COUNTS)].round().astype(int)
    frame["compute_ms"] = frame.compute_input_ms + frame.compute_infer_ms + frame.compute_output_ms
    frame["avg_batch"] = (frame.inferences / frame.executions.where(frame.executions > 0)).fillna(0.0)
    frame["queue_share"] = (frame.queue_ms / frame.request_ms.where(frame.request_ms > 0)).fillna(0.0)
    order = sorted(frame.index, key=lambda model: (MODELS.index(model) if model in MODELS else len(MODELS), model))
    return frame.loc[order].round(3)


def breakdown_json(delta: Snapshot) -> dict[str, dict[str, Any]]:
    return per_model(delta).to_dict("index")


def member_calls_per_image(rows: pd.DataFrame, entry_model: str) -> dict[str, Any]:
    """The network models' requests (BLS calls) and executions per image `entry_model` classified: one call
    per member and image unless the BLS stacks images; executions also count what the batcher merged."""
    images = rows.inferences.get(entry_model, 0)
    networks = rows[~rows.index.isin(MODELS)]
    if images <= 0:
        return dict.fromkeys(("member_requests_per_image", "member_executions_per_image", "requests_per_image_by_network"))
    return {"member_requests_per_image": round(networks.requests.sum() / images, 3),
            "member_executions_per_image": round(networks.executions.sum() / images, 3),
            "requests_per_image_by_network": (networks.requests / images).round(3).to_dict()}


def default_metrics_url(grpc_url: str, port: int = 8002) -> str:
    """Triton's default metrics URL on the gRPC endpoint's host."""
    host = grpc_url.split("://", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
    return f"http://{host}:{port}/metrics"
