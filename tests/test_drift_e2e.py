"""Drift alarms end to end: Debian's Prometheus scrapes a real tritonserver and evaluates the rules
of `cxrlt monitoring-rules`; the alert states come from Prometheus's API (docs/monitoring.md).

One repository (the tiny profile's random weights, so the baseline is whatever the served model
answers on in-distribution images), its gate fitted on `cxrlt synth-data`'s training split, its
operating points and monitoring baseline from `cxrlt operating-points --split all`, metrics
flushed every second; the rules sized for the paced traffic, scraped and evaluated every second.
Streams of images over direct gRPC (the SDK, cxr_classifier, 4 in flight), each from an empty
window: an in-distribution stream of 2,000 images raises no alert, and three shifted streams each
raise theirs within 500 images: (a) prevalence (images the served model calls positive for three
findings), (b) acquisition (inverted images), (c) 20 % non-chest photographs. `cxrlt monitor`
exits 0 during the clean stream and 1 while an alert fires. Every process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cxrlt.client import AsyncCxrltClient, ServerRejected
from cxrlt.contract.releases import release_dir
from cxrlt.contract.served import CLASSIFIER_MODEL, PIPELINE_MODELS
from cxrlt.server.cluster import HOST, _binary, _http_ok, _wait, prometheus_config
from cxrlt.server.launcher import TritonServer, free_port
from tests.serve_process import stop_later

IMAGES_PER_SECOND = 60  # the paced traffic the rules are sized for: a window of 4 s
WINDOW_IMAGES = 240
CONCURRENCY = 4
CLEAN_IMAGES = 2000
SHIFT_BUDGET = 500  # a shifted stream must alarm within this many images
SYNTHETIC_IMAGES = 400
ALERT_PREFIX = "Cxrlt"


@dataclasses.dataclass
class Stack:
    server: TritonServer
    prometheus: subprocess.Popen
    prometheus_url: str
    images: list[np.ndarray]
    baseline: dict
    min_images: int

    @property
    def url(self) -> str:
        return self.server.endpoints.grpc


def _get(base: str, path: str, **query: str):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        payload = json.load(response)
    assert payload["status"] == "success", payload
    return payload["data"]


def _value(base: str, expr: str) -> float:
    result = _get(base, "/api/v1/query", query=expr)["result"]
    return max((float(r["value"][1]) for r in result), default=0.0)


def _alerts(base: str) -> list[dict]:
    """The drift alerts Prometheus holds now (pending or firing)."""
    return [a for a in _get(base, "/api/v1/alerts")["alerts"] if a["labels"]["alertname"].startswith(ALERT_PREFIX)]


def _prepare(repo: Path, data: Path, rules: Path, cxrlt) -> dict:
    """Synthetic data, a gate fitted on its training split, operating points and the baseline on all
    of it, metrics flushed every second, and the rules for the paced traffic."""
    from cxrlt.contract.model_config import set_config_parameters
    from evaluation.ood_sets import reference_images
    from exporters.ood_gate import fit_repository_gate

    assert cxrlt("synth-data", "--out", data, "--n", SYNTHETIC_IMAGES, "--image-size", "64", "--seed", "0") == 0
    labels = data / "labels.csv"
    fit_repository_gate(repo, reference_images(labels, "train"), str(labels))
    assert cxrlt("operating-points", "--repo", repo, "--data", labels, "--split", "all", "--resamples", "20") == 0
    for model in PIPELINE_MODELS:
        set_config_parameters(repo / model / "config.pbtxt", {"metrics_flush_s": "1"})
    assert cxrlt("monitoring-rules", "--repo", repo, "--out", rules, "--window-images", WINDOW_IMAGES,
                 "--images-per-second", IMAGES_PER_SECOND, "--scrape-interval-s", "1", "--evaluation-interval", "1s") == 0
    return json.loads((release_dir(repo, 1) / "monitoring_baseline.json").read_text())


@pytest.fixture(scope="module")
def stack(tiny_repository, cxrlt, tmp_path_factory):
    from evaluation.ood_sets import reference_images

    work = tmp_path_factory.mktemp("drift")
    repo = work / "repo"
    shutil.copytree(tiny_repository, repo)
    baseline = _prepare(repo, work / "data", work / "rules", cxrlt)
    images = [*reference_images(work / "data" / "labels.csv", "train"), *reference_images(work / "data" / "labels.csv", "val")]
    server = TritonServer(repo, HOST, free_port(), free_port(), free_port(), log_file=work / "tritonserver.log")
    prometheus = None
    try:
        server.start(300)
        prometheus_port = free_port()
        conf = work / "prometheus.yml"
        target = server.endpoints.metrics.split("//", 1)[1].rsplit("/", 1)[0]
        conf.write_text(prometheus_config(work, {"replica-0": target}, work / "rules" / "drift_rules.yml"))
        log = open(work / "prometheus.log", "wb")
        prometheus = subprocess.Popen(
            [_binary("prometheus", "prometheus"), f"--config.file={conf}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address={HOST}:{prometheus_port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{HOST}:{prometheus_port}"
        _wait(lambda: _http_ok(f"{url}/-/ready"), 60, lambda: prometheus.poll() is not None, "Prometheus did not start")
        # the declared series (at 0) are scraped before any traffic, so increase() counts the first images
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _get(url, "/api/v1/query", query="cxrlt_images_total")["result"]:
            time.sleep(0.5)
        yield Stack(server, prometheus, url, images, baseline, WINDOW_IMAGES // 2)
    finally:
        if prometheus is not None and prometheus.poll() is None:
            prometheus.terminate()
            try:
                prometheus.wait(20)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        stop_later(server.stop)


@dataclasses.dataclass
class Run:
    sent: int = 0
    refused: int = 0
    alarm_at: int | None = None  # images answered when Prometheus first reported a firing drift alert
    alerts: list[dict] = dataclasses.field(default_factory=list)
    monitor_exit: list[int] = dataclasses.field(default_factory=list)
    window_max: float = 0.0  # the most images the rules' window held
    seconds: float = 0.0
    results: dict = dataclasses.field(default_factory=dict)


def _stream(stack: Stack, images: list[np.ndarray], cxrlt, stop_on_alarm: bool, monitor_after: int | None = None) -> Run:
    """Send `images` paced at IMAGES_PER_SECOND, CONCURRENCY in flight, while polling Prometheus's
    alerts; `cxrlt monitor` runs once after `monitor_after` images and when the first alarm fires."""
    run, stop = Run(), threading.Event()

    async def send() -> None:
        async with AsyncCxrltClient(stack.url, model=CLASSIFIER_MODEL, retries=1, timeout_s=60) as client:
            indices, start = iter(range(len(images))), time.monotonic()

            async def worker() -> None:
                for i in indices:
                    if stop.is_set():
                        return
                    await asyncio.sleep(max(0.0, start + i / IMAGES_PER_SECOND - time.monotonic()))
                    try:
                        run.results[i] = await client.classify(images[i], image_id=str(i))
                    except ServerRejected:
                        run.refused += 1
                    run.sent += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    def sending() -> None:
        try:
            asyncio.run(send())
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
            errors.append(exc)

    started, errors = time.monotonic(), []
    sender = threading.Thread(target=sending, daemon=True)
    sender.start()
    while sender.is_alive():
        run.window_max = max(run.window_max, _value(stack.prometheus_url, "cxrlt:finding_images:window"))
        firing = [a for a in _alerts(stack.prometheus_url) if a["state"] == "firing"]
        if firing and run.alarm_at is None:
            run.alarm_at, run.alerts = run.sent, firing
            run.monitor_exit.append(cxrlt("monitor", "--prometheus", stack.prometheus_url))
            if stop_on_alarm:
                stop.set()
        if monitor_after is not None and run.sent >= monitor_after:
            monitor_after = None
            run.monitor_exit.append(cxrlt("monitor", "--prometheus", stack.prometheus_url))
        time.sleep(0.2)
    sender.join()
    if errors:
        raise errors[0]
    run.seconds = time.monotonic() - started
    return run


def _wait_quiet(stack: Stack, timeout: float = 60) -> None:
    """Wait until the window has emptied and no drift alert is pending or firing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _value(stack.prometheus_url, "cxrlt:images:window") == 0 and not _alerts(stack.prometheus_url):
            return
        time.sleep(0.5)
    raise AssertionError(f"the drift window did not empty: {_alerts(stack.prometheus_url)}")


