"""Triton's Prometheus metrics: scrape, diff two scrapes, and break time down per model.

Triton's per-model counters are cumulative; a load test scrapes before and after and
reports the difference. Durations are summed over successful requests in microseconds,
so dividing by the success count gives an average per request:

- queue: waiting in the model's scheduler (dynamic batcher, busy instances)
- compute: input copy + execute + output copy (for a Python BLS model, execute includes
  the time its own BLS calls to the networks take)
- request: end to end inside Triton (queue + compute + the server's own overhead)
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import urllib.request
from collections import defaultdict
from typing import Iterable, Mapping

COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_request_duration_us",
)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# {metric: {model: value}}, summed over versions (and failure reasons)
Snapshot = dict[str, dict[str, float]]

# The models clients call (Python BLS); every other model is a network they call.
PUBLIC_MODELS = ("cxr_findings", "cxr_classifier", "cxr_zeroshot")


class MetricsError(RuntimeError):
    """The metrics endpoint could not be read."""


def parse_prometheus(text: str, names: Iterable[str] = COUNTERS) -> Snapshot:
    """The per-model values of the named metrics in Prometheus text exposition format."""
    wanted = set(names)
    snapshot: Snapshot = {name: defaultdict(float) for name in wanted}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match or match.group(1) not in wanted:
            continue
        name, labels, value = match.groups()
        model = dict(_LABEL.findall(labels or "")).get("model")
        if model is None:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            snapshot[name][model] += number
    return {name: dict(values) for name, values in snapshot.items()}


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise MetricsError(f"could not read Triton metrics at {url}: {exc}") from exc
    return parse_prometheus(text)


def scrape_settled(url: str, before: Snapshot, expected: Mapping[str, int], timeout: float = 3.0,
                   interval: float = 0.05) -> Snapshot:
    """Scrape after a run, waiting until each model in `expected` has counted that many requests.

    Triton records a request's statistics when it releases the request, which can be a moment
    after the client has its response; a scrape right after the last response can miss it.
    Requests that never reached Triton (client-side timeouts) never count, so after `timeout`
    seconds the latest scrape is returned as it is.
    """
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(url)
        delta = diff(before, after)
        counted = {model: delta.get("nv_inference_request_success", {}).get(model, 0.0)
                   + delta.get("nv_inference_request_failure", {}).get(model, 0.0) for model in expected}
        if all(counted[model] >= wanted for model, wanted in expected.items()) or time.monotonic() >= deadline:
            return after
        time.sleep(interval)


def try_scrape(url: str | None, before: Snapshot | None = None,
               expected: Mapping[str, int] | None = None) -> tuple[Snapshot | None, str | None]:
    """(snapshot, None), or (None, why there is none): a run reports without Triton's figures
    rather than failing. With `before`, the scrape after a run (`scrape_settled`)."""
    if url is None:
        return None, "metrics disabled"
    try:
        return (scrape(url) if before is None else scrape_settled(url, before, expected or {})), None
    except MetricsError as exc:
        return None, str(exc)


def diff(before: Snapshot, after: Snapshot) -> Snapshot:
    out: Snapshot = {}
    for name, values in after.items():
        previous = before.get(name, {})
        out[name] = {model: value - previous.get(model, 0.0) for model, value in values.items()}
    return out


def add(total: Snapshot | None, delta: Snapshot) -> Snapshot:
    """Sum two diffs (e.g. the served runs of several benchmark rounds)."""
    if total is None:
        return {name: dict(values) for name, values in delta.items()}
    out = {name: dict(values) for name, values in total.items()}
    for name, values in delta.items():
        target = out.setdefault(name, {})
        for model, value in values.items():
            target[model] = target.get(model, 0.0) + value
    return out


@dataclasses.dataclass
class ModelTime:
    """One model's share of a run, averaged per successful request (milliseconds)."""

    model: str
    requests: int  # successful requests (for a network model: BLS calls from the pipelines)
    failures: int
    inferences: int  # images (batch entries) inferred
    executions: int  # model executions (a dynamic batch is one)
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    request_ms: float

    @property
    def compute_ms(self) -> float:
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms

    @property
    def avg_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0

    @property
    def queue_share(self) -> float:
        """Queue time as a fraction of the time a request spent in this model."""
        return self.queue_ms / self.request_ms if self.request_ms > 0 else 0.0

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(compute_ms=self.compute_ms, avg_batch=self.avg_batch, queue_share=self.queue_share)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()}


