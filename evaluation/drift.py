"""Drift alarms: Prometheus recording and alerting rules from a repository's monitoring baseline,
and the simulation that chooses their window and thresholds.

Prometheus windows are time; the rules count images: every rate is a ratio of increase() of the
pipeline's counters (python_backends.monitoring) over one window of `window_s` seconds, sized as
`window_images / images_per_second`, and an alarm needs at least half a window of images. Over
that window, with n images:

(n in the bands is the images the ratio is computed on. increase() extrapolates the counters'
growth between the first and the last scrape inside the window to the whole window: on average
the scrapes span `window_s - scrape_interval_s`, so the recorded counts overstate the images the
rate is measured on by window_s / (window_s - scrape_interval_s), and a band from the recorded
count alone is too narrow: 4/3 of the variance with 1 s scrapes over a 4 s window, 1.43 with
Prometheus's default 1 min over 200 s. The bands use n = recorded count x (1 - scrape_interval_s /
window_s).)

- CxrltFindingRateDrift (per finding): the rate of positive decisions leaves its binomial band,
  |rate - p| > z * sqrt(p (1 - p) (1/n + 1/n_val)) + z^2 / (2 n), p the baseline's rate on n_val
  validation images (the second variance term is the baseline's own error; z^2/(2n) the Wilson
  correction that keeps rare findings' upper tail honest), z Bonferroni-corrected over the 36
  findings: z = Phi^-1(1 - alpha / (2 * 36)).
- CxrltProjectionMixDrift: the fraction of lateral images leaves the same band (z = Phi^-1(1 - alpha/2)).
- CxrltOodRefusalRateHigh: the gate's refusal rate rises above its band (one-sided).
- CxrltOodScoreMeanHigh: the mean OOD score rises by more than z * sd * sqrt(1/n + 1/n_val).

`simulate` replays in-distribution streams (Bernoulli decisions at the baseline's rates, each
stream against a baseline re-estimated from n_val images) and shifted ones, evaluating the rules
every `eval_every` images over a sliding window, and reports false alarms per 10,000 images and
images to alarm; docs/monitoring.md has the figures behind the defaults.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Any, Mapping

import numpy as np

from cxrlt.contract.monitoring import IMAGES, OOD_SCORE, OUT_OF_DISTRIBUTION, POSITIVES, PROBABILITY, PROJECTIONS, REFUSALS

DEFAULT_WINDOW_IMAGES = 200
DEFAULT_IMAGES_PER_SECOND = 1.0
DEFAULT_ALPHA = 1e-3  # family-wise false-alarm probability of one evaluation of one alert
DEFAULT_SCRAPE_INTERVAL_S = 15.0  # deploy/base/servicemonitor-triton.yaml
FINDINGS_TESTED = 36
GROUP_RECORDING = "cxrlt-drift.recording"
GROUP_BASELINE = "cxrlt-drift.baseline"
GROUP_ALERTS = "cxrlt-drift.alerts"
ALERTS = ("CxrltFindingRateDrift", "CxrltProjectionMixDrift", "CxrltOodRefusalRateHigh", "CxrltOodScoreMeanHigh")
# Recorded series (what the Grafana dashboard and `cxrlt monitor` read).
RATE = "cxrlt:finding_positive_rate:window"
FINDING_IMAGES = "cxrlt:finding_images:window"
LATERAL = "cxrlt:lateral_fraction:window"
ROUTED = "cxrlt:routed_images:window"
OOD_IMAGES = "cxrlt:ood_scored_images:window"
OOD_REFUSALS = "cxrlt:ood_refusal_rate:window"
OOD_MEAN = "cxrlt:ood_score_mean:window"
BASE_RATE = "cxrlt:baseline_positive_rate"
BASE_VARIANCE = "cxrlt:baseline_positive_rate_variance"  # p (1 - p)
BASE_ERROR = "cxrlt:baseline_positive_rate_error"  # p (1 - p) / n_val
BAND = "cxrlt:finding_positive_rate_band:window"


def z_value(alpha: float, tests: int = 1, two_sided: bool = True) -> float:
    """The normal quantile of a Bonferroni-corrected test at family-wise `alpha`."""
    return NormalDist().inv_cdf(1 - alpha / (tests * (2 if two_sided else 1)))


def smoothed(positives: float, images: float) -> float:
    """A rate away from 0 and 1 ((k + 0.5) / (n + 1)), so a finding never seen has a band."""
    return (positives + 0.5) / (images + 1)


def band(p: np.ndarray | float, n: np.ndarray | float, n_val: float, z: float) -> np.ndarray | float:
    return z * np.sqrt(p * (1 - p) * (1 / n + 1 / n_val)) + z * z / (2 * n)


# ------------------------------------------------------------------------------ the rules


def _f(value: float) -> str:
    return f"{value:.6g}"


def _recording(window: str) -> list[dict[str, Any]]:
    return [
        {"record": FINDING_IMAGES, "expr": f"sum by (finding) (increase({PROBABILITY}_count[{window}]))"},
        {"record": RATE, "expr": f"sum by (finding) (increase({POSITIVES}[{window}])) / clamp_min({FINDING_IMAGES}, 1)"},
        {"record": ROUTED, "expr": f"sum(increase({PROJECTIONS}[{window}]))"},
        {"record": LATERAL, "expr": f'sum(increase({PROJECTIONS}{{projection="lateral"}}[{window}])) / clamp_min({ROUTED}, 1)'},
        {"record": "cxrlt:images:window", "expr": f"sum(increase({IMAGES}[{window}]))"},
        {"record": OOD_IMAGES, "expr": f"sum(increase({OOD_SCORE}_count[{window}]))"},
        {"record": OOD_REFUSALS,
         "expr": f'sum(increase({REFUSALS}{{reason="{OUT_OF_DISTRIBUTION}"}}[{window}])) / clamp_min({OOD_IMAGES}, 1)'},
        {"record": OOD_MEAN, "expr": f"sum(increase({OOD_SCORE}_sum[{window}])) / clamp_min({OOD_IMAGES}, 1)"},
    ]


def _baseline_rules(baseline: Mapping[str, Any]) -> list[dict[str, Any]]:
    rules = []
    for label, finding in baseline["findings"].items():
        p = smoothed(finding["positives"], finding["images"])
        for name, value in ((BASE_RATE, finding["positive_rate"] or 0.0), (BASE_VARIANCE, p * (1 - p)),
                            (BASE_ERROR, p * (1 - p) / max(finding["images"], 1))):
            rules.append({"record": name, "expr": f"vector({_f(value)})", "labels": {"finding": label}})
    return rules


def _sampled(series: str, sampled: float) -> str:
    """The images a window's ratio is computed on: the recorded (extrapolated) count x `sampled`."""
    return f"clamp_min({series} * {_f(sampled)}, 1)"


