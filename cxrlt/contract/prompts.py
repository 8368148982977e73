"""The zero-shot prompt file (YAML): per class a name, prompts and optional negative prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from cxrlt.contract.labels import TASK2_LABELS
from cxrlt.contract.resources import package_file

DEFAULT_PROMPTS = package_file("cxrlt.contract", "data", "zeroshot_prompts.yaml")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    class_names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    negatives: tuple[tuple[str, ...], ...] | None  # None unless every class has negatives


def load_prompts(path: Path | str = DEFAULT_PROMPTS, expected_classes: Sequence[str] = TASK2_LABELS) -> PromptSet:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read prompt file {path}: {exc}") from exc
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list):
        raise ValueError(f"prompt file {path} needs a top-level 'classes' list")
    by_name = {}
    for entry in classes:
        name = entry.get("name") if isinstance(entry, dict) else None
        prompts = entry.get("prompts") if isinstance(entry, dict) else None
        if not name or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt file {path}: each class needs a 'name' and a non-empty list of 'prompts' ({entry!r})")
        by_name[name] = (tuple(prompts), tuple(entry.get("negative") or ()))
    missing = [c for c in expected_classes if c not in by_name]
    if missing:
        raise ValueError(f"prompt file {path} lacks classes {missing}; it must cover {list(expected_classes)}")
    positives = tuple(by_name[c][0] for c in expected_classes)
    negatives = tuple(by_name[c][1] for c in expected_classes)
    return PromptSet(tuple(expected_classes), positives, negatives if all(negatives) else None)
