"""Exporters and checkpoints: parity, determinism, checkpoint errors, prompt files, text cache."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
import torch

from cxrlt.contract.labels import TASK2_LABELS
from cxrlt.contract.profiles import get_profile
from cxrlt.contract.text_cache import StaleCacheError, load_text_cache, save_text_cache
from exporters.build_repo import BuildOptions, build_repository
from cxrlt.contract.model_config import config_parameters, read_config
from exporters.onnx_export import ParityError, check_parity, export_onnx
from cxrlt.contract.prompts import load_prompts
from networks.checkpoints import CheckpointError, checkpoint_path, save_state_dict, state_dict_sha256
from networks.weights import load_clip, load_network

TINY = get_profile("tiny")


def test_rebuilding_the_same_inputs_gives_the_same_repository(tiny_repository, tmp_path):
    again = tmp_path / "again"
    build_repository(again, BuildOptions(profile="tiny"))
    comparison = filecmp.dircmp(tiny_repository, again)

    def differences(cmp) -> list[str]:
        found = [f"{cmp.left}/{name}" for name in cmp.diff_files + cmp.left_only + cmp.right_only if name != "__pycache__"]
        return found + [d for sub in cmp.subdirs.values() for d in differences(sub)]

    assert differences(comparison) == []


def test_every_config_bounds_its_queue_and_rejects_overflow(tiny_repository):
    """Entry models hold the profile's queue bound; networks take the member budget; all REJECT."""
    from cxrlt.contract.model_config import parse
    from cxrlt.contract.profiles import get_profile
    from exporters.model_configs import queue_policy_block

    tiny = get_profile("tiny").queue
    for config_path in tiny_repository.glob("*/config.pbtxt"):
        config = read_config(config_path)
        policy = config.dynamic_batching.default_queue_policy
        assert policy.timeout_action == policy.REJECT and policy.allow_timeout_override, config.name
        if config.name.startswith("cxr_"):
            assert (policy.max_queue_size, policy.default_timeout_microseconds) == (tiny.max_queue_size, tiny.timeout_ms * 1000)
            assert config.parameters["member_timeout_ms"].string_value == str(tiny.member_timeout_ms)
        else:
            assert policy.max_queue_size == tiny.network_max_queue_size
            assert policy.default_timeout_microseconds == tiny.member_timeout_ms * 1000
    overridden = BuildOptions(profile="tiny", max_queue_size=3, queue_timeout_ms=250).queue_policy(get_profile("tiny"))
    assert (overridden.max_queue_size, overridden.timeout_ms, overridden.member_timeout_ms) == (3, 250, tiny.member_timeout_ms)
    block = parse(f"name: 'm'\ndynamic_batching {{\n{queue_policy_block(3, 250)}\n}}").dynamic_batching.default_queue_policy
    assert (block.max_queue_size, block.default_timeout_microseconds) == (3, 250_000)
    with pytest.raises(ValueError, match="max_queue_size must be at least 1"):
        BuildOptions(max_queue_size=0)


def test_every_generated_config_parses_with_tritons_model_config(tiny_repository):
    names = sorted(p.parent.name for p in tiny_repository.glob("*/config.pbtxt"))
    assert len(names) == 11
    for name in names:
        config = read_config(tiny_repository / name / "config.pbtxt")
        assert config.name == name and config.max_batch_size == 16
    assert config_parameters(tiny_repository / "cxr_classifier" / "config.pbtxt")["weights_frontal"] == "pcam=0.4,cait=0.2,swin=0.4"
    ngc = build_repository(tiny_repository.parent / "ngc", BuildOptions(profile="tiny", target="ngc", tensorrt=True))
    router = read_config(tiny_repository.parent / "ngc" / "projection_router" / "config.pbtxt")
    assert ngc["target"] == "ngc" and router.platform == "onnxruntime_onnx" and not router.backend
    assert router.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert not (tiny_repository.parent / "ngc" / "projection_router" / "1" / "model.py").exists()


@pytest.mark.slow  # builds a repository or trains: tens of seconds on 2 cores
def test_checkpoints_are_loaded_and_recorded(tmp_path):
    checkpoints = tmp_path / "ckpt"
    trained, _ = load_network(TINY, "ensemble_lateral_pcam", seed=7)
    save_state_dict(trained, checkpoint_path(checkpoints, "ensemble_lateral_pcam"), epoch=3)
    clip, _ = load_clip(TINY, seed=7)
    torch.save(clip.state_dict(), checkpoint_path(checkpoints, "clip"))  # a bare open_clip state_dict
    manifest = build_repository(tmp_path / "repo", BuildOptions(profile="tiny", checkpoints=checkpoints, allow_random=True))
    member = manifest["models"]["ensemble_lateral_pcam"]
    assert member["checkpoint"].endswith("ensemble_lateral_pcam.pt")
    assert member["weights_sha256"] == state_dict_sha256(trained)
    assert manifest["models"]["clip_image_encoder"]["weights_sha256"] == state_dict_sha256(clip)
    assert manifest["models"]["projection_router"]["checkpoint"] is None and manifest["random_weights"] is True
    encoder = json.loads((tmp_path / "repo" / "clip_image_encoder" / "1" / "encoder.json").read_text())
    assert encoder["weights_sha256"] == state_dict_sha256(clip)


