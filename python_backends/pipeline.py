"""The one pipeline model: `cxr_classifier`, `cxr_zeroshot` and `cxr_findings` are three configs of
it, told apart by their `tasks` parameter.

`cxr_findings` runs both tasks on each image in its own stub (the image crosses into Triton once),
so there is no second BLS level: its network calls go straight to the router, the members and
the CLIP encoder. Which tasks a config runs, and their parameters: python_backends.tasks.

A model serves the releases of its plan (cxrlt.contract.releases): one ServedPipeline per release,
each calling its own release's network versions with its own files and parameters; ServedReleases
picks, per request, the release that answers and the one that runs in shadow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxrlt.contract.labels import TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.operating_points import NO_DECISION, OperatingPoints, served_operating_points
from cxrlt.contract.releases import ReleasePlan, read_release, release_parameters, release_text_cache
from cxrlt.contract.served import ENCODER_MODEL, network_names
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
# RELEASE and RELEASE_SHA256: the release that answered and its identity (repository_sha256).
DECIDED_OUTPUTS = ("PROBABILITIES", "DECISIONS", "CALIBRATED_PROBABILITIES", "OOD_SCORE", "RELEASE", "RELEASE_SHA256")
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
    release: int = 1  # the release whose networks, files and parameters it runs
    release_sha256: str = ""  # that release's identity

    @classmethod
    def from_args(cls, args: Mapping[str, Any], params: Mapping[str, str] | None = None, release: int = 1,
                  metrics: PipelineMetrics | None = None) -> "ServedPipeline":
        """Release `release`'s pipeline in the model a Triton `initialize(args)` describes (`params`:
        its config's parameters under the release's own)."""
        config = json.loads(args["model_config"])
        params = parameters(config) if params is None else params
        tasks = parse_tasks(require(params, "tasks"))
        own_batch = config.get("max_batch_size", 0)
        classifier = zeroshot = None
        if CLASSIFIER_TASK in tasks:
            infer = bls.network_infer(args, params, network_names(), own_max_batch_size=own_batch, release=release)
            classifier = ClassifierPipeline(ClassifierSettings.from_parameters(params), infer)
        if ZEROSHOT_TASK in tasks:
            # The text cache lives with the release and is checked against its encoder.
            cache = release_text_cache(Path(args["model_repository"]).parent, release, TASK2_LABELS)
            infer = bls.network_infer(args, params, [ENCODER_MODEL], {ENCODER_MODEL: "image_embeds"},
                                      own_max_batch_size=own_batch, release=release)
            zeroshot = ZeroShotPipeline(zeroshot_settings(params, tasks), cache, infer)
        outputs = tuple(output["name"] for output in config.get("output", []))
        unknown = set(outputs) - set(TASK_OUTPUTS[CLASSIFIER_TASK] * (CLASSIFIER_TASK in tasks)
                                     + TASK_OUTPUTS[ZEROSHOT_TASK] * (ZEROSHOT_TASK in tasks))
        if unknown:
            raise ValueError(f"the config declares outputs {sorted(unknown)} that tasks {','.join(tasks)} do not produce")
        labels = tuple(label for task in tasks for label in TASK_LABELS[task])
        gate = ServedGate.from_args(args, params, lambda: bls.network_infer(
            args, params, [ENCODER_MODEL], {ENCODER_MODEL: "image_embeds"}, own_max_batch_size=own_batch, release=release),
            zeroshot, release=release)
        return cls(classifier, zeroshot, outputs, labels, served_operating_points(params), gate, metrics, release,
                   params.get("repository_sha256", ""))

    async def execute(self, requests: Sequence[Any]) -> list:
        """One response per request (the model's `execute` with this release alone)."""
        return [bls.response(a) if isinstance(a, dict) else bls.error_response(a) for a in await self.answers(requests)]

    async def answers(self, requests: Sequence[Any]) -> list:
        """Per request, its output tensors {name: array} or its error."""
        return await bls.answer_each(requests, self._counted_items if self.metrics else self._items,
                                     self._run_many, self._response, fail=lambda error: error)

    def _counted_items(self, request: Any) -> list[tuple[np.ndarray, str | None]]:
        try:
            return self._items(request)
        except Exception as exc:
            self.metrics.refused_errors([exc])
            raise

    def _items(self, request: Any) -> list[tuple[np.ndarray, str | None]]:
        images = bls.required_input(request, "IMAGE")
        bls.optional_strings(bls.get_input(request, "STUDY_KEY"), len(images), "STUDY_KEY")
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
        tensors["RELEASE"] = np.full((len(results), 1), self.release, dtype=np.int32)
        tensors["RELEASE_SHA256"] = np.array([[self.release_sha256.encode()]] * len(results), dtype=np.object_)
        if self.metrics is not None:
            routed = [r[0] for r in results] if self.classifier is not None else None
            self.metrics.classified(tensors["PROBABILITIES"], tensors["DECISIONS"], projections,
                                    routed and ["hint" if c.hint_used else "router" for c in routed],
                                    routed and [c.projection_score for c in routed], tensors.get("OOD_SCORE"))
        return {name: tensors[name] for name in self.outputs}

    def _decided(self, probabilities: np.ndarray, projections: list[str | None]) -> dict[str, np.ndarray]:
        """DECISIONS and CALIBRATED_PROBABILITIES of the batch, at the repository's operating points."""
        if self.operating_points is None:
            return {"DECISIONS": np.full(probabilities.shape, NO_DECISION, dtype=np.int8),
                    "CALIBRATED_PROBABILITIES": probabilities}
        return {"DECISIONS": self.operating_points.decide(probabilities, self.labels, projections),
                "CALIBRATED_PROBABILITIES": self.operating_points.calibrate(probabilities, self.labels).astype(np.float32)}


@dataclasses.dataclass
class ServedReleases:
    """A pipeline model serving its plan's releases: per request, the release that answers (the live
    one, or a canary candidate for its share of studies, sticky by STUDY_KEY) and, in shadow
    mode, the candidate also run on a share of requests, compared and never answering. A plan change
    is a reload of the model with a new config (`cxrlt release`): Triton keeps the old instance
    answering until the new one is ready, so each request sees one plan."""

    plan: ReleasePlan
    pipelines: dict[int, ServedPipeline]
    metrics: PipelineMetrics | None = None
    draw: Any = dataclasses.field(default_factory=lambda: random.Random().random)  # uniform in [0, 1)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServedReleases":
        config = json.loads(args["model_config"])
        params = parameters(config)
        plan = ReleasePlan.from_parameters(params)
        model = config.get("name", args.get("model_name", ""))
        repository = Path(args["model_repository"]).parent if "model_repository" in args else None  # None: unit tests
        own = {number: {**params, **(release_parameters(read_release(repository, number), model) if repository else {})}
               for number in plan.releases}
        pipelines = {number: ServedPipeline.from_args(args, own[number], number) for number in plan.releases}
        # The metrics count the live release's outputs (its operating points, its gate's threshold).
        metrics = PipelineMetrics.from_args(args, own[plan.live], pipelines[plan.live].labels)
        for pipeline in pipelines.values():
            pipeline.metrics = metrics
        return cls(plan, pipelines, metrics)

    @property
    def live(self) -> ServedPipeline:
        return self.pipelines[self.plan.live]

    async def execute(self, requests: Sequence[Any]) -> list:
        routes = [self.plan.route(_study_uid(request), self.draw()) for request in requests]
        answering: dict[int, list[int]] = {}
        for index, (release, _) in enumerate(routes):
            answering.setdefault(release, []).append(index)
        shadowed = [i for i, (_, shadow) in enumerate(routes) if shadow is not None]
        runs = [self._timed(release, [requests[i] for i in indices]) for release, indices in answering.items()]
        if shadowed:
            runs.append(self._timed(self.plan.candidate, [requests[i] for i in shadowed], count=False))
        done = await asyncio.gather(*runs)
        answers: list = [None] * len(requests)
        for (release, indices), (outcomes, seconds) in zip(answering.items(), done):
            for index, outcome in zip(indices, outcomes):
                answers[index] = outcome
            self._count(release, outcomes, seconds)
        if shadowed:
            self._compare(shadowed, answers, *done[-1])
        return [bls.response(a) if isinstance(a, dict) else bls.error_response(a) for a in answers]

    async def _timed(self, release: int, requests: list, count: bool = True) -> tuple[list, float]:
        started = time.perf_counter()
        pipeline = self.pipelines[release]
        if not count:  # a shadow run must not count refusals or answers of the live release's metrics
            pipeline = dataclasses.replace(pipeline, metrics=None)
        outcomes = await pipeline.answers(requests)
        return outcomes, time.perf_counter() - started

    def _count(self, release: int, outcomes: list, seconds: float) -> None:
        if self.metrics is not None:
            images = sum(len(o["PROBABILITIES"]) for o in outcomes if isinstance(o, dict))
            self.metrics.release_answered(release, "live" if release == self.plan.live else "canary", images, seconds)

    def _compare(self, shadowed: list[int], answers: list, outcomes: list, seconds: float) -> None:
        """The candidate's answers beside the live ones, for the requests both answered."""
        if self.metrics is None:
            return
        pairs = [(answers[i], mine) for i, mine in zip(shadowed, outcomes) if isinstance(answers[i], dict) and isinstance(mine, dict)]
        if pairs:
            stack = lambda side, name: np.concatenate([pair[side][name] for pair in pairs])  # noqa: E731
            self.metrics.shadowed(self.plan.candidate, (stack(0, "PROBABILITIES"), stack(0, "DECISIONS")),
                                  (stack(1, "PROBABILITIES"), stack(1, "DECISIONS")), seconds)


def _study_uid(request: Any) -> str | None:
    """The request's STUDY_KEY (its first value) or None; the pipeline checks it (a bad one
    fails the request), routing only reads it."""
    tensor = bls.get_input(request, "STUDY_KEY")
    values = tensor.as_numpy().reshape(-1) if tensor is not None else ()
    if not len(values):
        return None
    value = values[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _first_error(outcomes: tuple) -> BaseException | None:
    return next((o for o in outcomes if isinstance(o, BaseException)), None)
