"""A network model of the embedded target: its ONNX file on onnxruntime (or, with parameter engine
"torchscript", its TorchScript file on PyTorch, e.g. on CUDA).

Triton's dynamic batcher hands `execute` the requests it merged; they run as one engine call.
A request with NaN or Inf in its input is refused alone (INVALID_ARG, "non-finite pixel
values"); an output holding NaN or Inf is never returned (INTERNAL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from python_backends import bls
from python_backends.onnx_runner import OnnxRunner
from python_backends.pipeline_errors import RequestError, ServingError, non_finite_count
from python_backends.triton_params import as_bool, parameters


class ServedNetwork:
    def __init__(self, runner: Any, input_name: str, output_name: str) -> None:
        self.runner, self.input_name, self.output_name = runner, input_name, output_name

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServedNetwork":
        config = json.loads(args["model_config"])
        params = parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(params.get("intra_op_threads", "1"))
        if params.get("engine", "onnxruntime") == "torchscript":
            from python_backends.torch_runner import TorchScriptRunner  # torch only where asked for

            runner = TorchScriptRunner(version_dir / "model.pt", params.get("device", "auto"),
                                       as_bool(params.get("fp16", "false")), threads)
        else:
            runner = OnnxRunner(version_dir / params.get("onnx_file", "model.onnx"), threads, params.get("execution_provider", "auto"))
        return cls(runner, config["input"][0]["name"], config["output"][0]["name"])

    def execute(self, requests: Sequence[Any]) -> list:
        responses: list = [None] * len(requests)
        batches, merged = [], []
        for index, request in enumerate(requests):
            batch = bls.get_input(request, self.input_name).as_numpy()
            bad = non_finite_count(batch)
            if bad:  # refused alone: the merged run must not see it
                responses[index] = bls.error_response(RequestError(
                    f"non-finite pixel values: {self.input_name} holds {bad} NaN or Inf value(s); "
                    "send finite float32 values, preprocessed as cxrlt.contract.preprocessing.preprocess does"))
            else:
                batches.append(batch)
                merged.append(index)
        if not batches:
            return responses
        try:
            outputs = self.runner.run_many(batches)
        except Exception as exc:  # engine failure: every merged request learns why
            outputs = [exc] * len(batches)
        for index, out in zip(merged, outputs):
            fault = self._fault(out)
            responses[index] = bls.error_response(fault) if fault else bls.response({self.output_name: out})
        return responses

    def _fault(self, out: Any) -> ServingError | None:
        if isinstance(out, Exception):
            return ServingError(f"{type(self.runner).__name__} failed: {out}")
        bad = non_finite_count(out)
        if bad:
            return ServingError(f"{self.output_name} of this network holds {bad} NaN or Inf value(s) for finite inputs "
                                "and was not returned; its weights or ONNX file are broken: rebuild the repository")
        return None
