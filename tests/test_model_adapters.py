"""The model.py adapters in isolation, with a fake triton_python_backend_utils."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from cxrlt.contract.preprocessing import PreprocessConfig
from cxrlt.contract.resources import package_file
from python_backends.classifier import ClassifierSettings
from tests import fake_pb_utils as pb

TEMPLATES = package_file("triton_models")
PIPELINE_MODEL_PY = TEMPLATES / "cxr_pipeline" / "model.py"


# cxr_classifier's declared outputs, as its config.pbtxt lists them
CLASSIFIER_OUTPUTS = [{"name": n} for n in ("PROBABILITIES", "LOGITS", "PROJECTION", "PROJECTION_SCORE")]


def _config(params: dict[str, str], **config) -> str:
    return json.dumps({"parameters": {k: {"string_value": v} for k, v in params.items()}, "output": CLASSIFIER_OUTPUTS, **config})


@pytest.fixture
def networks():
    def router(inputs):
        return {"logits": np.tile(np.array([[2.0, 0.0]], np.float32), (len(inputs["pixel_values"]), 1))}

    def member(inputs):
        return {"logits": np.zeros((len(inputs["pixel_values"]), 30), np.float32)}

    pb.MODELS.clear()
    pb.MODELS["projection_router"] = router
    for projection in ("frontal", "lateral"):
        for name in ("pcam", "cait", "swin"):
            pb.MODELS[f"ensemble_{projection}_{name}"] = member
    yield pb.MODELS
    pb.MODELS.clear()


@pytest.fixture
def classifier():
    module = pb.load_model_py(PIPELINE_MODEL_PY)
    model = module.TritonPythonModel()
    settings = ClassifierSettings(preprocess=PreprocessConfig(size=32), max_pixels=100_000)
    model.initialize({"model_config": _config({**settings.to_parameters(), "tasks": "classifier"})})
    return model


def _image(height=40, width=30):
    return np.full((1, height, width), 1000, np.uint16) + np.arange(width, dtype=np.uint16)


def test_bad_request_fails_alone_in_a_batch_of_requests(networks, classifier):
    requests = [
        pb.FakeRequest(IMAGE=_image()),
        pb.FakeRequest(IMAGE=np.zeros((1, 1, 1), np.uint16)),
        pb.FakeRequest(IMAGE=_image(), PROJECTION_HINT=np.array([[b"SIDEWAYS"]], dtype=object)),
        pb.FakeRequest(IMAGE=_image(), PROJECTION_HINT=np.array([[b"LL"]], dtype=object)),
    ]
    responses = asyncio.run(classifier.execute(requests))
    assert [r.has_error() for r in responses] == [False, True, True, False]
    assert responses[1].error().code() == pb.TritonError.INVALID_ARG and "too small" in responses[1].error().message()
    assert "unknown projection hint 'SIDEWAYS'" in responses[2].error().message()
    outputs = {t.name(): t.as_numpy() for t in responses[3].output_tensors}
    assert outputs["PROJECTION"].tolist() == [[b"lateral"]]
    assert outputs["PROBABILITIES"].shape == (1, 30) and outputs["PROJECTION_SCORE"].shape == (1, 1)
    frontal = {t.name(): t.as_numpy() for t in responses[0].output_tensors}
    assert frontal["PROJECTION"].tolist() == [[b"frontal"]]


def test_failing_member_is_named_and_no_probabilities_are_returned(networks, classifier):
    def broken(inputs):
        raise RuntimeError("onnxruntime failed: out of memory")

    networks["ensemble_frontal_cait"] = broken
    (response,) = asyncio.run(classifier.execute([pb.FakeRequest(IMAGE=_image())]))
    assert response.has_error() and response.output_tensors == []
    assert "ensemble_frontal_cait" in response.error().message()
    assert response.error().code() == pb.TritonError.INTERNAL


def test_unavailable_member_is_named(networks, classifier):
    del networks["ensemble_frontal_swin"]
    (response,) = asyncio.run(classifier.execute([pb.FakeRequest(IMAGE=_image())]))
    assert response.has_error() and "ensemble_frontal_swin" in response.error().message()
    assert response.error().code() == pb.TritonError.UNAVAILABLE


def _zeroshot_pipeline(encoder_calls: list) -> "ZeroShotPipeline":
    from cxrlt.contract.labels import TASK2_LABELS
    from cxrlt.contract.text_cache import TextCache
    from python_backends import bls
    from python_backends.zeroshot import ENCODER_MODEL, ZeroShotPipeline, ZeroShotSettings

    def encoder(inputs):
        encoder_calls.append(len(inputs["pixel_values"]))
        return {"image_embeds": np.ones((len(inputs["pixel_values"]), 8), np.float32)}

    pb.MODELS[ENCODER_MODEL] = encoder
    cache = TextCache(list(TASK2_LABELS), np.eye(len(TASK2_LABELS), 8, dtype=np.float32), None, {})
    return ZeroShotPipeline(ZeroShotSettings(max_pixels=100_000), cache, bls.make_infer({ENCODER_MODEL: "image_embeds"}))


def test_findings_runs_both_tasks_in_one_stub_and_fails_a_request_once(networks, classifier):
    """cxr_findings: one pipeline, both tasks on the same image; no second BLS level."""
    from python_backends.pipeline import ServedPipeline

    encoder_calls = []
    findings = ServedPipeline(classifier.pipeline.live.classifier, _zeroshot_pipeline(encoder_calls),
                              ("PROBABILITIES", "PROJECTION", "PROJECTION_SCORE"))
    requests = [pb.FakeRequest(IMAGE=_image()), pb.FakeRequest(IMAGE=np.full((1, 40, 40), 7, np.uint16)),
                pb.FakeRequest(IMAGE=_image(), PROJECTION_HINT=np.array([[b"OBLIQUE"]], dtype=object))]
    ok, constant, bad_hint = asyncio.run(findings.execute(requests))
    outputs = {t.name(): t.as_numpy() for t in ok.output_tensors}
    assert set(outputs) == {"PROBABILITIES", "PROJECTION", "PROJECTION_SCORE"}
    assert outputs["PROBABILITIES"].shape == (1, 36) and outputs["PROJECTION"].tolist() == [[b"frontal"]]
    # Task 1's own answer and the zero-shot one, concatenated in label order
    (task1,) = asyncio.run(classifier.execute([pb.FakeRequest(IMAGE=_image())]))
    np.testing.assert_array_equal(outputs["PROBABILITIES"][:, :30], {t.name(): t.as_numpy() for t in task1.output_tensors}["PROBABILITIES"])
    assert np.all(outputs["PROBABILITIES"][:, 30:] > 0.5)
    assert constant.error().code() == pb.TritonError.INVALID_ARG and "constant image" in constant.error().message()
    assert bad_hint.error().code() == pb.TritonError.INVALID_ARG and "unknown projection hint" in bad_hint.error().message()
    assert encoder_calls == [1]  # the one good image; the bad hint was refused before any network ran


def test_merged_requests_share_member_calls_sliced_to_the_members_batch_limit(networks):
    calls = []

    def counted(name, model):
        def run(inputs):
            calls.append((name, len(inputs["pixel_values"])))
            return model(inputs)

        return run

    for name in list(networks):
        networks[name] = counted(name, networks[name])
    module = pb.load_model_py(PIPELINE_MODEL_PY)
    model = module.TritonPythonModel()
    params = {**ClassifierSettings(preprocess=PreprocessConfig(size=32), max_pixels=100_000).to_parameters(),
              "member_max_batch_size": "4", "tasks": "classifier"}
    model.initialize({"model_config": _config(params, max_batch_size=8)})
    requests = [pb.FakeRequest(IMAGE=_image(40, 30)), pb.FakeRequest(IMAGE=np.concatenate([_image(50, 44), _image(50, 44)])),
                pb.FakeRequest(IMAGE=_image(36, 36)), pb.FakeRequest(IMAGE=_image(64, 40))]
    responses = asyncio.run(model.execute(requests))
    assert not any(r.has_error() for r in responses)
    assert [{t.name(): t.as_numpy() for t in r.output_tensors}["PROBABILITIES"].shape for r in responses] == [(1, 30), (2, 30), (1, 30), (1, 30)]
    # Five images: the router in slices of 4 + 1; each member gets 5 x 2 TTA views in slices of 4, 4, 2.
    assert sorted(size for name, size in calls if name == "projection_router") == [1, 4]
    for member in ("pcam", "cait", "swin"):
        assert sorted(size for name, size in calls if name == f"ensemble_frontal_{member}") == [2, 4, 4]
    assert not any(name.startswith("ensemble_lateral") for name, _ in calls)


def test_zeroshot_merged_requests_share_one_encoder_call_and_fail_alone():
    from python_backends.pipeline import ServedPipeline

    pb.MODELS.clear()
    calls = []
    # from_args reads a repository; the pipeline is given instead
    model = ServedPipeline(None, _zeroshot_pipeline(calls), ("PROBABILITIES", "SIMILARITIES"))
    requests = [pb.FakeRequest(IMAGE=_image()), pb.FakeRequest(IMAGE=np.full((1, 40, 40), 7, np.uint16)),
                pb.FakeRequest(IMAGE=_image(60, 50))]
    responses = asyncio.run(model.execute(requests))
    assert [r.has_error() for r in responses] == [False, True, False]
    assert "constant image" in responses[1].error().message() and responses[1].error().code() == pb.TritonError.INVALID_ARG
    assert {t.name() for t in responses[0].output_tensors} == {"PROBABILITIES", "SIMILARITIES"}
    assert calls == [2]  # the two good images, one encoder call
    pb.MODELS.clear()


def test_tasks_parameter_is_checked():
    from python_backends.tasks import parse_tasks
    from python_backends.pipeline import ServedPipeline

    with pytest.raises(ValueError, match=r"declares outputs \['SIMILARITIES'\] that tasks classifier do not produce"):
        ServedPipeline.from_args({"model_config": _config({**ClassifierSettings(preprocess=PreprocessConfig(size=32)).to_parameters(),
                                                           "tasks": "classifier"}, output=[{"name": "SIMILARITIES"}])})

    assert parse_tasks("zeroshot, classifier") == ("classifier", "zeroshot")
    for bad in ("", "classifier,classifier", "segmentation"):
        with pytest.raises(ValueError, match="parameter tasks must name"):
            parse_tasks(bad)


def test_decisions_follow_the_operating_points_per_projection_and_none_without_them(networks):
    """Members answer logit 0 (p = 0.5 before gating): a 0.2 threshold calls it positive, a 0.9 one
    negative, the lateral point wins over `any` for a lateral image, a finding with no point gets -1;
    without operating points every decision is -1 and the calibrated output equals PROBABILITIES."""
    from cxrlt.contract.labels import TASK1_LABELS
    from cxrlt.contract.operating_points import Calibration, OperatingPoint, OperatingPoints, parse_policy

    def point(threshold):
        return OperatingPoint(threshold, 0.8, 0.7, (0.7, 0.9), (0.6, 0.8), 10, 20)

    table = OperatingPoints(parse_policy("sensitivity=0.8"),
                            {"Normal": {"any": point(0.2)}, "cardiomegaly": {"any": point(0.2), "lateral": point(0.9)}},
                            {"Normal": Calibration(2.0, 0.0)})
    outputs = [{"name": n} for n in ("PROBABILITIES", "DECISIONS", "CALIBRATED_PROBABILITIES", "PROJECTION")]
    settings = ClassifierSettings(preprocess=PreprocessConfig(size=32), max_pixels=100_000).to_parameters()
    answers = {}
    for name, extra in (("with", {"operating_points": table.to_json()}), ("without", {})):
        model = pb.load_model_py(PIPELINE_MODEL_PY).TritonPythonModel()
        model.initialize({"model_config": _config({**settings, "tasks": "classifier", **extra}, output=outputs)})
        responses = asyncio.run(model.execute([pb.FakeRequest(IMAGE=_image()),
                                               pb.FakeRequest(IMAGE=_image(), PROJECTION_HINT=np.array([[b"LL"]], dtype=object))]))
        answers[name] = [{t.name(): t.as_numpy() for t in r.output_tensors} for r in responses]
    frontal, lateral = answers["with"]
    normal, cardiomegaly = TASK1_LABELS.index("Normal"), TASK1_LABELS.index("cardiomegaly")
    assert frontal["DECISIONS"].dtype == np.int8 and frontal["DECISIONS"].shape == (1, 30)
    assert frontal["DECISIONS"][0, normal] == 1 and frontal["DECISIONS"][0, cardiomegaly] == 1
    assert lateral["DECISIONS"][0, cardiomegaly] == 0  # its lateral point (0.9), not the `any` one
    assert set(np.delete(frontal["DECISIONS"][0], [normal, cardiomegaly]).tolist()) == {-1}
    p = float(frontal["PROBABILITIES"][0, normal])
    assert frontal["CALIBRATED_PROBABILITIES"][0, normal] == pytest.approx(1 / (1 + ((1 - p) / p) ** 2), abs=1e-6)
    assert frontal["CALIBRATED_PROBABILITIES"][0, cardiomegaly] == pytest.approx(frontal["PROBABILITIES"][0, cardiomegaly])
    for answer in answers["without"]:
        assert set(answer["DECISIONS"].ravel().tolist()) == {-1}
        assert np.array_equal(answer["CALIBRATED_PROBABILITIES"], answer["PROBABILITIES"])
