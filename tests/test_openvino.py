"""Execution choices (provider x precision), the parity gate, OpenVINO behind the ONNX runner, the PCAM
head's export fix; and one end-to-end build with --execution-provider openvino --precision bf16."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrlt.cli.main import build_parser
from exporters.onnx_export import ParityError
from exporters.precision import ParityLimits, average_precision, check_execution, gate, is_reference, mean_ap

pytest.importorskip("openvino")


@pytest.mark.parametrize("provider, precision", [("cpu", "fp32"), ("cpu", "int8"), ("openvino", "fp32"),
                                                 ("openvino", "bf16"), ("openvino", "int8"), ("auto", "fp32"), ("cuda", "fp32")])
def test_served_execution_choices(provider, precision):
    check_execution(provider, precision)
    assert is_reference(provider, precision) == (provider != "openvino" and precision == "fp32")


@pytest.mark.parametrize("provider, precision, message", [
    ("cpu", "bf16", "bf16 runs on --execution-provider openvino"), ("cuda", "int8", "serves precision fp32"),
    ("auto", "int8", "serves precision fp32"), ("openvino", "fp16", "precision must be one of"),
    ("tensorrt", "fp32", "execution_provider must be one of")])
def test_unserved_execution_choices_are_refused(provider, precision, message):
    with pytest.raises(ValueError, match=message):
        check_execution(provider, precision)


def test_build_options_refuse_openvino_with_torchscript():
    from exporters.build_repo import BuildOptions

    with pytest.raises(ValueError, match="ONNX engine"):
        BuildOptions(engine="torchscript", execution_provider="openvino")
    with pytest.raises(ValueError, match="bf16 runs on"):
        BuildOptions(precision="bf16")


def test_build_repo_and_bench_parse_the_new_options(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["build-repo", "--out", str(tmp_path), "--execution-provider", "openvino", "--precision", "bf16",
                              "--max-dp", "0.02"])
    assert (args.execution_provider, args.precision, args.max_dp, args.max_dmap) == ("openvino", "bf16", 0.02, 0.005)
    args = parser.parse_args(["bench", "--repo", str(tmp_path), "--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert [p.name for p in args.compare] == ["a", "b"]


def test_gate_admits_within_and_refuses_outside_the_limits():
    limits = ParityLimits()
    gate("net", {"max_abs_dp": 0.01}, limits, "bf16", "openvino")
    gate("pipeline", {"max_abs_dp": 0.001, "abs_dmAP": 0.005}, limits, "bf16", "openvino")
    with pytest.raises(ParityError, match=r"net: precision int8 on openvino is refused: max \|dp\| 0.0101 > 0.01"):
        gate("net", {"max_abs_dp": 0.0101}, limits, "int8", "openvino")
    with pytest.raises(ParityError, match=r"\|dmAP\| 0.006 > 0.005"):
        gate("pipeline", {"max_abs_dp": 0.0, "abs_dmAP": 0.006}, limits, "int8", "cpu")
    with pytest.raises(ParityError):  # NaN is never within limits
        gate("net", {"max_abs_dp": float("nan")}, limits, "bf16", "openvino")


def test_average_precision_matches_its_definition():
    y = np.array([1, 0, 1, 0, 0, 1])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    assert average_precision(y, score) == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
    labels = np.stack([y, np.zeros_like(y)], axis=1)  # the second class has no positive: left out
    assert mean_ap(labels, np.stack([score, score], axis=1)) == pytest.approx(average_precision(y, score))


def _pcam_head_onnx(tmp_path):
    import torch

    from exporters.onnx_export import export_onnx
    from networks.factory import PCAMPool

    torch.manual_seed(0)

    class Head(torch.nn.Module):  # [B, 3, 8, 8] -> a 48-channel feature map -> the PCAM head
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.pool = torch.nn.Conv2d(3, 48, 1), PCAMPool(48, 5)

        def forward(self, x):
            return self.pool(self.stem(x))

    module = Head().eval()
    return module, export_onnx(module, tmp_path / "head.onnx", 8, "logits")


def test_pcam_head_exports_as_einsum_and_openvino_fp32_matches(tmp_path):
    import onnx
    import torch

    from python_backends.onnx_runner import OnnxRunner

    module, path = _pcam_head_onnx(tmp_path)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "ReduceSum" not in ops[-3:] and ops.count("Einsum") == 2  # the pooling and the class logit
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    runner = OnnxRunner(path, 1, "openvino")
    assert runner.providers == ["OpenVINO CPU (fp32)"]  # no metadata: FP32, asked for explicitly
    assert np.abs(runner.run(x) - expected).max() < 1e-5


def test_the_precision_travels_in_the_file(tmp_path):
    from exporters.precision import record_precision
    from python_backends.onnx_runner import OnnxRunner

    _, path = _pcam_head_onnx(tmp_path)
    record_precision(path, "bf16")
    record_precision(path, "bf16")  # replaces, never duplicates
    assert OnnxRunner(path, 1, "openvino").providers == ["OpenVINO CPU (bf16)"]
    assert OnnxRunner(path, 1, "cpu").providers == ["CPUExecutionProvider"]  # onnxruntime ignores it


@pytest.mark.e2e
def test_openvino_bf16_build_records_parity_and_its_network_models_serve_it(tmp_path):
    """A tiny build on OpenVINO bf16: every network's parity against onnxruntime FP32 and the served
    pipeline's are in the manifest and within the limits; a network model (its model.py, as Triton
    loads it) answers with the bf16 runtime, within the gate's |dp| of onnxruntime FP32."""
    from exporters.build_repo import BuildOptions, build_repository
    from python_backends.onnx_runner import OnnxRunner
    from tests import fake_pb_utils as pb

    repo = tmp_path / "repo"
    manifest = build_repository(repo, BuildOptions(allow_random=True, execution_provider="openvino", precision="bf16"))
    assert manifest["execution"]["execution_provider"] == "openvino" and manifest["execution"]["precision"] == "bf16"
    for name, entry in manifest["models"].items():
        parity = entry["served_parity"]
        assert parity["runtime"] == ["OpenVINO CPU (bf16)"], name
        assert 0 < parity["max_abs_dp"] <= 0.01 and parity["max_abs_dlogit"] > 0, name  # bf16 really ran
    pipeline = manifest["execution"]["pipeline_parity"]
    assert pipeline["images"] >= 2 and pipeline["max_abs_dp"] <= 0.01

    model_dir = repo / "ensemble_frontal_pcam"
    model = pb.load_model_py(model_dir / "1" / "model.py").TritonPythonModel()
    config = (model_dir / "config.pbtxt").read_text()
    assert '"openvino"' in config and '"bf16"' in config
    from google.protobuf.json_format import MessageToDict

    from cxrlt.contract.model_config import parse

    as_triton_gives_it = MessageToDict(parse(config), preserving_proto_field_name=True)
    model.initialize({"model_config": json.dumps(as_triton_gives_it), "model_repository": str(model_dir), "model_version": "1"})
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    (response,) = model.execute([pb.FakeRequest(pixel_values=x)])
    assert not response.has_error()
    served = response.output_tensors[0].as_numpy()
    reference = OnnxRunner(model_dir / "1" / "model.onnx", 1, "cpu").run(x)
    dp = np.abs(1 / (1 + np.exp(-served)) - 1 / (1 + np.exp(-reference))).max()
    assert 0 < dp <= 0.01
