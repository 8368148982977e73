"""Pipeline metrics (python_backends.monitoring) with the fake pb_utils, the monitoring baseline,
the generated drift rules (promtool), the Grafana dashboard's queries and `cxrlt monitor`."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cxrlt.contract.labels import TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig
from python_backends.classifier import ClassifierSettings
from tests import fake_pb_utils as pb
from tests.test_model_adapters import PIPELINE_MODEL_PY, _config, _image, networks  # noqa: F401 - a fixture

pb.install()  # python_backends.monitoring imports pb_utils (through bls)

OUTPUTS = [{"name": n} for n in ("PROBABILITIES", "DECISIONS", "PROJECTION", "PROJECTION_SCORE")]


def _model(**params: str):
    pb.reset_metrics()
    model = pb.load_model_py(PIPELINE_MODEL_PY).TritonPythonModel()
    settings = ClassifierSettings(preprocess=PreprocessConfig(size=32), max_pixels=100_000).to_parameters()
    model.initialize({"model_name": "cxr_classifier",
                      "model_config": _config({**settings, "tasks": "classifier", "metrics_flush_s": "0", **params},
                                                       output=OUTPUTS)})
    return model


def _value(name: str, **labels: str) -> float:
    metric = pb.metric(name, model="cxr_classifier", **labels)
    return 0.0 if metric is None else metric.value()


def test_pipeline_counts_images_positives_projections_disagreements_and_refusals(networks):  # noqa: F811
    from python_backends import monitoring as m

    model = _model()
    hint = {"PROJECTION_HINT": np.array([[b"LL"]], dtype=object)}  # the router says frontal (p 0.88)
    requests = [pb.FakeRequest(IMAGE=_image()), pb.FakeRequest(IMAGE=_image(), **hint),
                pb.FakeRequest(IMAGE=np.full((1, 40, 40), 7, np.uint16)),  # constant: refused in the pipeline
                pb.FakeRequest(IMAGE=_image(), PROJECTION_HINT=np.array([[b"OBLIQUE"]], dtype=object))]  # refused on parsing
    responses = asyncio.run(model.execute(requests))
    assert [r.has_error() for r in responses] == [False, False, True, True]
    assert _value(m.IMAGES) == 2
    assert _value(m.PROJECTIONS, projection="frontal", source="router") == 1
    assert _value(m.PROJECTIONS, projection="lateral", source="hint") == 1
    assert _value(m.DISAGREEMENTS, projection="lateral") == 1 and _value(m.DISAGREEMENTS, projection="frontal") == 0
    assert _value(m.REFUSALS, reason="invalid_input") == 2
    # Members answer logit 0: Normal's probability is 0.5, the others 0.5 * 0.5 ** 0.5 < 0.5;
    # without operating points a positive is p > 0.5, so none.
    for projection in ("frontal", "lateral"):
        assert _value(m.POSITIVES, finding="Normal", projection=projection) == 0
        cardiomegaly = {"finding": "cardiomegaly", "projection": projection}
        assert _value(m.PROBABILITY + "_count", **cardiomegaly) == 1
        assert _value(m.PROBABILITY + "_sum", **cardiomegaly) == pytest.approx(0.5 * 0.5 ** 0.5, abs=1e-6)
        buckets = {le: _value(m.PROBABILITY + "_bucket", **cardiomegaly, le=le) for le in ("0.25", "0.5", "+Inf")}
        assert buckets == {"0.25": 0, "0.5": 1, "+Inf": 1}  # cumulative, as Prometheus's le


def test_positives_follow_the_decisions_where_there_are_operating_points(networks):  # noqa: F811
    from cxrlt.contract.operating_points import OperatingPoint, OperatingPoints, parse_policy
    from python_backends import monitoring as m

    point = OperatingPoint(0.2, 0.8, 0.7, (0.7, 0.9), (0.6, 0.8), 10, 20)
    model = _model(operating_points=OperatingPoints(parse_policy("youden"), {"cardiomegaly": {"any": point}}).to_json(),
                   metrics_flush_s="3600")
    asyncio.run(model.execute([pb.FakeRequest(IMAGE=_image()) for _ in range(3)]))
    model.pipeline.metrics.close()
    assert _value(m.POSITIVES, finding="cardiomegaly", projection="frontal") == 3  # 0.35 >= 0.2
    assert _value(m.POSITIVES, finding="Normal", projection="frontal") == 0  # no point: 0.5 is not > 0.5
    # one increment for the flush interval, not one per image
    assert pb.metric(m.POSITIVES, model="cxr_classifier", finding="cardiomegaly", projection="frontal").calls == 1


def test_metrics_can_be_turned_off(networks):  # noqa: F811
    model = _model(metrics="false")
    assert model.pipeline.metrics is None
    asyncio.run(model.execute([pb.FakeRequest(IMAGE=_image())]))
    assert not pb.MetricFamily.REGISTRY


def test_gate_refusals_and_ood_scores_are_counted():
    from cxrlt.contract.ood_gate import refusal_message
    from python_backends import monitoring as m
    from python_backends.pipeline_errors import RequestError

    pb.reset_metrics()
    metrics = m.PipelineMetrics("cxr_findings", TASK1_LABELS, ood_threshold=10.0, api=pb, flush_s=3600)  # no thread started
    metrics.refused_errors([RequestError(refusal_message(12.5, 10.0)), RequestError("constant image"), (1, 2)])
    metrics.classified(np.full((2, 30), 0.7), np.full((2, 30), -1), ["frontal", "lateral"], ["router", "router"],
                       [0.9, 0.9], np.array([[3.0], [np.nan]]))
    assert not any(family.metrics for family in pb.MetricFamily.REGISTRY.values())  # nothing sent before a flush
    metrics.classified(np.full((1, 30), 0.2), np.full((1, 30), 1), ["lateral"], ["hint"], [0.3], None)
    metrics.close()

    def value(name, **labels):
        return pb.metric(name, model="cxr_findings", **labels).value()

    assert value(m.REFUSALS, reason="out_of_distribution") == 1 and value(m.REFUSALS, reason="invalid_input") == 1
    assert value(m.OOD_SCORE + "_count") == 2 and value(m.OOD_SCORE + "_sum") == 15.5  # the NaN (no gate) is no score
    assert value(m.OOD_SCORE + "_bucket", le="10") == 1
    assert value(m.IMAGES) == 3
    assert value(m.POSITIVES, finding="Normal", projection="lateral") == 2  # 0.7 > 0.5 without a decision, then a 1
    assert value(m.PROJECTIONS, projection="lateral", source="hint") == 1 and value(m.DISAGREEMENTS, projection="lateral") == 1
    assert pb.metric(m.IMAGES, model="cxr_findings").calls == 1  # both batches in one increment


def test_a_thread_sends_the_counts_every_flush_interval():
    import time

    from python_backends import monitoring as m

    pb.reset_metrics()
    metrics = m.PipelineMetrics("cxr_zeroshot", ["Scoliosis"], api=pb, flush_s=0.05).start()
    metrics.classified(np.array([[0.7]]), np.array([[-1]]), [None])
    deadline = time.monotonic() + 5
    while pb.metric(m.IMAGES, model="cxr_zeroshot") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics.close()
    assert pb.metric(m.IMAGES, model="cxr_zeroshot").value() == 1
    assert pb.metric(m.POSITIVES, model="cxr_zeroshot", finding="Scoliosis", projection="none").value() == 1
    assert not metrics._thread.is_alive()


def _baseline(with_ood: bool = True):
    from cxrlt.contract.labels import ALL_LABELS
    from evaluation.baseline import compute_baseline, ood_baseline

    rng = np.random.default_rng(0)
    probabilities = rng.random((400, 36))
    projections = ["lateral" if i % 3 == 0 else "frontal" for i in range(400)]
    ood = ood_baseline(rng.normal(10, 2, 400), threshold=15.0) if with_ood else None
    return compute_baseline(probabilities, ALL_LABELS, projections, None, ood)


def test_baseline_rates_projection_mix_and_ood():
    baseline = _baseline()
    assert baseline["images"] == 400 and len(baseline["findings"]) == 36
    assert baseline["projections"]["lateral_fraction"] == pytest.approx(134 / 400)
    normal = baseline["findings"]["Normal"]
    assert 0.4 < normal["positive_rate"] < 0.6 and normal["probability_cdf"]["0.5"] == pytest.approx(1 - normal["positive_rate"])
    assert baseline["ood"]["mean"] == pytest.approx(10, abs=0.3) and baseline["ood"]["refusal_rate"] < 0.02


def test_generated_rules_pass_promtool_and_the_simulation_keeps_false_alarms_rare(tmp_path):
    import shutil
    import subprocess

    import yaml

    from evaluation.drift import ALERTS, simulate, write_rules

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus)")
    rules, manifest = write_rules(_baseline(), tmp_path, window_images=200, images_per_second=20, evaluation_interval="1s")
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    groups = yaml.safe_load(rules.read_text())["groups"]
    assert {r["alert"] for g in groups for r in g["rules"] if "alert" in r} == set(ALERTS)
    assert "[10s]" in rules.read_text()  # 200 images at 20 images/s
    assert yaml.safe_load(manifest.read_text())["spec"]["groups"] == groups
    result = simulate(_baseline(), window_images=200, streams=4, images=5000)
    assert result["false_alarms_per_10k_images"] < 1.0
    assert result["images_to_alarm_rate_shift_max"] <= 500 and result["images_to_alarm_mix_shift_max"] <= 500
