"""The gate against non-chest images: the DICOM tag rules, the Mahalanobis gate's fit and score, and
the pipeline refusing or flagging with a fake pb_utils. Fast: no network, no server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from cxrlt.contract.acceptance import CHEST_BODY_PARTS, NotAChestRadiograph, check_header
from cxrlt.contract.ood_gate import GATE_FILE, NO_SCORE, OodGate, load_gate
from tests import fake_pb_utils as pb

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


# ------------------------------------------------------------------------------ tag rules


def test_tag_rules_accept_chest_radiographs_and_refuse_the_rest():
    check_header("CR", CR, "CHEST")
    check_header("DX", "", "")  # no body part: accepted
    check_header("", CR, "Torax ")  # no modality, a CR SOP class; a local chest term
    check_header("OT", SC, "")  # Secondary Capture by SOP class, whatever the modality
    with pytest.raises(NotAChestRadiograph, match="body part 'EXTREMITY' is not a chest"):
        check_header("CR", CR, "EXTREMITY")
    with pytest.raises(NotAChestRadiograph, match="modality CT .* is not a chest radiograph"):
        check_header("CT", CT, "CHEST")
    with pytest.raises(NotAChestRadiograph, match="modality unknown"):
        check_header("", CT, "")
    check_header("CR", CR, "KNEE", body_parts=("knee",))  # an override replaces the chest terms
    with pytest.raises(NotAChestRadiograph):
        check_header("CR", CR, "CHEST", body_parts=("KNEE",))


def test_one_rule_set_serves_the_node_the_backfill_and_load_image():
    from cxrlt.contract import acceptance
    from cxrlt.io import images
    from cxrlt.node import CHEST_BODY_PARTS as node_parts
    from cxrlt.node.backfill import RADIOGRAPH_SOP_CLASSES

    assert node_parts is CHEST_BODY_PARTS
    assert RADIOGRAPH_SOP_CLASSES == acceptance.RADIOGRAPHY_SOP_CLASSES + acceptance.SECONDARY_CAPTURE_SOP_CLASSES
    assert images.ACCEPTED_MODALITIES is acceptance.ACCEPTED_MODALITIES


def test_load_image_refuses_the_extremity_radiograph_of_pydicom_data():
    from cxrlt.io.images import InputError, load_image
    from cxrlt.io.samples import pydicom_data_file

    try:
        path = pydicom_data_file("RG3_UNCR.dcm")
    except FileNotFoundError:
        pytest.skip("pydicom-data is not installed")
    with pytest.raises(InputError, match="body part 'EXTREMITY' is not a chest"):
        load_image(path)
    assert load_image(path, body_parts=("EXTREMITY",)).pixels.shape == (1760, 1760)


# ------------------------------------------------------------------------------ Mahalanobis gate


def gaussian(rng, n, dim=8, shift=0.0):
    scales = np.linspace(0.5, 2.0, dim)
    return rng.normal(size=(n, dim)) * scales + shift


def test_fit_scores_the_distribution_low_and_a_shifted_one_high():
    from evaluation.ood_sets import auroc
    from exporters.ood_gate import fit_gate

    rng = np.random.default_rng(0)
    gate = fit_gate(gaussian(rng, 500), percentile=99.0, meta={"encoder_weights_sha256": "x"})
    assert gate.meta["fit_images"] == 500 and gate.meta["heldout_images"] == 500 and gate.meta["folds"] == 5
    # the threshold is the 99th percentile of the out-of-fold distances: 5 of 500 above it
    assert gate.meta["heldout_refused"] == pytest.approx(0.01)
    assert gate.threshold == pytest.approx(gate.meta["heldout_scores"]["99"])
    inside, outside = gate.score(gaussian(rng, 400)), gate.score(gaussian(rng, 400, shift=2.0))
    assert np.mean(inside > gate.threshold) < 0.03
    assert auroc(inside, outside) > 0.98
    # the distance of a Gaussian's own samples: about sqrt(dim)
    assert np.median(inside) == pytest.approx(np.sqrt(8), rel=0.25)
    with pytest.raises(ValueError, match="too few"):
        fit_gate(gaussian(rng, 10))


def test_gate_file_round_trip_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    gate = OodGate(rng.normal(size=4), np.eye(4), 3.5, {"feature": "f", "preprocess": {"a": "1"}})
    first = gate.save(tmp_path / "a.npz").read_bytes()
    assert gate.save(tmp_path / "b.npz").read_bytes() == first
    (tmp_path / GATE_FILE).write_bytes(first)
    loaded = load_gate(tmp_path)
    np.testing.assert_array_equal(loaded.mean, gate.mean)
    assert loaded.threshold == 3.5 and loaded.meta == gate.meta
    assert load_gate(tmp_path / "nowhere") is None
    (tmp_path / GATE_FILE).write_bytes(b"not a gate")
    with pytest.raises(ValueError, match="not a valid out-of-distribution gate"):
        load_gate(tmp_path)


def test_auroc_counts_ties_half():
    from evaluation.ood_sets import auroc

    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0 and auroc([1], [1]) == 0.5


# ------------------------------------------------------------------------------ served


def _served_gate(tmp_path: Path, action: str, threshold: str = ""):
    """A repository with a 4-D gate around the embedding [1, 0, 0, 0] and the served pipeline's gate."""
    from cxrlt.contract.preprocessing import PreprocessConfig
    from python_backends import bls
    from python_backends.gate import ServedGate
    from python_backends.zeroshot import ENCODER_MODEL

    meta = {"encoder_weights_sha256": "w" * 64, "preprocess": PreprocessConfig.clip(32).to_parameters()}
    from cxrlt.contract.releases import release_dir

    release_dir(tmp_path, 1).mkdir(parents=True, exist_ok=True)
    OodGate(np.array([1.0, 0, 0, 0]), np.eye(4) * 100, 2.0, meta).save(release_dir(tmp_path, 1) / GATE_FILE)
    (tmp_path / ENCODER_MODEL / "1").mkdir(parents=True)
    (tmp_path / ENCODER_MODEL / "1" / "encoder.json").write_text(json.dumps({"weights_sha256": "w" * 64}))
    args = {"model_repository": str(tmp_path / "cxr_classifier")}
    params = {"ood_action": action, "ood_threshold": threshold}
    return ServedGate.from_args(args, params, lambda: bls.make_infer({ENCODER_MODEL: "image_embeds"}), max_pixels=100_000)


