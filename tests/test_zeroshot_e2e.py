"""Issue: zero-shot findings served by a real tritonserver equal open_clip in PyTorch."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from cxrlt.contract.releases import release_dir
from cxrlt.contract.served import PIPELINE_MODELS
from cxrlt.contract.text_cache import PROMPTS_FILE
from exporters.build_repo import rebuild_text_cache
from cxrlt.contract.model_config import set_config_parameters
from networks.checkpoints import file_sha256
from tests.grpc_inputs import image_inputs
from evaluation.reference import ReferencePipeline

pytestmark = pytest.mark.e2e


def zeroshot(client, image):
    result = client.infer("cxr_zeroshot", image_inputs(image))
    return result.as_numpy("PROBABILITIES")[0], result.as_numpy("SIMILARITIES")[0]


@pytest.fixture
def repository(triton_server, grpc_client):
    """The served repository; the pipeline models' files (the release's text cache and prompts
    among them) are restored and the models reloaded afterwards."""
    repo = triton_server.model_repository
    backup = repo.parent / "pipelines-backup"
    for model in PIPELINE_MODELS:
        shutil.copytree(repo / model, backup / model)
    encoder_record = (repo / "clip_image_encoder" / "1" / "encoder.json").read_text()
    yield repo
    for model in PIPELINE_MODELS:
        shutil.rmtree(repo / model)
        shutil.move(backup / model, repo / model)
    (repo / "clip_image_encoder" / "1" / "encoder.json").write_text(encoder_record)
    with ThreadPoolExecutor(len(PIPELINE_MODELS)) as reloads:  # side by side: each unload sleeps 1 s per instance
        list(reloads.map(grpc_client.load_model, PIPELINE_MODELS))


def test_served_zeroshot_equals_open_clip_reference(grpc_client, triton_server, real_cxr, synthetic_cxrs):
    reference = ReferencePipeline(triton_server.model_repository, engine="torch")
    for image in (real_cxr, synthetic_cxrs["frontal"], synthetic_cxrs["lateral"]):
        probabilities, similarities = zeroshot(grpc_client, image)
        expected_p, expected_s = reference.score_zeroshot(image)
        np.testing.assert_allclose(similarities, expected_s, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probabilities, expected_p, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-5.0 * similarities)), atol=1e-5)


def test_in_process_encoder_gives_the_same_scores(grpc_client, triton_server, repository, real_cxr):
    """`member_execution: in_process`: cxr_zeroshot runs the encoder's ONNX itself, same scores."""
    before = zeroshot(grpc_client, real_cxr)
    set_config_parameters(repository / "cxr_zeroshot" / "config.pbtxt", {"member_execution": "in_process"})
    grpc_client.load_model("cxr_zeroshot")
    encoder_calls = _encoder_requests(grpc_client)
    after = zeroshot(grpc_client, real_cxr)
    for served, expected in zip(after, before):
        np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert _encoder_requests(grpc_client) == encoder_calls


def _encoder_requests(client) -> int:
    stats = client.get_inference_statistics("clip_image_encoder", as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def test_findings_equals_the_two_separate_calls(grpc_client, real_cxr, synthetic_cxrs):
    for image, hint in ((real_cxr, "PA"), (synthetic_cxrs["lateral"], None)):
        findings = grpc_client.infer("cxr_findings", image_inputs(image, hint))
        task1 = grpc_client.infer("cxr_classifier", image_inputs(image, hint))
        task2, _ = zeroshot(grpc_client, image)
        probabilities = findings.as_numpy("PROBABILITIES")[0]
        assert probabilities.shape == (36,)
        np.testing.assert_array_equal(probabilities[:30], task1.as_numpy("PROBABILITIES")[0])
        np.testing.assert_array_equal(probabilities[30:], task2)
        assert findings.as_numpy("PROJECTION")[0, 0] == task1.as_numpy("PROJECTION")[0, 0]
        assert findings.as_numpy("PROJECTION_SCORE")[0, 0] == task1.as_numpy("PROJECTION_SCORE")[0, 0]


def test_findings_passes_bad_input_errors_through(grpc_client, real_cxr):
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("cxr_findings", image_inputs(np.zeros((2, 2), np.uint16)))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "too small" in error.value.message()
    assert grpc_client.infer("cxr_findings", image_inputs(real_cxr)).as_numpy("PROBABILITIES").shape == (1, 36)


def test_prompt_edit_and_cache_rebuild_change_similarities_without_reexport(grpc_client, repository, real_cxr):
    onnx_before = file_sha256(repository / "clip_image_encoder" / "1" / "model.onnx")
    _, before = zeroshot(grpc_client, real_cxr)
    prompts = release_dir(repository, 1) / PROMPTS_FILE
    prompts.write_text(prompts.read_text().replace(
        "bilateral hilar adenopathy", "massive bulky lymph nodes in both hila and the aortopulmonary window"
    ))
    rebuild_text_cache(repository)
    grpc_client.load_model("cxr_zeroshot")
    probabilities, after = zeroshot(grpc_client, real_cxr)
    expected_p, expected_s = ReferencePipeline(repository, engine="torch").score_zeroshot(real_cxr)
    np.testing.assert_allclose(after, expected_s, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probabilities, expected_p, atol=1e-4, rtol=0)
    adenopathy = 4
    assert abs(after[adenopathy] - before[adenopathy]) > 1e-6
    np.testing.assert_allclose(np.delete(after, adenopathy), np.delete(before, adenopathy), atol=1e-6)
    assert file_sha256(repository / "clip_image_encoder" / "1" / "model.onnx") == onnx_before


def test_stale_prompt_cache_is_refused_with_rebuild_instructions(grpc_client, repository):
    prompts = release_dir(repository, 1) / PROMPTS_FILE
    prompts.write_text(prompts.read_text().replace("goiter extending", "goitre extending"))
    _touch_config(repository)
    with pytest.raises(InferenceServerException) as error:
        grpc_client.load_model("cxr_zeroshot")
    assert "changed after the text cache was built" in error.value.message()
    assert "cxrlt build-text-cache --repo" in error.value.message()


def test_cache_from_other_weights_is_refused(grpc_client, repository):
    record = repository / "clip_image_encoder" / "1" / "encoder.json"
    record.write_text(record.read_text().replace('"weights_sha256": "', '"weights_sha256": "0ther'))
    _touch_config(repository)
    with pytest.raises(InferenceServerException) as error:
        grpc_client.load_model("cxr_zeroshot")
    assert "was built from CLIP weights" in error.value.message() and "cxrlt build-text-cache" in error.value.message()


def _touch_config(repository):
    """Triton reloads a model only when its own files changed (a config.pbtxt with the same content is
    no change); the release's files are elsewhere, so touch the model's own code."""
    code = repository / "cxr_zeroshot" / "1" / "model.py"
    code.write_text(code.read_text())


def test_softmax_scoring_with_negative_prompts(grpc_client, repository, real_cxr):
    set_config_parameters(repository / "cxr_zeroshot" / "config.pbtxt", {"scoring": "softmax"})
    grpc_client.load_model("cxr_zeroshot")
    probabilities, _ = zeroshot(grpc_client, real_cxr)
    expected, _ = ReferencePipeline(repository, engine="torch").score_zeroshot(real_cxr)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
