"""A network model of the embedded target: runs its ONNX file with onnxruntime
(or, with parameter engine "torchscript", its TorchScript file with PyTorch, e.g. on CUDA).

The repository builder copies this one file into every network model (router, the six
ensemble members, the CLIP image encoder). Triton's dynamic batcher hands `execute` the
requests it merged; they run as one onnxruntime call. A request with NaN or Inf in its input
is refused alone (INVALID_ARG, "non-finite pixel values"); an output holding NaN or Inf is
never returned (INTERNAL).
"""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; honour it here
# so the server's environment (its packages and this project) comes before the system's.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from python_backends.onnx_runner import OnnxRunner
from python_backends.pipeline_errors import INVALID_INPUT, non_finite_count
from python_backends.triton_params import parameters


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(params.get("intra_op_threads", "1"))
        if params.get("engine", "onnxruntime") == "torchscript":
            from python_backends.torch_runner import TorchScriptRunner  # torch only where asked for

            fp16 = params.get("fp16", "false") == "true"
            self.runner = TorchScriptRunner(version_dir / "model.pt", params.get("device", "auto"), fp16, threads)
        else:
            self.runner = OnnxRunner(version_dir / params.get("onnx_file", "model.onnx"), threads, params.get("execution_provider", "auto"))
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = [None] * len(requests)
        batches, merged = [], []
        for index, request in enumerate(requests):
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            bad = non_finite_count(batch)
            if bad:  # refused alone: the merged run must not see it
                responses[index] = self._error(
                    f"{INVALID_INPUT}non-finite pixel values: {self.input_name} holds {bad} NaN or Inf value(s); "
                    "send finite float32 values, preprocessed as cxrlt.contract.preprocessing.preprocess does",
                    pb_utils.TritonError.INVALID_ARG,
                )
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
            if isinstance(out, Exception):
                responses[index] = self._error(f"{type(self.runner).__name__} failed: {out}", pb_utils.TritonError.INTERNAL)
            elif non_finite_count(out):
                responses[index] = self._error(
                    f"{self.output_name} of this network holds {non_finite_count(out)} NaN or Inf value(s) for finite "
                    "inputs and was not returned; its weights or ONNX file are broken: rebuild the repository",
                    pb_utils.TritonError.INTERNAL,
                )
            else:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)])
        return responses

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