def _band_expr(rate: float, images: int, z: float, n: str) -> str:
    """`band` as PromQL around a baseline `rate` of `images` validation images, for the window's `n` images."""
    p = smoothed(rate * images, images)
    return f"{_f(z)} * sqrt({_f(p * (1 - p))} * (1 / {n} + {_f(1 / images)})) + {_f(z * z / 2)} / {n}"


def _alert(name: str, expr: str, summary: str, description: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "labels": {"severity": "warning", "team": "cxrlt"},
            "annotations": {"summary": summary, "description": description}}


def _alerts(baseline: Mapping[str, Any], min_images: int, alpha: float, sampled: float = 1.0) -> list[dict[str, Any]]:
    z36, z1, z1_one = z_value(alpha, FINDINGS_TESTED), z_value(alpha), z_value(alpha, two_sided=False)
    routed, scored = _sampled(ROUTED, sampled), _sampled(OOD_IMAGES, sampled)
    alerts = [_alert(
        ALERTS[0],
        f"(abs({RATE} - {BASE_RATE}) > {BAND}) and {FINDING_IMAGES} >= {min_images}",
        "{{ $labels.finding }}: positive rate {{ $value | humanizePercentage }} off its validation baseline",
        f"Over the last window the rate of positive decisions for {{{{ $labels.finding }}}} left its binomial band "
        f"(z = {z36:.2f}, Bonferroni over {FINDINGS_TESTED} findings). A prevalence or acquisition shift; see docs/monitoring.md.")]
    projections = baseline["projections"]
    n_val = max(projections["images"], 1)
    lateral = projections["lateral_fraction"]
    alerts.append(_alert(
        ALERTS[1],
        f"(abs({LATERAL} - {_f(lateral)}) > {_band_expr(lateral, n_val, z1, routed)}) and {ROUTED} >= {min_images}",
        "Projection mix: {{ $value | humanizePercentage }} lateral, off the validation baseline",
        f"The fraction of lateral images left its binomial band around {lateral:.3f} (z = {z1:.2f})."))
    ood = baseline.get("ood")
    if ood:
        n_ood = max(ood["images"], 1)
        alerts.append(_alert(
            ALERTS[2],
            f"({OOD_REFUSALS} - {_f(ood['refusal_rate'])} > {_band_expr(ood['refusal_rate'], n_ood, z1_one, scored)}) "
            f"and {OOD_IMAGES} >= {min_images}",
            "Out-of-distribution refusals at {{ $value | humanizePercentage }} of images",
            f"The gate refuses more images than on validation ({ood['refusal_rate']:.3%}): non-chest or foreign images arrive."))
        alerts.append(_alert(
            ALERTS[3],
            f"({OOD_MEAN} - {_f(ood['mean'])} > {_f(z1_one * max(ood['std'], 1e-9))} * sqrt(1 / {scored} "
            f"+ {_f(1 / n_ood)})) and {OOD_IMAGES} >= {min_images}",
            "Mean out-of-distribution score {{ $value }} above its validation baseline",
            f"The mean OOD score rose above {ood['mean']:.3g} (validation sd {ood['std']:.3g}): the images drift from the reference set."))
    return alerts


