"""The one pipeline model: `cxr_classifier`, `cxr_zeroshot` and `cxr_findings` are three configs of
it, told apart by their `tasks` parameter.

`cxr_findings` runs both tasks on each image in its own stub (the image crosses into Triton once),
so there is no second BLS level: its network calls go straight to the router, the members and
the CLIP encoder. Which tasks a config runs, and their parameters: python_backends.tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxrlt.contract.labels import TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.operating_points import NO_DECISION, OperatingPoints, served_operating_points
from cxrlt.contract.served import ENCODER_MODEL, ZEROSHOT_MODEL, network_names
from cxrlt.contract.text_cache import ENCODER_RECORD, load_text_cache
from python_backends import bls
from python_backends.classifier import Classification, ClassifierPipeline, ClassifierSettings
from python_backends.gate import ServedGate
from python_backends.monitoring import PipelineMetrics
from python_backends.tasks import CLASSIFIER_TASK, ZEROSHOT_TASK, parse_tasks, zeroshot_settings
from python_backends.triton_params import parameters, require
from python_backends.zeroshot import ZeroShotPipeline

# What each task can answer; a config declares which of them it serves (cxr_findings: no LOGITS
# or SIMILARITIES, its PROBABILITIES are both tasks' concatenated). DECISIONS and
# CALIBRATED_PROBABILITIES follow PROBABILITIES, through the repository's operating points.
# OOD_SCORE: the out-of-distribution gate's score of the image (python_backends.gate; NaN without one).
DECIDED_OUTPUTS = ("PROBABILITIES", "DECISIONS", "CALIBRATED_PROBABILITIES", "OOD_SCORE")
TASK_OUTPUTS = {CLASSIFIER_TASK: (*DECIDED_OUTPUTS, "LOGITS", "PROJECTION", "PROJECTION_SCORE"),
                ZEROSHOT_TASK: (*DECIDED_OUTPUTS, "SIMILARITIES")}
TASK_LABELS = {CLASSIFIER_TASK: TASK1_LABELS, ZEROSHOT_TASK: TASK2_LABELS}


@dataclasses.dataclass
class ServedPipeline:
    """What a pipeline model's `execute` runs: each task on every image the dynamic batcher merged.

    A request fails alone, with its first error; with both tasks, Task 1's error comes first,
    so a request with several problems always gets the same answer.
    """

    classifier: ClassifierPipeline | None
    zeroshot: ZeroShotPipeline | None
    outputs: tuple[str, ...]  # the outputs the model's config declares, and so what each answer holds
    labels: tuple[str, ...] = ()  # the findings of PROBABILITIES, in order
    operating_points: OperatingPoints | None = None  # None: no decisions (DECISIONS all NO_DECISION)
    gate: ServedGate = dataclasses.field(default_factory=ServedGate)  # unfitted: OOD_SCORE NaN, nothing refused
    metrics: PipelineMetrics | None = None  # the cxrlt_* metrics on Triton's /metrics (python_backends.monitoring)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServedPipeline":
        """The pipeline a Triton `initialize(args)` describes (its config, repository and version)."""
        config = json.loads(args["model_config"])
        params = parameters(config)
        tasks = parse_tasks(require(params, "tasks"))
        own_batch = config.get("max_batch_size", 0)
        classifier = zeroshot = None
        if CLASSIFIER_TASK in tasks:
            infer = bls.network_infer(args, params, network_names(), own_max_batch_size=own_batch)
            classifier = ClassifierPipeline(ClassifierSettings.from_parameters(params), infer)
        if ZEROSHOT_TASK in tasks:
            repository = Path(args["model_repository"]).parent
            # The text cache lives with cxr_zeroshot and is checked against the served encoder.
            cache = load_text_cache(repository / ZEROSHOT_MODEL / "1", TASK2_LABELS,
                                    repository / ENCODER_MODEL / "1" / ENCODER_RECORD, repository=repository)
            infer = bls.network_infer(args, params, [ENCODER_MODEL], {ENCODER_MODEL: "image_embeds"}, own_max_batch_size=own_batch)
            zeroshot = ZeroShotPipeline(zeroshot_settings(params, tasks), cache, infer)
        outputs = tuple(output["name"] for output in config.get("output", []))
        unknown = set(outputs) - set(TASK_OUTPUTS[CLASSIFIER_TASK] * (CLASSIFIER_TASK in tasks)
                                     + TASK_OUTPUTS[ZEROSHOT_TASK] * (ZEROSHOT_TASK in tasks))
        if unknown:
            raise ValueError(f"the config declares outputs {sorted(unknown)} that tasks {','.join(tasks)} do not produce")
        labels = tuple(label for task in tasks for label in TASK_LABELS[task])
        gate = ServedGate.from_args(args, params, lambda: bls.network_infer(
            args, params, [ENCODER_MODEL], {ENCODER_MODEL: "image_embeds"}, own_max_batch_size=own_batch), zeroshot)
        return cls(classifier, zeroshot, outputs, labels, served_operating_points(params), gate,
                   PipelineMetrics.from_args(args, params, labels))

    async def execute(self, requests: Sequence[Any]) -> list:
        return await bls.answer_each(requests, self._counted_items if self.metrics else self._items,
                                     self._run_many, self._response)

    def _counted_items(self, request: Any) -> list[tuple[np.ndarray, str | None]]:
        try:
            return self._items(request)
        except Exception as exc:
            self.metrics.refused_errors([exc])
            raise

    def _items(self, request: Any) -> list[tuple[np.ndarray, str | None]]:
        images = bls.required_input(request, "IMAGE")
        if self.classifier is None:
            return [(image, None) for image in images]
        return list(zip(images, bls.projection_hints(bls.get_input(request, "PROJECTION_HINT"), len(images))))

    async def _run_many(self, items: list[tuple[np.ndarray, str | None]]) -> list:
        """Per image (Task 1's outcome?, the gate's score, the zero-shot outcome?) or its first error.
        The CLIP embeddings run beside Task 1 and serve both the gate and the zero-shot task."""
        runs = [self.classifier.classify_many(items)] if self.classifier is not None else []
        runs.append(self.gate.embed_many([image for image, _ in items], self.zeroshot))
        *per_task, embeddings = await asyncio.gather(*runs)
        per_task.append(self.gate.judge(embeddings))
        if self.zeroshot is not None:
            per_task.append(self.zeroshot.scores(embeddings))
        results = [_first_error(outcomes) or outcomes for outcomes in zip(*per_task)]
        if self.metrics is not None:
            self.metrics.refused_errors(results)
        return results

    def _response(self, results: list[tuple]) -> Any:
        tensors: dict[str, np.ndarray] = {}
        probabilities = []
        projections: list[str | None] = [None] * len(results)
        if self.classifier is not None:
            task1: list[Classification] = [r[0] for r in results]
            projections = [c.projection for c in task1]
            probabilities.append(np.stack([c.probabilities for c in task1]))
            tensors["LOGITS"] = np.stack([c.logits for c in task1])
            tensors["PROJECTION"] = np.array([[c.projection.encode()] for c in task1], dtype=np.object_)
            tensors["PROJECTION_SCORE"] = np.array([[c.projection_score] for c in task1], dtype=np.float32)
        tensors["OOD_SCORE"] = np.array([[r[1 if self.classifier is not None else 0]] for r in results], dtype=np.float32)
        if self.zeroshot is not None:
            task2 = [r[-1] for r in results]
            probabilities.append(np.stack([p for p, _ in task2]))
            tensors["SIMILARITIES"] = np.stack([s for _, s in task2])
        tensors["PROBABILITIES"] = np.concatenate(probabilities, axis=1).astype(np.float32)
        tensors.update(self._decided(tensors["PROBABILITIES"], projections))
        if self.metrics is not None:
            routed = [r[0] for r in results] if self.classifier is not None else None
            self.metrics.classified(tensors["PROBABILITIES"], tensors["DECISIONS"], projections,
                                    routed and ["hint" if c.hint_used else "router" for c in routed],
                                    routed and [c.projection_score for c in routed], tensors.get("OOD_SCORE"))
        return bls.response({name: tensors[name] for name in self.outputs})

    def _decided(self, probabilities: np.ndarray, projections: list[str | None]) -> dict[str, np.ndarray]:
        """DECISIONS and CALIBRATED_PROBABILITIES of the batch, at the repository's operating points."""
        if self.operating_points is None:
            return {"DECISIONS": np.full(probabilities.shape, NO_DECISION, dtype=np.int8),
                    "CALIBRATED_PROBABILITIES": probabilities}
        return {"DECISIONS": self.operating_points.decide(probabilities, self.labels, projections),
                "CALIBRATED_PROBABILITIES": self.operating_points.calibrate(probabilities, self.labels).astype(np.float32)}


def _first_error(outcomes: tuple) -> BaseException | None:
    return next((o for o in outcomes if isinstance(o, BaseException)), None)