def test_missing_checkpoint_without_allow_random_is_an_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="has no projection_router.pt"):
        build_repository(tmp_path / "repo", BuildOptions(profile="tiny", checkpoints=tmp_path / "ckpt"))
    assert not (tmp_path / "repo").exists()  # a failed build leaves nothing behind


@pytest.mark.parametrize("corrupt, message", [("drop", "missing key"), ("shape", "has shape"), ("extra", "unexpected key")])
def test_checkpoint_mismatch_names_file_and_first_bad_key(tmp_path, corrupt, message):
    model, _ = load_network(TINY, "ensemble_frontal_swin")
    state = model.state_dict()
    first = next(iter(state))
    if corrupt == "drop":
        del state[first]
    elif corrupt == "shape":
        state[first] = torch.zeros(3, 3)
    else:
        state["head.bogus"] = torch.zeros(1)
    path = checkpoint_path(tmp_path, "ensemble_frontal_swin")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_network(TINY, "ensemble_frontal_swin", tmp_path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert (first if corrupt != "extra" else "head.bogus") in str(error.value)


def test_parity_check_catches_an_unfaithful_export(tmp_path):
    model, _ = load_network(TINY, "ensemble_frontal_pcam")
    onnx_path = export_onnx(model, tmp_path / "m.onnx", TINY.image_size, "logits")
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    assert check_parity(model, onnx_path, [batch]) <= 1e-4
    with torch.no_grad():
        model.head.classifier.bias += 0.01  # PyTorch now differs from the exported file
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(model, onnx_path, [batch])


def test_prompt_file_validation(tmp_path):
    prompts = load_prompts()
    assert prompts.class_names == TASK2_LABELS and all(len(p) >= 3 for p in prompts.prompts)
    assert prompts.negatives is not None
    bad = tmp_path / "p.yaml"
    bad.write_text("classes:\n  - name: Scoliosis\n    prompts: ['curved spine']\n")
    with pytest.raises(ValueError, match="lacks classes"):
        load_prompts(bad)


def test_text_cache_refuses_mismatches(tmp_path):
    encoder = tmp_path / "encoder.json"
    encoder.write_text(json.dumps({"weights_sha256": "abc", "dim": 4}))
    (tmp_path / "prompts.yaml").write_text("x")
    positive = np.ones((6, 4), np.float32)
    save_text_cache(tmp_path, TASK2_LABELS, positive, None, {"weights_sha256": "abc", "prompts_sha256": "nope"})
    with pytest.raises(StaleCacheError, match="changed after the text cache was built"):
        load_text_cache(tmp_path, TASK2_LABELS, encoder)
    (tmp_path / "prompts.yaml").unlink()
    assert load_text_cache(tmp_path, TASK2_LABELS, encoder).positive.shape == (6, 4)
    with pytest.raises(StaleCacheError, match="differ from the served classes"):
        load_text_cache(tmp_path, TASK2_LABELS[::-1], encoder)
    encoder.write_text(json.dumps({"weights_sha256": "abc", "dim": 8}))
    with pytest.raises(StaleCacheError, match="does not fit"):
        load_text_cache(tmp_path, TASK2_LABELS, encoder)
    with pytest.raises(StaleCacheError, match="no text cache"):
        load_text_cache(tmp_path / "missing", TASK2_LABELS, encoder)


@pytest.mark.slow  # builds a repository or trains: tens of seconds on 2 cores
def test_torchscript_engine_repository_serves_like_pytorch(tmp_path):
    """The TorchScript engine (PyTorch on CUDA where available) gives the same logits on CPU."""
    from cxrlt.server.launcher import TritonServer, free_port
    import tritonclient.grpc as grpcclient

    manifest = build_repository(tmp_path / "ts", BuildOptions(profile="tiny", engine="torchscript", device="cpu"))
    assert manifest["models"]["ensemble_frontal_cait"]["torchscript_parity_max_abs_diff"] <= 1e-4
    model, _ = load_network(TINY, "ensemble_frontal_cait")
    batch = np.random.default_rng(3).standard_normal((2, 3, 64, 64), dtype=np.float32)
    with TritonServer(tmp_path / "ts", grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server:
        client = grpcclient.InferenceServerClient(server.endpoints.grpc)
        tensor = grpcclient.InferInput("pixel_values", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        served = client.infer("ensemble_frontal_cait", [tensor]).as_numpy("logits")
    with torch.no_grad():
        np.testing.assert_allclose(served, model(torch.from_numpy(batch)).numpy(), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchscript_runner_fp16_on_cuda(tmp_path):
    from exporters.torchscript_export import export_torchscript
    from python_backends.torch_runner import TorchScriptRunner

    model, _ = load_network(TINY, "ensemble_frontal_pcam")
    path = export_torchscript(model.cuda(), tmp_path / "m.pt", TINY.image_size)
    batch = np.random.default_rng(0).standard_normal((4, 3, 64, 64), dtype=np.float32)
    runner = TorchScriptRunner(path, device="cuda", fp16=True)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch).cuda()).float().cpu().numpy()
    np.testing.assert_allclose(runner.run(batch), expected, atol=5e-2)


def test_clip_model_is_selectable_and_recorded():
    from cxrlt.contract.manifest import manifest_profile

    paper = get_profile("paper", "ViT-L-14")
    assert paper.clip.model_name == "ViT-L-14" and paper.image_size == 512
    assert get_profile("paper").clip.model_name == "ViT-B-32"
    assert manifest_profile({"profile": "tiny", "clip_model": "ViT-S-32"}).clip.model_name == "ViT-S-32"
    assert manifest_profile({"profile": "tiny"}).clip.model_name == TINY.clip.model_name


def test_execution_provider_is_written_into_the_network_and_bls_configs():
    from cxrlt.contract.profiles import get_profile
    from exporters.build_repo import _network_config

    text = _network_config(BuildOptions(profile="tiny", execution_provider="cuda"), get_profile("tiny"), "projection_router",
                           64, "logits", 2, labels=False)
    assert 'key: "execution_provider"' in text and 'string_value: "cuda"' in text.split('key: "execution_provider"')[1][:80]
    with pytest.raises(ValueError, match="execution_provider must be one of auto, cpu, cuda"):
        BuildOptions(execution_provider="tpu")


def test_repository_identity_is_one_function_and_edits_keep_it_current(tiny_repository, tmp_path):
    """Build, tune-weights' writer and build-text-cache all give repository_identity(manifest) in the
    manifest and the three pipeline configs."""
    import shutil

    from cxrlt.contract.manifest import read_manifest
    from cxrlt.contract.served import PIPELINE_MODELS
    from exporters.releases import repository_identity
    from evaluation.tune import write_weights

    def identities(repo):
        manifest = read_manifest(repo)
        served = {config_parameters(repo / model / "config.pbtxt")["repository_sha256"] for model in PIPELINE_MODELS}
        return manifest["repository_sha256"], served, repository_identity(manifest)

    built, served, recomputed = identities(tiny_repository)
    assert served == {built} and recomputed == built
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    write_weights(repo, {"frontal": {"pcam": 1.0, "cait": 0.0, "swin": 0.0}, "lateral": {"pcam": 0.0, "cait": 0.5, "swin": 0.5}})
    tuned, served, recomputed = identities(repo)
    assert tuned != built and served == {tuned} and recomputed == tuned


def test_a_gate_fitted_into_a_built_repository_is_served_and_covered_by_the_identity(tiny_repository, tmp_path):
    """A built repository has no gate (ood_action refuse, ood_threshold empty); fit_repository_gate
    writes ood_gate.npz, the threshold into the three pipeline configs, the manifest record, and an
    identity that covers the file; the served gate then loads against the served encoder."""
    import shutil

    from cxrlt.contract.manifest import read_manifest
    from cxrlt.contract.ood_gate import GATE_FILE, load_gate
    from cxrlt.io.synthetic import synthetic_radiographs
    from cxrlt.contract.releases import files_of
    from cxrlt.contract.served import PIPELINE_MODELS
    from exporters.releases import repository_identity, weight_bound_files
    from exporters.ood_gate import fit_repository_gate
    from python_backends.gate import ServedGate

    for model in PIPELINE_MODELS:
        params = config_parameters(tiny_repository / model / "config.pbtxt")
        assert params["ood_action"] == "refuse" and params["ood_threshold"] == ""
        assert any(output.name == "OOD_SCORE" for output in read_config(tiny_repository / model / "config.pbtxt").output)
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    before = read_manifest(repo)["repository_sha256"]
    rng = np.random.default_rng(0)
    images = [np.clip(image.astype(np.float64) + rng.normal(0, 2000, image.shape), 0, 65535).astype(np.uint16)
              for image in synthetic_radiographs().values() for _ in range(12)]
    record = fit_repository_gate(repo, images, "synthetic")
    manifest = read_manifest(repo)
    assert record["fit_images"] == 24 and manifest["ood_gate"]["sha256"] == weight_bound_files(files_of(repo))[GATE_FILE]
    assert manifest["repository_sha256"] == record["repository_sha256"] != before
    assert manifest["repository_sha256"] == repository_identity(manifest, weight_bound_files(files_of(repo)))
    gate = load_gate(files_of(repo))
    for model in PIPELINE_MODELS:
        params = config_parameters(repo / model / "config.pbtxt")
        assert float(params["ood_threshold"]) == gate.threshold and params["repository_sha256"] == manifest["repository_sha256"]
    served = ServedGate.from_args({"model_repository": str(repo / "cxr_zeroshot")}, params, lambda: None)
    assert served.fitted and served.threshold == gate.threshold
