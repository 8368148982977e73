"""The tasks a pipeline model config runs (its `tasks` parameter) and the parameters they take.

A config that runs the zero-shot task next to Task 1 (cxr_findings) keeps the zero-shot settings
under the `zeroshot.` prefix, since both tasks have preprocessing parameters.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from python_backends.classifier import ClassifierSettings
from python_backends.zeroshot import ZeroShotSettings

CLASSIFIER_TASK = "classifier"
ZEROSHOT_TASK = "zeroshot"
TASKS = (CLASSIFIER_TASK, ZEROSHOT_TASK)
ZEROSHOT_PREFIX = "zeroshot."


def parse_tasks(value: str) -> tuple[str, ...]:
    """The `tasks` parameter: `classifier`, `zeroshot`, or both, comma-separated, in that order."""
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    if not tasks or any(t not in TASKS for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"parameter tasks must name one or both of {', '.join(TASKS)}, not {value!r}")
    return tuple(t for t in TASKS if t in tasks)


def task_parameters(tasks: Sequence[str], classifier: ClassifierSettings, zeroshot: ZeroShotSettings) -> dict[str, str]:
    """The config parameters of a pipeline model running `tasks` (what the repository builder writes)."""
    params = {"tasks": ",".join(tasks)}
    if CLASSIFIER_TASK in tasks:
        params.update(classifier.to_parameters())
    if ZEROSHOT_TASK in tasks:
        prefix = ZEROSHOT_PREFIX if CLASSIFIER_TASK in tasks else ""
        params.update({prefix + k: v for k, v in zeroshot.to_parameters().items()})
    return params


def zeroshot_settings(params: Mapping[str, str], tasks: Sequence[str]) -> ZeroShotSettings:
    if CLASSIFIER_TASK not in tasks:
        return ZeroShotSettings.from_parameters(params)
    return ZeroShotSettings.from_parameters({k[len(ZEROSHOT_PREFIX):]: v for k, v in params.items() if k.startswith(ZEROSHOT_PREFIX)})
