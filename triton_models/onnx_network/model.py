"""A network model of the embedded target (router, the six ensemble members, the CLIP image
encoder): the repository builder copies this one file into each (logic: python_backends.network)."""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; honour it here
# so the server's environment (its packages and this project) comes before the system's.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from python_backends.network import ServedNetwork  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.network = ServedNetwork.from_args(args)

    def execute(self, requests):
        return self.network.execute(requests)
