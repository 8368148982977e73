"""cxr_classifier: the Task 1 BLS model (logic in python_backends.classifier)."""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; honour it here
# so the server's environment (its packages and this project) comes before the system's.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backends import bls
from python_backends.classifier import ClassifierPipeline, ClassifierSettings, network_names
from python_backends.triton_params import parameters


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters(config)
        infer = bls.network_infer(pb_utils, args, params, network_names(), own_max_batch_size=config.get("max_batch_size", 0))
        self.pipeline = ClassifierPipeline(ClassifierSettings.from_parameters(params), infer)

    async def execute(self, requests):
        # Every image of every request the dynamic batcher merged shares the network calls
        # (see ClassifierPipeline.classify_many); a bad request fails alone.
        return await bls.answer_each(pb_utils, requests, self._items, self.pipeline.classify_many, self._response)

    @staticmethod
    def _items(request):
        images = bls.required_input(pb_utils, request, "IMAGE")
        hints = bls.optional_strings(pb_utils.get_input_tensor_by_name(request, "PROJECTION_HINT"), len(images))
        return list(zip(images, hints))

    @staticmethod
    def _response(results):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("PROBABILITIES", np.stack([r.probabilities for r in results])),
                pb_utils.Tensor("LOGITS", np.stack([r.logits for r in results])),
                bls.bytes_tensor(pb_utils, "PROJECTION", [r.projection for r in results]),
                pb_utils.Tensor("PROJECTION_SCORE", np.array([[r.projection_score] for r in results], dtype=np.float32)),
            ]
        )
