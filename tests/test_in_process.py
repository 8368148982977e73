"""python_backends.in_process: the networks a BLS model (or the raw benchmark) runs itself."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from exporters.build_repo import BuildOptions
from python_backends.classifier import network_names
from python_backends.in_process import LocalNetworks, member_execution
from python_backends.onnx_runner import OnnxRunner


def test_infer_runs_the_repository_onnx_file(tiny_repository):
    local = LocalNetworks(tiny_repository, providers="cpu")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    name = "ensemble_frontal_pcam"
    expected = OnnxRunner(tiny_repository / name / "1" / "model.onnx", 1, "cpu").run(pixels)
    np.testing.assert_array_equal(asyncio.run(local.infer(name, pixels)), expected)
    assert local.runner(name) is local.runner(name)  # one session per model, made once


def test_load_creates_every_classifier_network_and_names_a_missing_one(tiny_repository, tmp_path):
    assert sorted(LocalNetworks(tiny_repository, providers="cpu").load(network_names()).loaded()) == sorted(network_names())
    with pytest.raises(FileNotFoundError, match="'projection_router'.*cxrlt build-repo"):
        LocalNetworks(tmp_path).load(["projection_router"])


def test_member_execution_values_are_checked():
    assert member_execution("in_process") == "in_process"
    with pytest.raises(ValueError, match="bls, in_process"):
        member_execution("in-process")
    with pytest.raises(ValueError, match="torchscript"):
        BuildOptions(member_execution="in_process", engine="torchscript")
    with pytest.raises(ValueError, match="member_execution"):
        BuildOptions(member_execution="remote")


def test_member_execution_option_reaches_every_pipeline_config():
    from cxrlt.contract.profiles import get_profile
    from exporters.build_repo import default_classifier_settings, default_zeroshot_settings, pipeline_parameters, release_parameters

    profile = get_profile("tiny")
    options = BuildOptions(member_execution="in_process", ort_threads=2)
    classifier, zeroshot = default_classifier_settings(profile), default_zeroshot_settings(profile)
    params = pipeline_parameters(options, profile, classifier, zeroshot, release_parameters(classifier, True, "x"))
    assert set(params) == {"cxr_classifier", "cxr_zeroshot", "cxr_findings"}
    for values in params.values():
        assert values["member_execution"] == "in_process" and values["member_intra_op_threads"] == "2"