def _encoder(calls: list):
    """A fake CLIP encoder: a bright image embeds at [1, 0, 0, 0] (in distribution), a dark one far away."""
    def run(inputs):
        pixels = inputs["pixel_values"]
        calls.append(len(pixels))
        out = np.zeros((len(pixels), 4), np.float32)
        bright = pixels.reshape(len(pixels), -1).mean(axis=1) > -1.0  # CLIP-normalised: black is about -1.8
        out[bright, 0] = 1.0
        out[~bright, 1] = 1.0
        return {"image_embeds": out}

    return run


def _image(level: int, height=40, width=30):
    return np.full((1, height, width), level, np.uint16) + np.arange(width, dtype=np.uint16)


@pytest.fixture
def fake_networks():
    from cxrlt.contract.served import ENCODER_MODEL

    pb.install()
    pb.MODELS.clear()
    pb.MODELS["projection_router"] = lambda i: {"logits": np.tile(np.array([[2.0, 0.0]], np.float32), (len(i["pixel_values"]), 1))}
    for projection in ("frontal", "lateral"):
        for name in ("pcam", "cait", "swin"):
            pb.MODELS[f"ensemble_{projection}_{name}"] = lambda i: {"logits": np.zeros((len(i["pixel_values"]), 30), np.float32)}
    calls: list = []
    pb.MODELS[ENCODER_MODEL] = _encoder(calls)
    yield calls
    pb.MODELS.clear()


def _classifier(gate):
    from cxrlt.contract.preprocessing import PreprocessConfig
    from python_backends import bls
    from python_backends.classifier import ClassifierPipeline, ClassifierSettings
    from python_backends.pipeline import ServedPipeline

    pb.install()
    settings = ClassifierSettings(preprocess=PreprocessConfig(size=32), max_pixels=100_000)
    pipeline = ClassifierPipeline(settings, bls.make_infer({}))
    return ServedPipeline(pipeline, None, ("PROBABILITIES", "PROJECTION", "OOD_SCORE"), gate=gate)