def per_model(delta: Snapshot) -> list[ModelTime]:
    """Per-model averages from a diff of two scrapes; models that saw no request are left out."""

    def value(name: str, model: str) -> float:
        return delta.get(name, {}).get(model, 0.0)

    models = sorted({m for values in delta.values() for m in values})
    rows = []
    for model in models:
        success = value("nv_inference_request_success", model)
        failures = value("nv_inference_request_failure", model)
        if success <= 0 and failures <= 0:
            continue

        def avg_ms(name: str) -> float:
            return value(name, model) / success / 1000.0 if success > 0 else 0.0

        rows.append(
            ModelTime(
                model=model,
                requests=int(round(success)),
                failures=int(round(failures)),
                inferences=int(round(value("nv_inference_count", model))),
                executions=int(round(value("nv_inference_exec_count", model))),
                queue_ms=avg_ms("nv_inference_queue_duration_us"),
                compute_input_ms=avg_ms("nv_inference_compute_input_duration_us"),
                compute_infer_ms=avg_ms("nv_inference_compute_infer_duration_us"),
                compute_output_ms=avg_ms("nv_inference_compute_output_duration_us"),
                request_ms=avg_ms("nv_inference_request_duration_us"),
            )
        )
    # The public models first, then the networks they call.
    rows.sort(key=lambda r: (PUBLIC_MODELS.index(r.model) if r.model in PUBLIC_MODELS else len(PUBLIC_MODELS), r.model))
    return rows


def member_calls_per_image(rows: Iterable[ModelTime], entry_model: str) -> dict[str, float | None]:
    """The network models' requests and executions per image `entry_model` classified.

    Every network request is a BLS call, so this is what a BLS model spends per image: one
    call per member and image (4 for cxr_classifier: the router and three members) unless it
    stacks several images into one call; executions also count what the dynamic batcher merged.
    `requests_per_image_by_network` has each network model's own figure: below 1 when the BLS
    stacks. None without a figure for the entry model.
    """
    rows = list(rows)
    images = next((r.inferences for r in rows if r.model == entry_model), 0)
    networks = [r for r in rows if r.model not in PUBLIC_MODELS]
    if images <= 0:
        return {"member_requests_per_image": None, "member_executions_per_image": None, "requests_per_image_by_network": None}
    return {"member_requests_per_image": round(sum(r.requests for r in networks) / images, 3),
            "member_executions_per_image": round(sum(r.executions for r in networks) / images, 3),
            "requests_per_image_by_network": {r.model: round(r.requests / images, 3) for r in networks}}


def default_metrics_url(grpc_url: str, port: int = 8002) -> str:
    """Triton's default metrics URL on the gRPC endpoint's host (ports 8000/8001/8002)."""
    host = grpc_url.split("://", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
    return f"http://{host}:{port}/metrics"


def breakdown_table(rows: Iterable[ModelTime], title: str):
    """A rich Table of per-model queue vs compute time."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption="queue/compute/request: ms per successful request; batch: images per execution")
    table.add_column("model", no_wrap=True)
    for column in ("reqs", "fails", "execs", "batch", "queue", "compute", "request", "queue%"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r.model, str(r.requests), str(r.failures), str(r.executions), f"{r.avg_batch:.2f}",
                      f"{r.queue_ms:.2f}", f"{r.compute_ms:.2f}", f"{r.request_ms:.2f}", f"{100 * r.queue_share:.0f}%")
    return table


def print_wide(console, renderable, width: int = 120) -> None:
    """Print a table at full width when the output is a file or a pipe (rich assumes 80 columns there)."""
    if console.is_terminal or console.width >= width:
        console.print(renderable)
        return
    from rich.console import Console

    Console(file=console.file, width=width, highlight=False).print(renderable)


def breakdown_json(rows: Iterable[ModelTime]) -> Mapping[str, dict]:
    return {r.model: r.to_json() for r in rows}
