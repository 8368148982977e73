"""The pipeline's own metrics, on Triton's `/metrics` (Python-backend custom metrics).

Each pipeline model (cxr_classifier, cxr_zeroshot, cxr_findings) counts what it answered, so a
Prometheus scraping Triton sees the model's output distribution next to Triton's own latency
figures, and the drift rules (`cxrlt monitoring-rules`, docs/monitoring.md) compare it with the
repository's validation baseline. Every name starts with ``cxrlt_`` (docs/contract.md lists them):

- ``cxrlt_images_total{model}``: images answered with results.
- ``cxrlt_positive_decisions_total{model, finding, projection}``: positive decisions (DECISIONS 1;
  for a finding without an operating point, probability > 0.5).
- ``cxrlt_probability_bucket{model, finding, projection, le}``, ``_count``, ``_sum``: histogram of
  PROBABILITIES; ``_count`` is the images scored for that finding.
- ``cxrlt_projections_total{model, projection, source}``: images per projection used, chosen by
  the ``hint`` or the ``router``.
- ``cxrlt_hint_disagreements_total{model, projection}``: a hint chose ``projection`` while the
  router gave it a probability under 0.5.
- ``cxrlt_refusals_total{model, reason}``: requests refused (``invalid_input``,
  ``out_of_distribution``).
- ``cxrlt_ood_score_bucket{model, le}``, ``_count``, ``_sum``: histogram of OOD_SCORE (images with a
  finite score, refused ones too).

``projection`` is ``frontal`` or ``lateral`` (``none`` where the model does not route:
cxr_zeroshot). Triton shares a family and its labelled metrics across a model's instances, so the
counts are per model, not per instance.

Cost: a metric update is a message from the stub to Triton (about 18 us each, measured on the
bundled 2.51), and 36 findings x 2 projections of histograms are hundreds of series. So updates are
summed in numpy by the batches and sent every ``metrics_flush_s`` seconds (config parameter,
default 5; 0: at every batch) by a thread of the stub, one increment per changed series (checked on
the bundled 2.51: a stub thread's increments are exact beside the model's own). A histogram is
therefore a set of counters (``_bucket`` with cumulative ``le``, ``_count``, ``_sum``):
``histogram_quantile`` reads it as it reads a native one, and it takes a whole batch's counts at
once, where the native HISTOGRAM takes one ``observe`` per value. ``metrics: "false"`` turns it off.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from cxrlt.contract.monitoring import (COUNTERS, DEFAULT_DECISION, DELTA_BUCKETS, DISAGREEMENTS, HISTOGRAMS, IMAGES,
                                       INVALID_INPUT, OOD_BUCKET_FACTORS, OOD_SCORE, OUT_OF_DISTRIBUTION, POSITIVES,
                                       PROBABILITY, PROBABILITY_BUCKETS, PROJECTION_LABELS, PROJECTIONS, REFUSAL_REASONS,
                                       REFUSALS, RELEASE_ANSWERS, RELEASE_COUNTERS, RELEASE_HISTOGRAMS, RELEASE_SECONDS,
                                       SECONDS_BUCKETS, SHADOW_DELTA, SHADOW_FLIPS, SHADOW_IMAGES, SHADOW_POSITIVES, UNROUTED)
from python_backends import bls
from python_backends.pipeline_errors import RequestError
from python_backends.triton_params import optional_number

ENABLE_PARAMETER = "metrics"  # pipeline config: "false" turns the metrics off
FLUSH_PARAMETER = "metrics_flush_s"  # pipeline config: seconds between sends to Triton (0: every batch)
DEFAULT_FLUSH_S = 5.0

_HELP = {
    IMAGES: "Images the pipeline model answered with results",
    POSITIVES: "Positive decisions per finding and projection (operating point; probability > 0.5 without one)",
    PROBABILITY: "Served probability per finding and projection",
    PROJECTIONS: "Images per projection used and what chose it (hint or router)",
    DISAGREEMENTS: "Images whose hint chose a projection the router gave a probability under 0.5",
    REFUSALS: "Requests refused, by reason (invalid_input, out_of_distribution)",
    OOD_SCORE: "Out-of-distribution score of each scored image (refused ones too)",
    RELEASE_ANSWERS: "Images answered per release and role (live, canary)",
    RELEASE_SECONDS: "Seconds a release's pipeline took on a batch, per role (live, canary, shadow)",
    SHADOW_IMAGES: "Images a candidate release also ran in shadow",
    SHADOW_FLIPS: "Shadowed images whose candidate decision differs from the live one, per finding",
    SHADOW_POSITIVES: "Positive decisions on shadowed images, per finding, of the live release and of the candidate",
    SHADOW_DELTA: "|candidate probability - live probability| on shadowed images, per finding",
}


class _Histogram:
    """Cumulative bucket counts, count and sum of a [rows, columns] grid of histograms."""

    def __init__(self, bounds: Sequence[float], shape: tuple[int, ...]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.buckets = np.zeros((*shape, len(bounds) + 1), dtype=np.int64)  # the last: +Inf
        self.sums = np.zeros(shape, dtype=np.float64)

    def add(self, index: Any, values: np.ndarray) -> None:
        """Add values [n, *shape[index]] to the histograms at `index`."""
        below = values[..., None] <= self.bounds
        self.buckets[index] += np.concatenate([below, np.ones_like(below[..., :1])], axis=-1).sum(axis=0)
        self.sums[index] += values.sum(axis=0)


class PipelineMetrics:
    """One pipeline model's metric families. The batches' counts are summed in numpy; `flush` sends
    them to Triton, every `flush_s` seconds from a daemon thread (`start`; `flush_s` 0: at every
    update, no thread), so the cost does not grow with the traffic."""

    def __init__(self, model: str, labels: Sequence[str], ood_threshold: float | None = None,
                 api: Any = None, flush_s: float = DEFAULT_FLUSH_S, routed: bool = True) -> None:
        api = api if api is not None else bls.pb_utils
        self.model, self.labels, self.flush_s = model, tuple(labels), flush_s
        self.projections = PROJECTION_LABELS[:2] if routed else (UNROUTED,)  # what its images can be
        family = api.MetricFamily
        names = {name: _HELP[name] for name in (*COUNTERS, *RELEASE_COUNTERS)}
        names.update({f"{h}_{part}": _HELP[h] for h in (*HISTOGRAMS, *RELEASE_HISTOGRAMS) for part in ("bucket", "count", "sum")})
        self._families = {name: family(name=name, description=text, kind=family.COUNTER) for name, text in names.items()}
        self._metrics: dict[tuple, Any] = {}
        scale = ood_threshold if ood_threshold and math.isfinite(ood_threshold) and ood_threshold > 0 else 1.0
        self.ood_buckets = tuple(round(f * scale, 6) for f in OOD_BUCKET_FACTORS)
        self._images = 0
        self._positives = np.zeros((len(PROJECTION_LABELS), len(self.labels)), dtype=np.int64)
        self._probability = _Histogram(PROBABILITY_BUCKETS, self._positives.shape)
        self._ood = _Histogram(self.ood_buckets, ())
        self._tallies: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._lock = threading.Lock()  # the counts: batches add, the flusher takes
        self._sending = threading.Lock()  # one flush at a time, in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any], params: Mapping[str, str], labels: Sequence[str]) -> "PipelineMetrics | None":
        """The metrics of the model `initialize(args)` describes; None when its config turns them off
        (parameter ``metrics: "false"``) or the stub has no custom metrics (Triton before 23.05)."""
        if params.get(ENABLE_PARAMETER, "true").strip().lower() in ("0", "false", "no", "off"):
            return None
        if not hasattr(bls.pb_utils, "MetricFamily"):
            return None
        flush_s = optional_number(params.get(FLUSH_PARAMETER, str(DEFAULT_FLUSH_S)))
        metrics = cls(args.get("model_name", "unknown"), labels, optional_number(params.get("ood_threshold", "")),
                      flush_s=DEFAULT_FLUSH_S if flush_s is None else max(flush_s, 0.0),
                      routed="classifier" in params.get("tasks", "classifier").split(","))
        return metrics.start()

    def declare(self) -> None:
        """Create every series the model can update, at 0: Prometheus's increase() counts a counter's
        first increment only when the series existed before it, and a rate whose numerator never
        moved (a finding never called positive) still exists."""
        self._metric(IMAGES)
        for label in self.labels:
            for projection in self.projections:
                labels = (("finding", label), ("projection", projection))
                self._metric(POSITIVES, labels)
                self._declare_histogram(PROBABILITY, PROBABILITY_BUCKETS, labels)
        for projection in self.projections if self.projections != (UNROUTED,) else ():
            for source in ("hint", "router"):
                self._metric(PROJECTIONS, (("projection", projection), ("source", source)))
            self._metric(DISAGREEMENTS, (("projection", projection),))
        for reason in REFUSAL_REASONS:
            self._metric(REFUSALS, (("reason", reason),))
        self._declare_histogram(OOD_SCORE, self.ood_buckets, ())

    def _declare_histogram(self, name: str, bounds: Sequence[float], labels: tuple[tuple[str, str], ...]) -> None:
        for bound in (*(f"{b:g}" for b in bounds), "+Inf"):
            self._metric(f"{name}_bucket", (*labels, ("le", bound)))
        self._metric(f"{name}_count", labels)
        self._metric(f"{name}_sum", labels)

    def start(self) -> "PipelineMetrics":
        """Declare the series and start the flusher thread (none when `flush_s` is 0: every update
        is sent at once)."""
        self.declare()
        if self.flush_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._flush_every, name="cxrlt-metrics", daemon=True)
            self._thread.start()
        return self

    def _flush_every(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        """Stop the flusher and send what is left (the model's `finalize`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _metric(self, name: str, labels: tuple[tuple[str, str], ...] = ()) -> Any:
        metric = self._metrics.get((name, labels))
        if metric is None:
            metric = self._families[name].Metric(labels={"model": self.model, **dict(labels)})
            self._metrics[name, labels] = metric
        return metric

    def _tally(self, name: str, count: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self._tallies[key] = self._tallies.get(key, 0) + count

    def classified(self, probabilities: np.ndarray, decisions: np.ndarray, projections: Sequence[str | None],
                   sources: Sequence[str | None] | None = None, router_scores: Sequence[float] | None = None,
                   ood_scores: Sequence[float] | None = None) -> None:
        """Count one answered batch: probabilities and DECISIONS [B, labels] (-1: no decision),
        each image's projection used (None: not routed), what chose it (``hint``, ``router``), the
        router's probability of it (a hint the router scores under 0.5 is a disagreement), and its
        OOD score when the model has a gate."""
        probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(self.labels))
        if not len(probabilities):
            return
        rows = np.asarray([PROJECTION_LABELS.index(p) if p in PROJECTION_LABELS else 2 for p in projections])
        positive = _positives(probabilities, np.asarray(decisions).reshape(probabilities.shape))
        with self._lock:
            self._add(probabilities, positive, rows, projections, sources, router_scores, ood_scores)
        self._maybe_flush()

    def _add(self, probabilities: np.ndarray, positive: np.ndarray, rows: np.ndarray, projections: Sequence[str | None],
             sources: Sequence[str | None] | None, router_scores: Sequence[float] | None,
             ood_scores: Sequence[float] | None) -> None:
        self._images += len(probabilities)
        for row in np.unique(rows):
            mine = rows == row
            self._positives[row] += positive[mine].sum(axis=0)
            self._probability.add(row, probabilities[mine])
        for projection, source, score in zip(projections, sources or (), router_scores or [1.0] * len(rows)):
            if projection in PROJECTION_LABELS[:2] and source is not None:
                self._tally(PROJECTIONS, 1, projection=projection, source=source)
                if source == "hint" and float(score) < 0.5:
                    self._tally(DISAGREEMENTS, 1, projection=projection)
        if ood_scores is not None:
            self._observe_ood(ood_scores)

    def _observe_ood(self, scores: Sequence[float]) -> None:
        """Add OOD scores to the histogram (non-finite ones, from a repository without a gate, are skipped)."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size:
            self._ood.add((), values)

    def refused_errors(self, outcomes: Sequence[Any]) -> None:
        """Count the refusals (RequestError: INVALID_ARGUMENT) among a batch's outcomes, by reason
        (:func:`refusal`). A gate refusal's score joins the OOD histogram."""
        refusals = [refusal(error) for error in outcomes if isinstance(error, RequestError)]
        if not refusals:
            return
        with self._lock:
            for reason, score in refusals:
                self._tally(REFUSALS, 1, reason=reason)
                if score is not None:
                    self._observe_ood([score])
        self._maybe_flush()

    def release_answered(self, release: int, role: str, images: int, seconds: float) -> None:
        """Count a release's answered batch (`role`: live or canary; shadow runs count in `shadowed`)."""
        with self._lock:
            if images:
                self._tally(RELEASE_ANSWERS, images, release=str(release), role=role)
            self._tally_histogram(RELEASE_SECONDS, SECONDS_BUCKETS, [seconds], release=str(release), role=role)
        self._maybe_flush()

    def shadowed(self, release: int, live: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray],
                 seconds: float) -> None:
        """Compare candidate `release`'s (probabilities, DECISIONS) [B, labels] on shadowed images with
        the live release's: decision flips, |dp| and both positive counts per finding."""
        (live_p, live_d), (cand_p, cand_d) = live, candidate
        live_pos, cand_pos = _positives(live_p, live_d), _positives(cand_p, cand_d)
        delta = np.abs(np.asarray(cand_p, dtype=np.float64) - np.asarray(live_p, dtype=np.float64))
        tag = str(release)
        with self._lock:
            self._tally(SHADOW_IMAGES, len(live_p), release=tag)
            self._tally_histogram(RELEASE_SECONDS, SECONDS_BUCKETS, [seconds], release=tag, role="shadow")
            for k, finding in enumerate(self.labels):
                flips, live_n, cand_n = (int(np.sum(live_pos[:, k] != cand_pos[:, k])), int(np.sum(live_pos[:, k])),
                                         int(np.sum(cand_pos[:, k])))
                for name, count, extra in ((SHADOW_FLIPS, flips, {}), (SHADOW_POSITIVES, live_n, {"role": "live"}),
                                           (SHADOW_POSITIVES, cand_n, {"role": "shadow"})):
                    if count:
                        self._tally(name, count, release=tag, finding=finding, **extra)
                self._tally_histogram(SHADOW_DELTA, DELTA_BUCKETS, delta[:, k], release=tag, finding=finding)
        self._maybe_flush()

    def _tally_histogram(self, name: str, bounds: Sequence[float], values: Sequence[float], **labels: str) -> None:
        """Add values to histogram `name` with `labels` as its counters (cumulative ``le`` buckets)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not values.size:
            return
        for bound in bounds:
            below = int(np.sum(values <= bound))
            if below:
                self._tally(f"{name}_bucket", below, le=f"{bound:g}", **labels)
        self._tally(f"{name}_bucket", values.size, le="+Inf", **labels)
        self._tally(f"{name}_count", values.size, **labels)
        self._tally(f"{name}_sum", float(values.sum()), **labels)

    def _maybe_flush(self) -> None:
        if self.flush_s <= 0:
            self.flush()

    def _take(self) -> tuple[int, np.ndarray, _Histogram, _Histogram, dict]:
        """The counts since the last flush, leaving zeros."""
        with self._lock:
            taken = (self._images, self._positives, self._probability, self._ood, self._tallies)
            self._images, self._tallies = 0, {}
            self._positives = np.zeros_like(taken[1])
            self._probability = _Histogram(PROBABILITY_BUCKETS, taken[1].shape)
            self._ood = _Histogram(self.ood_buckets, ())
        return taken

    def flush(self) -> None:
        """Send what was counted since the last flush to Triton (one increment per changed series).
        A finding's positives follow its images scored at once, so a scrape in the middle of a flush
        sees both or neither (the drift rules divide one by the other)."""
        with self._sending:
            images, positives, probability, ood, tallies = self._take()
            if images:
                self._metric(IMAGES).increment(images)
            for (row, column), total in np.ndenumerate(probability.buckets[..., -1]):
                if total:
                    labels = (("finding", self.labels[column]), ("projection", PROJECTION_LABELS[row]))
                    self._send_histogram(PROBABILITY, probability, (row, column), PROBABILITY_BUCKETS, labels)
                    if positives[row, column]:
                        self._metric(POSITIVES, labels).increment(int(positives[row, column]))
            if ood.buckets[-1]:
                self._send_histogram(OOD_SCORE, ood, (), self.ood_buckets, ())
            for (name, labels), count in tallies.items():
                self._metric(name, labels).increment(count)

    def _send_histogram(self, name: str, histogram: _Histogram, index: Any, bounds: Sequence[float],
                        labels: tuple[tuple[str, str], ...]) -> None:
        counts = histogram.buckets[index]
        for bound, count in zip((*(f"{b:g}" for b in bounds), "+Inf"), counts):
            if count:
                self._metric(f"{name}_bucket", (*labels, ("le", bound))).increment(int(count))
        self._metric(f"{name}_count", labels).increment(int(counts[-1]))
        self._metric(f"{name}_sum", labels).increment(float(histogram.sums[index]))


_GATE_REFUSAL = re.compile(r"not a chest radiograph \(out-of-distribution score ([-+0-9.eE]+|nan|inf) >")


def refusal(error: BaseException) -> tuple[str, float | None]:
    """A refused request's reason and, for the gate's refusals, its OOD score, read from the gate's
    message (cxrlt.contract.ood_gate.refusal_message); any other refusal is ``invalid_input``."""
    found = _GATE_REFUSAL.search(str(error))
    return (OUT_OF_DISTRIBUTION, float(found.group(1))) if found else (INVALID_INPUT, None)


def _positives(probabilities: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """Positive per image and finding: the decision where there is one, else probability > 0.5."""
    return np.where(decisions >= 0, decisions == 1, probabilities > DEFAULT_DECISION)
