"""Issue: every network is exported, served by a real tritonserver, and equals onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from cxrlt.contract.profiles import get_profile
from cxrlt.contract.manifest import read_manifest
from python_backends.onnx_runner import OnnxRunner

pytestmark = pytest.mark.e2e

TINY = get_profile("tiny")
NETWORKS = [*TINY.network_specs(), "clip_image_encoder"]


def _input(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _size(model: str) -> int:
    return TINY.clip.image_size if model == "clip_image_encoder" else TINY.image_size


def test_every_model_is_ready(grpc_client):
    for model in [*NETWORKS, "cxr_classifier", "cxr_zeroshot", "cxr_findings"]:
        assert grpc_client.is_model_ready(model), f"{model} is not READY"


@pytest.mark.parametrize("model", NETWORKS)
def test_served_network_equals_onnxruntime(grpc_client, triton_server, model):
    size = _size(model)
    batch = np.random.default_rng(len(model)).standard_normal((3, 3, size, size), dtype=np.float32)
    output = "image_embeds" if model == "clip_image_encoder" else "logits"
    served = grpc_client.infer(model, [_input("pixel_values", batch, "FP32")]).as_numpy(output)
    expected = OnnxRunner(triton_server.model_repository / model / "1" / "model.onnx").run(batch)
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() <= 1e-5


def test_manifest_records_parity_and_parameters(tiny_repository):
    manifest = read_manifest(tiny_repository)
    assert manifest["profile"] == "tiny" and manifest["random_weights"] is True
    for model in NETWORKS:
        entry = manifest["models"][model]
        assert entry["parameters"] > 1000
        assert 0 <= entry["parity_max_abs_diff"] <= 1e-4
        assert len(entry["onnx_sha256"]) == 64


@pytest.mark.parametrize(
    "array, dtype, problem",
    [
        (np.zeros((1, 3, 64, 64), dtype=np.float64), "FP64", "data-type"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), "FP32", "shape"),
        (np.zeros((1, 64, 64), dtype=np.float32), "FP32", "shape"),
    ],
)
def test_bad_network_input_is_rejected_and_server_stays_healthy(grpc_client, array, dtype, problem):
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("projection_router", [_input("pixel_values", array, dtype)])
    message = str(error.value).lower()
    assert "pixel_values" in message and problem in message and "invalid_argument" in message
    good = np.zeros((1, 3, 64, 64), dtype=np.float32)
    assert grpc_client.infer("projection_router", [_input("pixel_values", good, "FP32")]).as_numpy("logits").shape == (1, 2)
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
