"""`cxrlt release report`: a shadow candidate's agreement with the live release, from the server's
cxrlt_* metrics (python_backends.monitoring), with a verdict against limits.

Per finding: the images compared, the decision flips, both positive rates and their difference,
and |dp| (mean and, from the histogram, the 95th percentile). Latency: each release's batch time
on the same shadowed batches (p50, p99 and mean from the histograms). The verdict passes when every
finding's positive rate moved by at most `max_rate_diff` (default 2 points) and the candidate's p99
is at most `max_p99_increase` (default 10 %) above the live release's.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.request
from collections import defaultdict
from typing import Any, Mapping

from cxrlt.contract.served import FINDINGS_MODEL
from cxrlt.contract.monitoring import RELEASE_SECONDS, SHADOW_DELTA, SHADOW_FLIPS, SHADOW_IMAGES, SHADOW_POSITIVES

DEFAULT_MAX_RATE_DIFF = 0.02
DEFAULT_MAX_P99_INCREASE = 0.10


@dataclasses.dataclass(frozen=True)
class Limits:
    max_rate_diff: float = DEFAULT_MAX_RATE_DIFF
    max_p99_increase: float = DEFAULT_MAX_P99_INCREASE
    min_images: int = 100  # fewer compared images: no verdict yet


def read_metrics(url: str, timeout_s: float = 10.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise RuntimeError(f"could not read the server's metrics at {url} ({exc}); pass --metrics-url") from None


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    # The stub sends histograms as counters (python_backends.monitoring), which the parser names *_total.
    def name(sample: str) -> str:
        return sample[: -len("_total")] if sample.endswith(("_bucket_total", "_count_total", "_sum_total")) else sample

    return [(name(s.name), dict(s.labels), float(s.value)) for family in text_string_to_metric_families(text) for s in family.samples]


def quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative {upper bound: count} (linear within a bucket)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if not total:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def shadow_report(text: str, model: str = FINDINGS_MODEL, limits: Limits = Limits()) -> dict[str, Any]:
    """The report of every candidate shadowed by `model`, from one scrape of its metrics."""
    images: dict[str, float] = defaultdict(float)
    flips: dict[tuple[str, str], float] = defaultdict(float)
    positives: dict[tuple[str, str, str], float] = defaultdict(float)
    delta_buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    delta_sum: dict[tuple[str, str], float] = defaultdict(float)
    seconds: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    seconds_sum: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, labels, value in _samples(text):
        if labels.get("model") != model:
            continue
        release, finding = labels.get("release", ""), labels.get("finding", "")
        if name == SHADOW_IMAGES:
            images[release] += value
        elif name == SHADOW_FLIPS:
            flips[release, finding] += value
        elif name == SHADOW_POSITIVES:
            positives[release, finding, labels.get("role", "")] += value
        elif name == f"{SHADOW_DELTA}_bucket":
            delta_buckets[release, finding][float(labels["le"])] = value
        elif name == f"{SHADOW_DELTA}_sum":
            delta_sum[release, finding] += value
        elif name.startswith(RELEASE_SECONDS):
            key = (release, labels.get("role", ""))
            if name.endswith("_bucket"):
                seconds[key][float(labels["le"])] = value
            elif name.endswith("_sum"):
                seconds_sum[key][0] += value
            elif name.endswith("_count"):
                seconds_sum[key][1] += value
    reports = {}
    for release, count in images.items():
        findings = {}
        for (r, finding), buckets in delta_buckets.items():
            if r != release:
                continue
            live, shadow = positives[release, finding, "live"], positives[release, finding, "shadow"]
            findings[finding] = {"images": count, "flips": flips[release, finding], "flip_rate": flips[release, finding] / count,
                                 "positive_rate_live": live / count, "positive_rate_candidate": shadow / count,
                                 "positive_rate_diff": (shadow - live) / count,
                                 "mean_abs_dp": delta_sum[release, finding] / count, "p95_abs_dp": quantile(0.95, buckets)}
        live = [key for key in seconds if key[1] == "live"]
        latency = {"live": _latency(*_merge([seconds[k] for k in live], [seconds_sum[k] for k in live])),
                   "candidate": _latency(seconds.get((release, "shadow"), {}), seconds_sum.get((release, "shadow"), [0.0, 0.0]))}
        reports[release] = _verdict({"candidate": int(release), "images": count, "findings": findings, "latency": latency}, limits)
    return {"model": model, "limits": dataclasses.asdict(limits), "candidates": reports}


def _merge(buckets: list[dict[float, float]], sums: list[list[float]]) -> tuple[dict[float, float], list[float]]:
    merged: dict[float, float] = defaultdict(float)
    for part in buckets:
        for bound, count in part.items():
            merged[bound] += count
    return dict(merged), [sum(s[0] for s in sums), sum(s[1] for s in sums)]


def _latency(buckets: Mapping[float, float], sums: list[float]) -> dict[str, float]:
    return {"batches": sums[1], "mean_s": sums[0] / sums[1] if sums[1] else math.nan,
            "p50_s": quantile(0.5, buckets), "p99_s": quantile(0.99, buckets)}


def _verdict(report: dict[str, Any], limits: Limits) -> dict[str, Any]:
    failures = []
    if report["images"] < limits.min_images:
        failures.append(f"only {report['images']:.0f} images compared (at least {limits.min_images} for a verdict)")
    for finding, row in report["findings"].items():
        if abs(row["positive_rate_diff"]) > limits.max_rate_diff:
            failures.append(f"{finding}: positive rate {row['positive_rate_live']:.3f} -> {row['positive_rate_candidate']:.3f} "
                            f"({row['positive_rate_diff']:+.3f}, limit +-{limits.max_rate_diff:g})")
    live, candidate = report["latency"]["live"]["p99_s"], report["latency"]["candidate"]["p99_s"]
    increase = candidate / live - 1.0 if live and math.isfinite(live) and math.isfinite(candidate) else math.nan
    report["latency"]["p99_increase"] = increase
    if not math.isfinite(increase):
        failures.append("no latency of both releases on shadowed batches yet")
    elif increase > limits.max_p99_increase:
        failures.append(f"p99 batch time {live * 1000:.1f} -> {candidate * 1000:.1f} ms (+{increase:.0%}, limit "
                        f"+{limits.max_p99_increase:.0%})")
    report["passed"], report["failures"] = not failures, failures
    return report
