"""The pipeline model behind cxr_classifier, cxr_zeroshot and cxr_findings: one model.py, three
configs told apart by their `tasks` parameter (the logic is python_backends.pipeline)."""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; honour it here
# so the server's environment (its packages and this project) comes before the system's.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from python_backends.pipeline import ServedReleases  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.pipeline = ServedReleases.from_args(args)

    async def execute(self, requests):
        # Every image of every request the dynamic batcher merged shares the network calls;
        # a bad request fails alone.
        return await self.pipeline.execute(requests)

    def finalize(self):
        if self.pipeline.metrics is not None:  # stop the metrics' flusher thread, send the last counts
            self.pipeline.metrics.close()