def test_refuse_answers_a_chest_and_refuses_an_outlier_with_invalid_argument(tmp_path, fake_networks):
    model = _classifier(_served_gate(tmp_path, "refuse"))
    chest, outlier = asyncio.run(model.execute([pb.FakeRequest(IMAGE=_image(30000)), pb.FakeRequest(IMAGE=_image(0))]))
    assert not chest.has_error()
    score = {t.name(): t.as_numpy() for t in chest.output_tensors}["OOD_SCORE"]
    assert score.shape == (1, 1) and score[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert outlier.error().code() == pb.TritonError.INVALID_ARG
    assert "not a chest radiograph (out-of-distribution score 14.14 > 2.00)" in outlier.error().message()
    assert fake_networks == [2]  # cxr_classifier: one encoder call for the batch


def test_flag_answers_the_outlier_with_its_score_and_the_threshold_parameter_overrides(tmp_path, fake_networks):
    model = _classifier(_served_gate(tmp_path, "flag", threshold="20"))
    assert model.gate.threshold == 20.0
    (outlier,) = asyncio.run(model.execute([pb.FakeRequest(IMAGE=_image(0))]))
    assert not outlier.has_error()
    assert {t.name(): t.as_numpy() for t in outlier.output_tensors}["OOD_SCORE"][0, 0] == pytest.approx(np.sqrt(200))


def test_without_a_gate_the_stub_says_so_once_and_scores_nan_without_an_encoder_call(tmp_path, fake_networks, caplog):
    from python_backends.gate import ServedGate

    with caplog.at_level("WARNING"):
        gate = ServedGate.from_args({"model_repository": str(tmp_path / "cxr_classifier")}, {}, lambda: None)
    assert not gate.fitted and sum("no out-of-distribution gate is fitted" in r.message for r in caplog.records) == 1
    (answer,) = asyncio.run(_classifier(gate).execute([pb.FakeRequest(IMAGE=_image(0))]))
    assert np.isnan({t.name(): t.as_numpy() for t in answer.output_tensors}["OOD_SCORE"][0, 0])
    assert fake_networks == [] and np.isnan(NO_SCORE)


def test_a_gate_of_other_encoder_weights_or_a_bad_action_fails_the_load(tmp_path):
    from python_backends.gate import ServedGate

    pb.install()
    _served_gate(tmp_path, "refuse")
    (tmp_path / "clip_image_encoder" / "1" / "encoder.json").write_text(json.dumps({"weights_sha256": "v" * 64}))
    with pytest.raises(ValueError, match="fitted on CLIP weights wwwwwwwwwwww but the image encoder serves vvvvvvvvvvvv"):
        ServedGate.from_args({"model_repository": str(tmp_path / "m")}, {}, lambda: None)
    with pytest.raises(ValueError, match="ood_action must be one of refuse, flag"):
        ServedGate(None, "warn")


def test_sdk_reads_the_score_and_flags_it_against_the_served_threshold():
    from cxrlt.client.sdk import ModelInfo, _ood, _ood_threshold

    class Response:
        def __init__(self, score):
            self.score = score

        def as_numpy(self, name):
            assert name == "OOD_SCORE"
            return np.array([[self.score]], np.float32)

    info = ModelInfo("cxr_findings", (), True, True, False, ood_scored=True, ood_threshold=_ood_threshold({"ood_threshold": "5.0"}))
    assert _ood(Response(7.0), info) == {"ood_score": 7.0, "ood_threshold": 5.0, "out_of_distribution": True}
    assert _ood(Response(1.0), info)["out_of_distribution"] is False
    assert _ood(Response(float("nan")), info) == {}
    assert _ood_threshold({"ood_threshold": ""}) is None and _ood_threshold({}) is None


# ------------------------------------------------------------------------------ identity


def test_identity_covers_every_weight_bound_file(tmp_path):
    from exporters.releases import WEIGHT_BOUND_FILES, repository_identity, weight_bound_files
    from cxrlt.contract.operating_points import OPERATING_POINTS_FILE

    manifest = {"models": {}, "text_cache": {}, "classifier": {}, "zeroshot": {}}
    assert GATE_FILE in WEIGHT_BOUND_FILES and OPERATING_POINTS_FILE in WEIGHT_BOUND_FILES
    bare = repository_identity(manifest, weight_bound_files(tmp_path))
    assert bare == repository_identity(manifest)
    (tmp_path / GATE_FILE).write_bytes(b"gate")
    gated = repository_identity(manifest, weight_bound_files(tmp_path))
    (tmp_path / GATE_FILE).write_bytes(b"another gate")
    assert len({bare, gated, repository_identity(manifest, weight_bound_files(tmp_path))}) == 3
    # the operating points' hash alone, as before: the same identity as in a mapping
    assert repository_identity(manifest, "ab") == repository_identity(manifest, {OPERATING_POINTS_FILE: "ab"})