def _positives(result, labels: list[str]) -> np.ndarray:
    """The served positive per finding: the decision where there is one, else probability > 0.5."""
    decisions = result.decisions or {}
    return np.array([decisions[k].positive if k in decisions else result.probabilities[k] > 0.5 for k in labels])


def _fired(run: Run) -> str:
    return ", ".join(sorted(f"{a['labels']['alertname']}{'(' + a['labels']['finding'] + ')' if 'finding' in a['labels'] else ''}"
                            for a in run.alerts))


def test_bands_count_the_images_the_scrapes_span(tmp_path, cxrlt):
    """increase() extrapolates the counters' growth between a window's first and last scrape to the
    whole window: the bands count only the images the scrapes span (4 s window, 1 s scrapes: 3/4)."""
    import yaml

    from evaluation.baseline import compute_baseline, ood_baseline
    from evaluation.drift import BAND, write_rules

    rng = np.random.default_rng(0)
    baseline = compute_baseline(rng.random((100, 3)), ["a", "b", "c"], ["frontal"] * 100, None, ood_baseline(rng.normal(5, 1, 100), 8.0))
    rules, _ = write_rules(baseline, tmp_path, WINDOW_IMAGES, IMAGES_PER_SECOND, scrape_interval_s=1)
    rules = {r.get("record") or r["alert"]: r["expr"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    assert rules[BAND].count("cxrlt:finding_images:window * 0.75") == 2
    for alert in ("CxrltProjectionMixDrift", "CxrltOodRefusalRateHigh", "CxrltOodScoreMeanHigh"):
        assert " * 0.75, 1)" in rules[alert], alert
    release_dir(tmp_path / "repo", 1).mkdir(parents=True)
    (release_dir(tmp_path / "repo", 1) / "monitoring_baseline.json").write_text(json.dumps(baseline))
    assert cxrlt("monitoring-rules", "--repo", tmp_path / "repo", "--out", tmp_path / "too-short", "--window-images", 200,
                 "--images-per-second", 20, "--scrape-interval-s", 15) == 2  # 10 s: not two scrapes
    assert not (tmp_path / "too-short").exists()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_clean_traffic_stays_quiet_and_three_shifts_alarm_within_500_images(stack, cxrlt):
    from evaluation.ood_sets import photographs

    rng = np.random.default_rng(0)
    figures = {}

    # In distribution: 2,000 images resampled from the synthetic set; no alert, pending or firing.
    order = rng.integers(0, len(stack.images), CLEAN_IMAGES)
    clean = _stream(stack, [stack.images[i] for i in order], cxrlt, stop_on_alarm=False, monitor_after=CLEAN_IMAGES // 2)
    time.sleep(3)  # what the last images add reaches the rules (flush, scrape, evaluation)
    seconds = int(clean.seconds) + 5
    episodes = _value(stack.prometheus_url, f'count_over_time(ALERTS{{alertname=~"{ALERT_PREFIX}.*"}}[{seconds}s])')
    figures["clean"] = {"images": clean.sent, "seconds": round(clean.seconds, 1), "refused": clean.refused,
                        "alert_samples": episodes, "window_max": clean.window_max, "monitor_exit": clean.monitor_exit}
    print(f"clean: {figures['clean']}")
    assert clean.sent == CLEAN_IMAGES and clean.alarm_at is None and episodes == 0, figures["clean"]
    assert clean.window_max >= stack.min_images, "the window never held enough images to arm the alerts"
    assert clean.monitor_exit == [0]

    # The served decisions per synthetic image, from the clean stream's answers.
    labels = list(next(iter(clean.results.values())).probabilities)
    served = {}
    for position, result in clean.results.items():
        served[int(order[position])] = _positives(result, labels)
    seen = np.array(sorted(served))
    positive = np.array([served[i] for i in seen])
    rates = positive.mean(axis=0)

    # (a) prevalence: the three findings nearest a rate of 0.3; images positive for at least two of them.
    chosen = list(np.argsort(np.abs(rates - 0.3))[:3])
    pool = seen[positive[:, chosen].sum(axis=1) >= 2]
    assert len(pool) >= 10, f"too few images positive for two of {[labels[k] for k in chosen]}"
    shifted = positive[np.isin(seen, pool)][:, chosen].mean(axis=0)
    streams = {
        "prevalence": [stack.images[i] for i in rng.choice(pool, SHIFT_BUDGET)],
        "acquisition": [np.uint16(65535) - stack.images[i] for i in rng.integers(0, len(stack.images), SHIFT_BUDGET)],
    }
    photos = list(photographs().values())
    mixed = [stack.images[i] for i in rng.integers(0, len(stack.images), SHIFT_BUDGET)]
    for k in range(4, SHIFT_BUDGET, 5):  # every fifth image a photograph: 20 %
        mixed[k] = photos[(k // 5) % len(photos)]
    streams["non-chest"] = mixed
    expected = {"prevalence": {"CxrltFindingRateDrift"}, "acquisition": {"CxrltFindingRateDrift", "CxrltProjectionMixDrift",
                "CxrltOodRefusalRateHigh", "CxrltOodScoreMeanHigh"}, "non-chest": {"CxrltOodRefusalRateHigh", "CxrltOodScoreMeanHigh"}}
    prevalence = None
    for name, images in streams.items():
        _wait_quiet(stack)
        run = _stream(stack, images, cxrlt, stop_on_alarm=True)
        prevalence = run if name == "prevalence" else prevalence
        figures[name] = {"images_to_alarm": run.alarm_at, "alerts": _fired(run), "refused": run.refused,
                         "monitor_exit": run.monitor_exit, "seconds": round(run.seconds, 1)}
        print(f"{name}: {figures[name]}")
    figures["prevalence"]["findings"] = {labels[k]: (round(float(rates[k]), 3), round(float(s), 3)) for k, s in zip(chosen, shifted)}
    print("drift figures:", json.dumps(figures, default=str))
    for name in streams:
        run_figures = figures[name]
        assert run_figures["images_to_alarm"] is not None and run_figures["images_to_alarm"] <= SHIFT_BUDGET, (name, run_figures)
        assert {a.split("(")[0] for a in run_figures["alerts"].split(", ")} & expected[name], (name, run_figures)
        assert run_figures["monitor_exit"] == [1], (name, run_figures)
    assert set(figures["prevalence"]["findings"]) & {a["labels"].get("finding") for a in prevalence.alerts}
