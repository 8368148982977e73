"""cxr_findings: 30 Task 1 probabilities then 6 zero-shot ones, from two concurrent BLS calls."""

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
from python_backends.triton_params import parameters

CLASSIFIER_OUTPUTS = ["PROBABILITIES", "PROJECTION", "PROJECTION_SCORE"]


class TritonPythonModel:
    def initialize(self, args):
        self.timeout_ms = bls.member_timeout_ms(parameters(json.loads(args["model_config"])))

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._respond(r) for r in requests)))

    async def _respond(self, request):
        try:
            image = bls.required_input(pb_utils, request, "IMAGE")
            hint = pb_utils.get_input_tensor_by_name(request, "PROJECTION_HINT")
            # The hint is checked here, before both callees run: a request with a bad hint and a
            # bad image then always gets the hint's error, whichever callee would answer first.
            bls.projection_hints(hint, len(image))
            classifier_inputs = {"IMAGE": image}
            if hint is not None:
                classifier_inputs["PROJECTION_HINT"] = hint.as_numpy()
            task1, task2 = await asyncio.gather(
                bls.call_model(pb_utils, "cxr_classifier", classifier_inputs, CLASSIFIER_OUTPUTS, self.timeout_ms),
                bls.call_model(pb_utils, "cxr_zeroshot", {"IMAGE": image}, ["PROBABILITIES"], self.timeout_ms),
            )
        except Exception as exc:
            return bls.error_response(pb_utils, exc)
        probabilities = np.concatenate([task1["PROBABILITIES"], task2["PROBABILITIES"]], axis=1)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("PROBABILITIES", probabilities.astype(np.float32)),
                pb_utils.Tensor("PROJECTION", task1["PROJECTION"]),
                pb_utils.Tensor("PROJECTION_SCORE", task1["PROJECTION_SCORE"]),
            ]
        )
