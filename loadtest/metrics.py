"""Triton's Prometheus metrics: scrape before and after a run, diff, and break time down per model.

Durations are summed over successful requests in microseconds. queue: waiting in the model's scheduler; compute: input copy +
execute + output copy (a BLS model's execute includes its calls to the networks); request: end to end inside Triton."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Mapping

import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from cxrlt.client.release_report import read_metrics
from loadtest.kernel import MODELS

# per_model's column -> Triton counter: counts, then durations (averaged per successful request, in ms)
COUNTS = {"requests": "nv_inference_request_success", "failures": "nv_inference_request_failure",
          "inferences": "nv_inference_count", "executions": "nv_inference_exec_count"}
DURATIONS = {"queue_ms": "nv_inference_queue_duration_us", "compute_input_ms": "nv_inference_compute_input_duration_us",
             "compute_infer_ms": "nv_inference_compute_infer_duration_us",
             "compute_output_ms": "nv_inference_compute_output_duration_us", "request_ms": "nv_inference_request_duration_us"}
COUNTERS = (*COUNTS.values(), *DURATIONS.values())
Snapshot = dict[str, dict[str, float]]  # {metric: {model: value}}, summed over versions (and failure reasons)


def parse_prometheus(text: str) -> Snapshot:
    """The per-model values of Triton's COUNTERS in Prometheus text exposition format."""
    snapshot: dict[str, Counter] = {name: Counter() for name in COUNTERS}
    for family in text_string_to_metric_families(text):  # a counter family's name has no "_total"
        for sample in family.samples if family.name in snapshot else ():
            if "model" in sample.labels and math.isfinite(sample.value):
                snapshot[family.name][sample.labels["model"]] += sample.value
    return {name: dict(values) for name, values in snapshot.items()}


def scrape(url: str, before: Snapshot | None = None, expected: Mapping[str, int] | None = None, settle_s: float = 3.0,
           interval: float = 0.05) -> Snapshot:
    """One scrape; with `before`, the scrape after a run, taken once each model in `expected` has counted that many
    requests (or after `settle_s`): Triton counts a request when it releases it, a moment after the client has its
    response, and a request that never reached Triton (a client timeout) never counts."""
    deadline = time.monotonic() + settle_s
    while True:
        after = parse_prometheus(read_metrics(url, timeout_s=5.0))
        if before is None or time.monotonic() >= deadline:
            return after
        counted = diff(before, after)[[COUNTS["requests"], COUNTS["failures"]]].sum(axis=1)
        if all(counted.get(model, 0.0) >= wanted for model, wanted in (expected or {}).items()):
            return after
        time.sleep(interval)


def diff(before: Snapshot, after: Snapshot) -> pd.DataFrame:
    """What each counter grew by between two scrapes: one row per model, one column per counter."""
    return pd.DataFrame(after).sub(pd.DataFrame(before), fill_value=0.0).reindex(columns=COUNTERS).fillna(0.0)


class Counters:
    """Triton's counters over a span of a run, scraped when made; a run reports without Triton's figures rather than failing
    (`error` says why there are none: the metrics disabled, or `read_metrics`'s RuntimeError)."""

    def __init__(self, url: str | None) -> None:
        self.url, self.before, self.error = url, None, "metrics disabled" if url is None else None
        try:
            self.before = scrape(url) if url is not None else None
        except RuntimeError as exc:
            self.error = str(exc)

    def grown(self, expected: Mapping[str, int]) -> pd.DataFrame | None:
        """What each counter grew by since (`scrape` after a run), or None."""
        if self.before is None:
            return None
        try:
            return diff(self.before, scrape(self.url, self.before, expected))
        except RuntimeError as exc:
            self.error = str(exc)
            return None


def per_model(delta: pd.DataFrame) -> pd.DataFrame:
    """One row per model from a diff of two scrapes, the public models first, models without requests left out:
    its counts (requests: successful ones, for a network model the BLS calls from the pipelines; inferences: images
    inferred; executions: a dynamic batch is one) and its times averaged per successful request in ms."""
    frame = delta.rename(columns={name: key for key, name in {**COUNTS, **DURATIONS}.items()})
    frame = frame[(frame.requests > 0) | (frame.failures > 0)].copy()
    frame[list(DURATIONS)] = frame[list(DURATIONS)].div(frame.requests.where(frame.requests > 0), axis=0).fillna(0.0) / 1000.0
    frame[list(COUNTS)] = frame[list(COUNTS)].round().astype(int)
    frame["compute_ms"] = frame.compute_input_ms + frame.compute_infer_ms + frame.compute_output_ms
    frame["avg_batch"] = (frame.inferences / frame.executions.where(frame.executions > 0)).fillna(0.0)
    frame["queue_share"] = (frame.queue_ms / frame.request_ms.where(frame.request_ms > 0)).fillna(0.0)
    order = sorted(frame.index, key=lambda model: (MODELS.index(model) if model in MODELS else len(MODELS), model))
    return frame.loc[order].round(3)


def breakdown_json(delta: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return per_model(delta).to_dict("index")


def member_calls_per_image(rows: pd.DataFrame, entry_model: str) -> dict[str, Any]:
    """The network models' requests (BLS calls) and executions per image `entry_model` classified: one call
    per member and image unless the BLS stacks images; executions also count what the batcher merged."""
    images, networks = rows.inferences.get(entry_model, 0), rows[~rows.index.isin(MODELS)]
    if images <= 0:
        return dict.fromkeys(("member_requests_per_image", "member_executions_per_image", "requests_per_image_by_network"))
    return {"member_requests_per_image": round(networks.requests.sum() / images, 3),
            "member_executions_per_image": round(networks.executions.sum() / images, 3),
            "requests_per_image_by_network": (networks.requests / images).round(3).to_dict()}
