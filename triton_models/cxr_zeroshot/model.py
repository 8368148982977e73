"""cxr_zeroshot: the Task 2 model (logic in python_backends.zeroshot).

The text cache is checked against the served encoder and the prompt file at load time;
a stale cache stops the model from loading with a message saying how to rebuild it.
"""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; honour it here
# so the server's environment (its packages and this project) comes before the system's.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from cxrlt.contract.labels import TASK2_LABELS
from cxrlt.contract.text_cache import ENCODER_RECORD, load_text_cache
from python_backends import bls
from python_backends.triton_params import parameters
from python_backends.zeroshot import ENCODER_MODEL, ZeroShotPipeline, ZeroShotSettings


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(json.loads(args["model_config"]))
        settings = ZeroShotSettings.from_parameters(params)
        model_dir = Path(args["model_repository"])
        repository = model_dir.parent
        cache = load_text_cache(
            model_dir / args["model_version"],
            TASK2_LABELS,
            repository / ENCODER_MODEL / "1" / ENCODER_RECORD,
            repository=repository,
        )
        infer = bls.network_infer(pb_utils, args, params, [ENCODER_MODEL], {ENCODER_MODEL: "image_embeds"},
                                  own_max_batch_size=json.loads(args["model_config"]).get("max_batch_size", 0))
        self.pipeline = ZeroShotPipeline(settings, cache, infer)

    async def execute(self, requests):
        # The images of every merged request share one encoder call; a bad request fails alone.
        return await bls.answer_each(pb_utils, requests, self._images, self.pipeline.score_many, self._response)

    @staticmethod
    def _images(request):
        return list(bls.required_input(pb_utils, request, "IMAGE"))

    @staticmethod
    def _response(results):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("PROBABILITIES", np.stack([p for p, _ in results])),
                pb_utils.Tensor("SIMILARITIES", np.stack([s for _, s in results])),
            ]
        )