def window_seconds(window_images: int, images_per_second: float) -> int:
    return max(1, math.ceil(window_images / images_per_second))


def drift_rule_groups(baseline: Mapping[str, Any], window_images: int = DEFAULT_WINDOW_IMAGES,
                      images_per_second: float = DEFAULT_IMAGES_PER_SECOND, alpha: float = DEFAULT_ALPHA,
                      evaluation_interval: str | None = None,
                      scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S) -> list[dict[str, Any]]:
    """The rule groups (Prometheus rules-file `groups`) for `baseline`: windows of `window_images`
    at `images_per_second`, alarms from half a window of images on; the bands count the images
    the scrapes every `scrape_interval_s` span (see the module's docstring)."""
    window_s = window_seconds(window_images, images_per_second)
    sampled = max(0.5, 1 - scrape_interval_s / window_s)  # under two scrapes a window is too short (the CLI refuses it)
    min_images = max(1, window_images // 2)
    interval = {"interval": evaluation_interval} if evaluation_interval else {}
    z36 = z_value(alpha, FINDINGS_TESTED)
    n = _sampled(FINDING_IMAGES, sampled)
    band_rule = {"record": BAND, "expr": f"{_f(z36)} * sqrt({BASE_VARIANCE} / {n} + {BASE_ERROR}) + {_f(z36 * z36 / 2)} / {n}"}
    return [
        {"name": GROUP_BASELINE, **interval, "rules": _baseline_rules(baseline)},
        {"name": GROUP_RECORDING, **interval, "rules": [*_recording(f"{window_s}s"), band_rule]},
        {"name": GROUP_ALERTS, **interval, "rules": _alerts(baseline, min_images, alpha, sampled)},
    ]


# ----------------------------------------------------------------------------- simulation


def _windows(events: np.ndarray, window: int, every: int) -> np.ndarray:
    """Counts over the sliding windows ending at every `every`-th image ([..., evaluations])."""
    total = np.concatenate([np.zeros((*events.shape[:-1], 1)), np.cumsum(events, axis=-1)], axis=-1)
    ends = np.arange(window, events.shape[-1] + 1, every)
    return total[..., ends] - total[..., ends - window]


def _alarms(rates: np.ndarray, stream: np.ndarray, window: int, every: int, n_val: int, z: float,
            rng: np.random.Generator) -> np.ndarray:
    """Per evaluation, whether any finding's rule fires: rates [K], stream [K, images] of 0/1."""
    estimated = rng.binomial(n_val, rates) / n_val
    p = smoothed(estimated * n_val, n_val)
    counts = _windows(stream, window, every) / window
    return (np.abs(counts - estimated[:, None]) > band(p, window, n_val, z)[:, None]).any(axis=0)


def simulate(baseline: Mapping[str, Any], window_images: int = DEFAULT_WINDOW_IMAGES, alpha: float = DEFAULT_ALPHA,
             eval_every: int = 10, streams: int = 20, images: int = 20_000, seed: int = 0,
             shifted_findings: int = 3, shift: float = 0.2) -> dict[str, Any]:
    """False alarms of the finding-rate and projection-mix rules on in-distribution streams (alarm
    episodes: an evaluation that fires after one that did not), and images to alarm when the rates
    of the `shifted_findings` findings closest to 0.3 rise by `shift` and when the lateral fraction
    moves by `shift` towards 0.5."""
    rng = np.random.default_rng(seed)
    rates = np.asarray([f["positive_rate"] or 0.0 for f in baseline["findings"].values()])
    n_val = int(max(baseline["images"], 1))
    z36, z1 = z_value(alpha, FINDINGS_TESTED), z_value(alpha)
    lateral = np.array([baseline["projections"]["lateral_fraction"]])
    shifted = rates.copy()
    top = np.argsort(np.abs(rates - 0.3))[:shifted_findings]
    shifted[top] = np.minimum(0.99, rates[top] + shift)
    moved = lateral + (shift if lateral[0] < 0.5 else -shift)
    episodes, delays_rate, delays_mix = 0, [], []
    for _ in range(streams):
        fired = _alarms(rates, rng.random((len(rates), images)) < rates[:, None], window_images, eval_every, n_val, z36, rng)
        fired |= _alarms(lateral, rng.random((1, images)) < lateral[:, None], window_images, eval_every, n_val, z1, rng)
        episodes += int(fired[0]) + int(np.sum(fired[1:] & ~fired[:-1]))
        delays_rate.append(_delay(rates, shifted, window_images, eval_every, n_val, z36, rng))
        delays_mix.append(_delay(lateral, moved, window_images, eval_every, n_val, z1, rng))
    evaluated = streams * (images - window_images)
    return {"window_images": window_images, "alpha": alpha, "z_findings": z36, "z_single": z1, "eval_every_images": eval_every,
            "in_distribution_images": evaluated, "false_alarm_episodes": episodes,
            "false_alarms_per_10k_images": episodes / evaluated * 10_000,
            "images_to_alarm_rate_shift_median": float(np.median(delays_rate)),
            "images_to_alarm_rate_shift_max": float(np.max(delays_rate)),
            "images_to_alarm_mix_shift_median": float(np.median(delays_mix)),
            "images_to_alarm_mix_shift_max": float(np.max(delays_mix))}


def _delay(before: np.ndarray, after: np.ndarray, window: int, every: int, n_val: int, z: float,
           rng: np.random.Generator, horizon: int = 2000) -> float:
    """Images after the shift starts (a full in-distribution window before it) until the rule fires."""
    head = rng.random((len(before), window)) < before[:, None]
    tail = rng.random((len(after), horizon)) < after[:, None]
    fired = _alarms(before, np.concatenate([head, tail], axis=1), window, every, n_val, z, rng)
    hits = np.flatnonzero(fired)
    return float(hits[0] * every) if len(hits) else float("inf")


# ------------------------------------------------------------------------------- writing

RULES_FILE = "drift_rules.yml"
PROMETHEUS_RULE_FILE = "prometheusrule-cxrlt-drift.yaml"
PROMETHEUS_RULE_NAME = "cxrlt-drift"


def write_rules(baseline: Mapping[str, Any], out: Any, window_images: int = DEFAULT_WINDOW_IMAGES,
                images_per_second: float = DEFAULT_IMAGES_PER_SECOND, alpha: float = DEFAULT_ALPHA,
                evaluation_interval: str | None = None, manifest_dir: Any = None, source: str = "",
                scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S) -> list[Any]:
    """Write the rules file (OUT/drift_rules.yml) and, into `manifest_dir` (default OUT), the
    Kubernetes PrometheusRule with the same groups. Returns the paths written."""
    import yaml

    groups = drift_rule_groups(baseline, window_images, images_per_second, alpha, evaluation_interval, scrape_interval_s)
    header = (f"# Generated by `cxrlt monitoring-rules` from {source or 'a monitoring baseline'}: windows of "
              f"{window_images} images at {images_per_second:g} images/s, alpha {alpha:g}, scraped every {scrape_interval_s:g} s.\n"
              "# Regenerate for your repository and traffic; docs/monitoring.md explains the rules.\n")
    rules, manifest = Path(out) / RULES_FILE, Path(manifest_dir or out) / PROMETHEUS_RULE_FILE
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(header + yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
    manifest.parent.mkdir(parents=True, exist_ok=True)
    resource = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": PROMETHEUS_RULE_NAME, "labels": {"app.kubernetes.io/name": "cxrlt-triton"}},
                "spec": {"groups": groups}}
    manifest.write_text(header + "# The same groups as deploy/prometheus/drift_rules.yml (tests/test_deploy.py checks it).\n"
                        + yaml.safe_dump(resource, sort_keys=False, width=1000))
    return [rules, manifest]
