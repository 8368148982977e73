"""cxr_classifier: the Task 1 BLS model (logic in python_backends.classifier)."""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; honour it here
# so the server's environment (its packages and this project) comes before the system's.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backends import bls
from python_backends.classifier import ClassifierPipeline, ClassifierSettings, network_names
from python_backends.triton_params import parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(json.loads(args["model_config"]))
        infer = bls.network_infer(pb_utils, args, params, network_names())
        self.pipeline = ClassifierPipeline(ClassifierSettings.from_parameters(params), infer)

    async def execute(self, requests):
        # Requests of one call are independent: a bad one fails alone.
        return list(await asyncio.gather(*(self._respond(r) for r in requests)))

    async def _respond(self, request):
        try:
            images = bls.required_input(pb_utils, request, "IMAGE")
            hints = bls.optional_strings(pb_utils.get_input_tensor_by_name(request, "PROJECTION_HINT"), len(images))
            results = await asyncio.gather(*(self.pipeline.classify(i, h) for i, h in zip(images, hints)))
        except Exception as exc:
            return bls.error_response(pb_utils, exc)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("PROBABILITIES", np.stack([r.probabilities for r in results])),
                pb_utils.Tensor("LOGITS", np.stack([r.logits for r in results])),
                bls.bytes_tensor(pb_utils, "PROJECTION", [r.projection for r in results]),
                pb_utils.Tensor("PROJECTION_SCORE", np.array([[r.projection_score] for r in results], dtype=np.float32)),
            ]
        )
