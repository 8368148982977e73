"""Issue: cxr_classifier served by a real tritonserver equals the reference pipeline."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from cxrlt.contract.model_config import set_config_parameters
from tests.grpc_inputs import image_inputs, inference_counts
from evaluation.reference import ReferencePipeline

pytestmark = pytest.mark.e2e


def classify(client, image, hint=None, model="cxr_classifier"):
    result = client.infer(model, image_inputs(image, hint))
    return (
        result.as_numpy("PROBABILITIES")[0],
        result.as_numpy("PROJECTION")[0, 0].decode(),
        float(result.as_numpy("PROJECTION_SCORE")[0, 0]),
        result,
    )


@pytest.fixture(scope="module")
def reference(triton_server):
    return ReferencePipeline(triton_server.model_repository, engine="torch")


@pytest.mark.parametrize("hint", [None, "PA", "LL", ""])
def test_served_equals_reference_on_real_and_synthetic_images(grpc_client, reference, real_cxr, synthetic_cxrs, hint):
    for image in (real_cxr, synthetic_cxrs["frontal"], synthetic_cxrs["lateral"]):
        probabilities, projection, score, result = classify(grpc_client, image, hint)
        expected = reference.classify(image, hint)
        assert projection == expected.projection
        assert score == pytest.approx(expected.projection_score, abs=1e-4)
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-4, rtol=0)
        np.testing.assert_allclose(result.as_numpy("LOGITS")[0], expected.logits, atol=1e-4, rtol=0)
        if hint == "LL":
            assert projection == "lateral"
        if hint == "PA":
            assert projection == "frontal"


def test_classification_extension_returns_labels(grpc_client, real_cxr):
    result = grpc_client.infer(
        "cxr_classifier", image_inputs(real_cxr), outputs=[grpcclient.InferRequestedOutput("PROBABILITIES", class_count=3)]
    )
    top = [entry.decode().split(":") for entry in result.as_numpy("PROBABILITIES")[0]]
    assert len(top) == 3 and all(len(parts) == 3 for parts in top)
    assert all(parts[2] for parts in top)  # label names come from labels.txt


@pytest.fixture
def edited_classifier(triton_server, grpc_client):
    """Edit cxr_classifier's config on disk, reload it, and restore it afterwards."""
    config = triton_server.model_repository / "cxr_classifier" / "config.pbtxt"
    original = config.read_text()

    def edit(**params: str) -> None:
        set_config_parameters(config, params)
        grpc_client.load_model("cxr_classifier")

    yield edit
    config.write_text(original)
    grpc_client.load_model("cxr_classifier")


def test_config_weights_and_alpha_change_served_result_as_reference_predicts(
    grpc_client, triton_server, edited_classifier, real_cxr, synthetic_cxrs
):
    before, _, _, _ = classify(grpc_client, real_cxr, "PA")
    edited_classifier(weights_frontal="pcam=0.1,cait=0.7,swin=0.2", normal_gating_alpha="2.0", tta_views="identity,hflip,rot+5")
    after, _, _, _ = classify(grpc_client, real_cxr, "PA")
    reference = ReferencePipeline(triton_server.model_repository, engine="torch")  # reads the edited config
    assert reference.classifier_settings.gating_alpha == 2.0
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, reference.classify(real_cxr, "PA").probabilities, atol=1e-4, rtol=0)
    lateral, projection, _, _ = classify(grpc_client, synthetic_cxrs["lateral"], "LL")
    assert projection == "lateral"
    np.testing.assert_allclose(lateral, reference.classify(synthetic_cxrs["lateral"], "LL").probabilities, atol=1e-4, rtol=0)


def _member_stats(client) -> dict[str, dict[str, int]]:
    """Every ensemble member's counts from Triton's statistics API."""
    return {name: counts for name, counts in inference_counts(client).items() if name.startswith("ensemble_")}


