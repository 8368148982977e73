"""A network model of the embedded target: runs its ONNX file with onnxruntime
(or, with parameter engine "torchscript", its TorchScript file with PyTorch, e.g. on CUDA).

The repository builder copies this one file into every network model (router, the six
ensemble members, the CLIP image encoder). Triton's dynamic batcher hands `execute` the
requests it merged; they run as one onnxruntime call.
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
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            outputs = self.runner.run_many(batches)
        except Exception as exc:  # engine failure: every merged request learns why
            error = pb_utils.TritonError(f"{type(self.runner).__name__} failed: {exc}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)]) for out in outputs]
