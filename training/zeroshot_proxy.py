"""The leak-free zero-shot proxy validation behind `cxrlt zeroshot-proxy`.

Seen classes are held out in turn as pseudo-unseen (three groups, chosen deterministically
from the data), a dual-branch model (training.clip_job) is trained on the rest - its reports
never mention a held-out class and its ASL head does not have them - and the zero-shot mAP
on the held-out group is measured on the patient-level validation split with
prompt-ensembled text embeddings (`encode_prompt_ensembles`) of prompts synthesised from
the class names with the same templates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cxrlt.contract.ensemble import sigmoid
from cxrlt.contract.labels import NORMAL_INDEX, TASK1_LABELS

from training.clip_job import ClipJob
from training.job import SplitData, TrainingError, load_split, prevalence_map, select_device
from training.loop import train
from training.metrics import evaluate_predictions, json_default
from training.recipes import Recipe


def proxy_groups(data: SplitData, n_groups: int = 3, group_size: int = 3) -> list[list[str]]:
    """Deterministic pseudo-unseen groups: Task 1 findings (not Normal) with positives in both
    the training and the validation split, ordered by training count (ties: label order); the
    first n_groups * group_size are dealt round-robin so every group mixes frequencies."""
    train_counts = data.table.labels[data.train].sum(axis=0)
    val_counts = data.table.labels[data.val].sum(axis=0)
    candidates = [i for i, label in enumerate(TASK1_LABELS)
                  if i != NORMAL_INDEX and train_counts[i] > 0 and val_counts[i] > 0]
    candidates.sort(key=lambda i: (-train_counts[i], i))
    needed = n_groups * group_size
    if len(candidates) < n_groups:
        raise TrainingError(
            f"only {len(candidates)} findings have positives in both splits; the proxy needs at least {n_groups} "
            "(use more data)"
        )
    chosen = candidates[:needed]
    return [[TASK1_LABELS[i] for i in chosen[g::n_groups]] for g in range(n_groups)]


def parse_groups(text: str) -> list[list[str]]:
    """'a,b,c;d,e,f' -> [[a, b, c], [d, e, f]], names checked against Task 1."""
    groups = [[name.strip() for name in part.split(",") if name.strip()] for part in text.split(";") if part.strip()]
    unknown = [name for group in groups for name in group if name not in TASK1_LABELS]
    if unknown or not groups:
        raise ValueError(f"unknown Task 1 class(es) {unknown} in groups {text!r}" if unknown else "no groups given")
    return groups


@dataclasses.dataclass
class ProxyGroupResult:
    group: int
    classes: list[str]
    zeroshot_mAP: float
    zeroshot_mAUC: float
    chance_mAP: float
    seen_head_mAP: float
    per_class_AP: dict[str, float]
    val_positives: dict[str, int]
    checkpoint: str
    seconds: float


def run_proxy(recipe: Recipe, data_csv: str | os.PathLike, out_dir: str | os.PathLike,
              groups: list[list[str]] | None = None, epochs: int | None = None, device: str | None = None,
              progress: bool | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one dual-branch model per held-out group and measure zero-shot mAP on that group."""
    if recipe.task != "clip":
        raise TrainingError(f"the zero-shot proxy needs a clip recipe (e.g. clip_dual_branch.yaml), not task {recipe.task!r}")
    out = Path(out_dir)
    data = load_split(data_csv, recipe.val_fraction, recipe.split_seed)
    groups = groups or proxy_groups(data)
    results: list[ProxyGroupResult] = []
    for number, group in enumerate(groups, start=1):
        held = dataclasses.replace(recipe, name=f"{recipe.name}-proxy{number}",
                                   clip={**recipe.clip, "holdout": list(group)})
        log(f"proxy group {number}/{len(groups)}: holding out {', '.join(group)}")
        result = train(held, data_csv, out / f"group{number}", epochs=epochs, device=device, progress=progress, log=log)
        # Measure the saved (EMA) model exactly as it was written.
        job = ClipJob(held, data)
        state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
        job.module.clip.load_state_dict(state["ema_state_dict"])
        job.module.head.load_state_dict(state["ema_extra_state_dict"])
        torch_device = select_device(device)
        job.to(torch_device)
        embeds, logits, labels = job.embed_val(job.module, torch_device, None)
        metrics = job.zeroshot_map(job.module, embeds, labels, group)
        head = evaluate_predictions(labels[:, job.seen_index.numpy()], sigmoid(logits), list(job.seen))
        columns = [TASK1_LABELS.index(c) for c in group]
        results.append(ProxyGroupResult(
            group=number, classes=list(group), zeroshot_mAP=metrics["mAP"], zeroshot_mAUC=metrics["mAUC"],
            chance_mAP=prevalence_map(labels[:, columns]), seen_head_mAP=head["mAP"],
            per_class_AP={c: metrics["per_class"][c]["AP"] for c in group},
            val_positives={c: int(labels[:, TASK1_LABELS.index(c)].sum()) for c in group},
            checkpoint=str(result.checkpoint), seconds=result.seconds,
        ))
    report = {
        "data": str(data_csv),
        "recipe": recipe.source,
        "clip_model": recipe.profile_spec.clip.model_name,
        "val_images": int(len(data.val)),
        "groups": [dataclasses.asdict(r) for r in results],
        "mean_zeroshot_mAP": float(np.nanmean([r.zeroshot_mAP for r in results])),
        "mean_chance_mAP": float(np.nanmean([r.chance_mAP for r in results])),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "zeroshot_proxy.json").write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    return report