def test_in_process_members_give_the_same_result_without_calling_the_network_models(
    grpc_client, triton_server, edited_classifier, real_cxr, synthetic_cxrs
):
    """`member_execution: in_process` runs the same ONNX files inside cxr_classifier: the
    served result still equals the reference, and no request reaches a network model."""
    reference = ReferencePipeline(triton_server.model_repository, engine="torch")
    edited_classifier(member_execution="in_process")
    before = _member_stats(grpc_client)
    for image, hint in ((real_cxr, None), (synthetic_cxrs["frontal"], "PA"), (synthetic_cxrs["lateral"], "LL")):
        probabilities, projection, score, _ = classify(grpc_client, image, hint)
        expected = reference.classify(image, hint)
        assert projection == expected.projection
        assert score == pytest.approx(expected.projection_score, abs=1e-4)
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-4, rtol=0)
    assert _member_stats(grpc_client) == before


def test_unknown_member_execution_fails_the_load_with_the_reason(grpc_client, triton_server, edited_classifier):
    with pytest.raises(InferenceServerException, match="member_execution must be one of bls, in_process"):
        edited_classifier(member_execution="sideways")
    assert grpc_client.is_server_live()


@pytest.mark.parametrize(
    "image, hint, dtype, problem",
    [
        (np.zeros((0, 0), np.uint16), None, "UINT16", "empty"),
        (np.zeros((1, 1), np.uint16), None, "UINT16", "too small"),
        (np.zeros((64, 64), np.float32), None, "FP32", "data-type"),
        (np.zeros((64, 64), np.uint16), "OBLIQUE", "UINT16", "unknown projection hint"),
    ],
)
def test_bad_requests_get_invalid_argument_and_others_succeed(grpc_client, triton_server, real_cxr, image, hint, dtype, problem):
    good_client = grpcclient.InferenceServerClient(triton_server.endpoints.grpc)
    with ThreadPoolExecutor(max_workers=3) as pool:
        good = [pool.submit(classify, good_client, real_cxr, "PA") for _ in range(2)]
        with pytest.raises(InferenceServerException) as error:
            grpc_client.infer("cxr_classifier", image_inputs(image, hint, dtype))
        assert all(f.result()[1] == "frontal" for f in good)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert problem in error.value.message()
    assert classify(grpc_client, real_cxr)[0].shape == (30,)


def test_wrong_rank_is_rejected(grpc_client, real_cxr):
    tensor = grpcclient.InferInput("IMAGE", [1, 64], "UINT16")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.uint16))
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("cxr_classifier", [tensor])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "shape" in error.value.message()
    assert classify(grpc_client, real_cxr)[0].shape == (30,)


def test_pixel_limit_from_config(grpc_client, edited_classifier, real_cxr):
    edited_classifier(max_pixels="10000")
    with pytest.raises(InferenceServerException) as error:
        classify(grpc_client, real_cxr)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "exceeds the limit of 10000 pixels" in error.value.message()


def test_unavailable_member_is_named_and_server_recovers(grpc_client, real_cxr):
    grpc_client.unload_model("ensemble_frontal_swin")
    try:
        with pytest.raises(InferenceServerException) as error:
            classify(grpc_client, real_cxr, "PA")
        assert "ensemble_frontal_swin" in error.value.message()
        assert error.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.INTERNAL")
        # the other projection's ensemble is untouched
        assert classify(grpc_client, real_cxr, "LL")[1] == "lateral"
    finally:
        grpc_client.load_model("ensemble_frontal_swin")
    assert classify(grpc_client, real_cxr, "PA")[1] == "frontal"


def test_served_configs_describe_the_contract(grpc_client):
    """A plain tritonclient user learns the input meaning and label order from the model config."""
    for model, classes in (("cxr_classifier", 30), ("cxr_zeroshot", 6), ("cxr_findings", 36)):
        config = grpc_client.get_model_config(model, as_json=True)["config"]
        description = config["parameters"]["description"]["string_value"]
        assert "MONOCHROME2" in description and "UINT16" in description, description
        assert f"PROBABILITIES FP32 [{classes}]" in description and "labels.txt" in description
        assert ("PROJECTION_HINT" in description) == (model != "cxr_zeroshot")
