"""ONNX export with a parity check against PyTorch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from python_backends.onnx_runner import OnnxRunner

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


def export_onnx(model: nn.Module, path: Path | str, image_size: int, output_name: str) -> Path:
    """Export [B, 3, S, S] -> [B, K] with a dynamic batch axis (TorchScript exporter, opset 17)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic; trace the plain path.
    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["pixel_values"],
            output_names=[output_name],
            dynamic_axes={"pixel_values": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    torch.backends.mha.set_fastpath_enabled(fastpath)
    proto = onnx.load_from_string(buffer.getvalue())
    if broadcast_dots_as_einsum(proto):
        buffer = io.BytesIO(proto.SerializeToString())
    onnx.checker.check_model(proto)
    path.write_bytes(buffer.getvalue())
    return path


def broadcast_dots_as_einsum(proto: onnx.ModelProto) -> int:
    """Rewrite ReduceSum(Mul(X [B, K, C], W [K, C]), axes=[-1], keepdims=0) as Einsum("bkc,kc->bk", X, W);
    return how many were rewritten.

    The PCAM head ends with this pattern (its class logit from the pooled feature), and OpenVINO
    2026.4's CPU plugin computes it wrong: off by 8.7e-2 on outputs of 0.2 for that subgraph alone,
    in f32 and bf16, static or dynamic batch, while the same product as one Einsum is exact
    (1e-7), as is onnxruntime either way. The rewrite is the same arithmetic for every runtime.
    """
    from onnx import helper, numpy_helper, shape_inference

    graph = proto.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in (*shape_inference.infer_shapes(proto).graph.value_info, *graph.input, *graph.output)}
    ranks.update({i.name: len(i.dims) for i in graph.initializer})
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten = 0
    for index, node in enumerate(list(graph.node)):
        mul = producers.get(node.input[0]) if node.op_type == "ReduceSum" and node.input else None
        if mul is None or mul.op_type != "Mul" or consumers.get(mul.output[0]) != 1:
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = constants.get(node.input[1]) if len(node.input) > 1 else None
        x, w = sorted(mul.input, key=lambda name: -ranks.get(name, 0))
        if keepdims != 0 or axes is None or axes.tolist() not in ([-1], [2]) or ranks.get(x) != 3 or ranks.get(w) != 2:
            continue
        einsum = helper.make_node("Einsum", [x, w], list(node.output), name=f"{node.name or 'ReduceSum'}_einsum",
                                  equation="bkc,kc->bk")
        graph.node.remove(node)
        graph.node.insert(list(graph.node).index(mul), einsum)
        graph.node.remove(mul)
        rewritten += 1
    return rewritten


@torch.no_grad()
def max_abs_difference(model: nn.Module, onnx_path: Path | str, inputs: Sequence[np.ndarray]) -> float:
    """Largest |onnxruntime - PyTorch| over all inputs (each a [B, 3, S, S] batch)."""
    runner = OnnxRunner(onnx_path, intra_op_threads=1, providers="cpu")  # one thread: reproducible figures
    worst = 0.0
    for batch in inputs:
        expected = model.eval()(torch.from_numpy(batch)).numpy()
        worst = max(worst, float(np.abs(runner.run(batch) - expected).max()))
    return worst


def check_parity(model: nn.Module, onnx_path: Path | str, inputs: Sequence[np.ndarray], tolerance: float = PARITY_TOLERANCE) -> float:
    difference = max_abs_difference(model, onnx_path, inputs)
    if not difference <= tolerance:
        raise ParityError(
            f"{onnx_path}: onnxruntime differs from PyTorch by {difference:.3g} > {tolerance:g}; "
            "the export is not faithful (check for unsupported ops or training-mode layers)"
        )
    return difference
