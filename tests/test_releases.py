"""Releases without a server: the plan and its routing, the served pipeline's choice per request
(fake pb_utils), prune's protections, the shadow report and its verdict."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cxrlt.contract.releases import (RELEASE_ENV, ReleasePlan, release_dir, release_numbers, sticky_share, version_dir,
                                     write_release)
from tests import fake_pb_utils as pb

pb.install()


def test_plan_parameters_round_trip_and_bad_plans_are_refused():
    plan = ReleasePlan(2, 3, "canary", 0.25, previous=1)
    assert ReleasePlan.from_parameters(plan.to_parameters(), environ={}) == plan
    assert ReleasePlan.from_parameters({}, environ={}) == ReleasePlan(1)  # a repository from before releases
    for bad in (dict(live=0), dict(live=1, candidate=1, mode="shadow"), dict(live=1, candidate=2),
                dict(live=1, candidate=2, mode="blue-green"), dict(live=1, candidate=2, mode="shadow", share=1.5)):
        with pytest.raises(ValueError):
            ReleasePlan(**bad)
    with pytest.raises(ValueError, match="set it with `cxrlt release`"):
        ReleasePlan.from_parameters({"release": "two"}, environ={})


def test_the_environment_pins_the_live_release_until_a_switch_at_run_time():
    params = ReleasePlan(1).to_parameters()
    assert ReleasePlan.from_parameters(params, environ={RELEASE_ENV: "2"}).live == 2
    switched = ReleasePlan(3, previous=1).to_parameters(switched=True)
    assert ReleasePlan.from_parameters(switched, environ={RELEASE_ENV: "2"}).live == 3


def test_canary_is_sticky_per_study_and_shadow_never_answers():
    canary = ReleasePlan(1, 2, "canary", 0.3)
    studies = [f"1.2.3.{i}" for i in range(2000)]
    routes = [canary.route(s, draw=0.99)[0] for s in studies]
    assert routes == [canary.route(s, draw=0.01)[0] for s in studies]  # the draw does not matter with a study
    assert 0.25 < routes.count(2) / len(routes) < 0.35
    assert all(canary.route(s, 0.5)[1] is None for s in studies[:10])
    shadow = ReleasePlan(1, 2, "shadow", 0.3)
    assert shadow.route("1.2.3", 0.1) == (1, 2) and shadow.route("1.2.3", 0.5) == (1, None)
    assert ReleasePlan(1).route("1.2.3", 0.0) == (1, None)
    assert 0.0 <= sticky_share("1.2.3") < 1.0 and sticky_share("1.2.3") == sticky_share("1.2.3")


def _fake_release_pipeline(release: int, offset: float):
    """A ServedPipeline of one release whose 'network' answers `offset` in every probability."""
    from python_backends.pipeline import ServedPipeline

    class Fixed:
        async def classify_many(self, items):
            from python_backends.classifier import Classification

            return [Classification(np.zeros(30, np.float32), np.full(30, offset, np.float32), "frontal", 0.9, False)
                    for _ in items]

    pipeline = ServedPipeline(Fixed(), None, ("PROBABILITIES", "DECISIONS", "RELEASE", "RELEASE_SHA256"),
                              release=release, release_sha256=f"sha-{release}")
    return pipeline


def _outputs(response) -> dict:
    return {t.name(): t.as_numpy() for t in response.output_tensors}


def test_the_served_model_answers_with_the_routed_release_and_compares_the_shadow(monkeypatch):
    from python_backends.monitoring import PipelineMetrics
    from python_backends.pipeline import ServedReleases

    pb.reset_metrics()
    metrics = PipelineMetrics("cxr_classifier", [f"f{i}" for i in range(30)], flush_s=0).start()
    pipelines = {1: _fake_release_pipeline(1, 0.2), 2: _fake_release_pipeline(2, 0.7)}
    image = np.full((1, 40, 30), 1000, np.uint16)

    def request(study):
        return pb.FakeRequest(IMAGE=image, STUDY_KEY=np.array([[study.encode()]], dtype=object))

    canary = ServedReleases(ReleasePlan(1, 2, "canary", 0.5), pipelines, metrics)
    studies = [f"1.2.{i}" for i in range(40)]
    answers = asyncio.run(canary.execute([request(s) for s in studies]))
    for study, answer in zip(studies, answers):
        out = _outputs(answer)
        expected = 2 if sticky_share(study) < 0.5 else 1
        assert out["RELEASE"][0, 0] == expected and out["RELEASE_SHA256"][0, 0] == f"sha-{expected}".encode()
        assert out["PROBABILITIES"][0, 0] == pytest.approx(0.7 if expected == 2 else 0.2)

    shadow = ServedReleases(ReleasePlan(1, 2, "shadow", 1.0), pipelines, metrics)
    answers = asyncio.run(shadow.execute([request(s) for s in studies[:5]]))
    assert {int(_outputs(a)["RELEASE"][0, 0]) for a in answers} == {1}
    assert pb.metric("cxrlt_shadow_images_total", model="cxr_classifier", release="2").value() == 5
    # every finding moved by 0.5: the |dp| histogram's 0.5 bucket holds all five, its 0.2 bucket none
    assert pb.metric("cxrlt_shadow_abs_delta_probability_bucket", model="cxr_classifier", release="2", finding="f3",
                     le="0.5").value() == 5
    assert pb.metric("cxrlt_shadow_abs_delta_probability_bucket", model="cxr_classifier", release="2", finding="f3",
                     le="0.2") is None
    # without operating points a probability over 0.5 counts as positive: 0.2 -> 0.7 flips every image
    assert pb.metric("cxrlt_shadow_decision_flips_total", model="cxr_classifier", release="2", finding="f0").value() == 5
    metrics.close()


def _skeleton(tmp_path, releases=(1, 2, 3, 4), live=3, previous=2):
    from cxrlt.contract.served import PIPELINE_MODELS

    for n in releases:
        own = {model: {"repository_sha256": f"{n}" * 64, "ood_threshold": f"{n}.5"} for model in PIPELINE_MODELS}
        write_release(tmp_path, n, {"repository_sha256": f"{n}" * 64, "seed": n, "random_weights": True, "parameters": own})
        for model in ("projection_router", "clip_image_encoder"):
            version_dir(tmp_path, model, n).mkdir(parents=True, exist_ok=True)
    params = ReleasePlan(live, previous=previous).to_parameters()
    for model in PIPELINE_MODELS:
        (tmp_path / model).mkdir(exist_ok=True)
        (tmp_path / model / "config.pbtxt").write_text(
            f'name: "{model}"\n' + "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
                                           for k, v in params.items()))
    return tmp_path


def test_prune_keeps_the_newest_and_never_the_live_or_rollback_release(tmp_path):
    from cxrlt.client.releases import ReleaseControl, ReleaseError

    repo = _skeleton(tmp_path)
    control = ReleaseControl(repo)
    assert control.prune(1) == [1]  # 2 is rollback's target, 3 live, 4 the newest
    assert release_numbers(repo) == [2, 3, 4] and not version_dir(repo, "projection_router", 1).exists()
    assert version_dir(repo, "projection_router", 2).is_dir() and release_dir(repo, 2).is_dir()
    with pytest.raises(ReleaseError, match="at least 1"):
        control.prune(0)


def test_switches_in_a_repository_write_the_plan_and_every_releases_parameters(tmp_path):
    from cxrlt.client.releases import ReleaseControl, ReleaseError
    from cxrlt.contract.model_config import config_parameters

    repo = _skeleton(tmp_path)
    control = ReleaseControl(repo)
    switch = control.canary(4, 20)
    params = config_parameters(repo / "cxr_findings" / "config.pbtxt")
    assert switch.after == ReleasePlan(3, 4, "canary", 0.2, previous=2) and params["release_mode"] == "canary"
    assert json.loads(params["release_parameters_4"]) == {"repository_sha256": "4" * 64, "ood_threshold": "4.5"}
    assert params["repository_sha256"] == "3" * 64  # the live release's, plainly; and every release's as JSON
    assert json.loads(params["release_parameters_1"])["repository_sha256"] == "1" * 64
    assert control.promote(4).after == ReleasePlan(4, previous=3)
    assert control.rollback().after == ReleasePlan(3, previous=4)
    with pytest.raises(ReleaseError, match="already live"):
        control.promote(3)
    with pytest.raises(FileNotFoundError, match="has no release 9"):
        control.shadow(9, 0.1)


REPORT_METRICS = """\
# TYPE cxrlt_shadow_images_total counter
cxrlt_shadow_images_total{model="cxr_findings",release="2"} 200
# TYPE cxrlt_shadow_decision_flips_total counter
cxrlt_shadow_decision_flips_total{finding="Normal",model="cxr_findings",release="2"} 10
# TYPE cxrlt_shadow_positive_decisions_total counter
cxrlt_shadow_positive_decisions_total{finding="Normal",model="cxr_findings",release="2",role="live"} 100
cxrlt_shadow_positive_decisions_total{finding="Normal",model="cxr_findings",release="2",role="shadow"} %(shadow_positives)d
# TYPE cxrlt_shadow_abs_delta_probability_bucket counter
cxrlt_shadow_abs_delta_probability_bucket{finding="Normal",le="0.01",model="cxr_findings",release="2"} 100
cxrlt_shadow_abs_delta_probability_bucket{finding="Normal",le="0.05",model="cxr_findings",release="2"} 200
cxrlt_shadow_abs_delta_probability_bucket{finding="Normal",le="+Inf",model="cxr_findings",release="2"} 200
# TYPE cxrlt_shadow_abs_delta_probability_sum counter
cxrlt_shadow_abs_delta_probability_sum{finding="Normal",model="cxr_findings",release="2"} 2.0
# TYPE cxrlt_release_seconds_bucket counter
cxrlt_release_seconds_bucket{le="0.1",model="cxr_findings",release="1",role="live"} 99
cxrlt_release_seconds_bucket{le="0.25",model="cxr_findings",release="1",role="live"} 100
cxrlt_release_seconds_bucket{le="+Inf",model="cxr_findings",release="1",role="live"} 100
cxrlt_release_seconds_bucket{le="0.1",model="cxr_findings",release="2",role="shadow"} %(fast_shadow)d
cxrlt_release_seconds_bucket{le="0.25",model="cxr_findings",release="2",role="shadow"} 100
cxrlt_release_seconds_bucket{le="+Inf",model="cxr_findings",release="2",role="shadow"} 100
# TYPE cxrlt_release_seconds_count counter
cxrlt_release_seconds_count{model="cxr_findings",release="1",role="live"} 100
cxrlt_release_seconds_count{model="cxr_findings",release="2",role="shadow"} 100
# TYPE cxrlt_release_seconds_sum counter
cxrlt_release_seconds_sum{model="cxr_findings",release="1",role="live"} 5.0
cxrlt_release_seconds_sum{model="cxr_findings",release="2",role="shadow"} 5.0
"""


def test_report_passes_a_close_candidate_and_names_what_fails_another():
    from cxrlt.client.release_report import quantile, shadow_report

    good = shadow_report(REPORT_METRICS % dict(shadow_positives=103, fast_shadow=99))["candidates"]["2"]
    row = good["findings"]["Normal"]
    assert row["flip_rate"] == pytest.approx(0.05) and row["positive_rate_diff"] == pytest.approx(0.015)
    assert row["mean_abs_dp"] == pytest.approx(0.01) and row["p95_abs_dp"] == pytest.approx(0.01 + 0.04 * 0.9)
    assert good["passed"] and good["latency"]["p99_increase"] == pytest.approx(0.0)
    bad = shadow_report(REPORT_METRICS % dict(shadow_positives=110, fast_shadow=50))["candidates"]["2"]
    assert not bad["passed"]
    assert any(f.startswith("Normal: positive rate 0.500 -> 0.550") for f in bad["failures"])
    assert any("p99 batch time" in f for f in bad["failures"])
    assert quantile(0.5, {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}) == pytest.approx(0.1)
