"""Zero-shot fine-tuning (dual branch) and its leak-free proxy validation.

Dual branch, on an open_clip model (the profile's CLIP: 'cxrlt-tiny-vit' at tiny):
* contrastive image-text alignment with a descriptive report synthesised from each image's
  labels: one sentence per positive finding from `FINDING_TEMPLATES`, shuffled per sample,
  and a 'no acute findings' style sentence for Normal;
* an ASL branch: a linear head on the image embedding over the SEEN classes;
* L = L_con + 1.5 * L_ASL (training.losses.DualBranchLoss).
The served checkpoint `clip.pt` holds the open_clip state_dict (EMA weights preferred), so
`cxrlt build-repo --checkpoints` reads it; the head is kept in the file for resuming only.

Proxy validation (`cxrlt zeroshot-proxy`): seen classes are held out in turn as pseudo-unseen
(three groups, chosen deterministically from the data), a model is trained on the rest -
its reports never mention a held-out class and its ASL head does not have them - and the
zero-shot mAP on the held-out group is measured on the patient-level validation split with
prompt-ensembled text embeddings (`encode_prompt_ensembles`) of prompts synthesised from
the class names with the same templates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxrlt.contract.ensemble import DEFAULT_ZEROSHOT_ALPHA, sigmoid
from cxrlt.contract.labels import NORMAL_INDEX, TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig

from networks.clip import create_clip, encode_prompt_ensembles, tokenizer_for
from training.data import Augment, CxrDataset
from training.losses import AsymmetricLoss, ClipContrastiveLoss, DualBranchLoss
from training.metrics import evaluate_predictions
from training.recipes import Recipe
from training.train import Job, SplitData, TrainingError, _loader, autocast, image_loader, init_weights_path

FINDING_TEMPLATES: tuple[str, ...] = (
    "there is {finding}.",
    "findings consistent with {finding}.",
    "the radiograph shows {finding}.",
    "{finding} is present.",
    "evidence of {finding}.",
)
NORMAL_SENTENCES: tuple[str, ...] = (
    "no acute findings.",
    "no acute cardiopulmonary abnormality.",
    "normal chest radiograph.",
    "the lungs are clear and the heart is normal in size.",
    "no abnormality is seen.",
)
# For an image whose only findings are held out: say nothing about them (and nothing false).
NEUTRAL_SENTENCE = "chest radiograph."


def finding_name(label: str) -> str:
    return label.lower()


def class_prompts(label: str) -> list[str]:
    """The prompts of one class, from the report templates (Normal: the normal sentences)."""
    if label == TASK1_LABELS[NORMAL_INDEX]:
        return list(NORMAL_SENTENCES)
    return [template.format(finding=finding_name(label)) for template in FINDING_TEMPLATES]


def synthesize_report(labels: np.ndarray, names: Sequence[str], rng: np.random.Generator,
                      exclude: Sequence[str] = ()) -> str:
    """A descriptive report for one image's 0/1 labels over `names`: one sentence per positive
    finding (random template), sentences shuffled; Normal gets a normal sentence. Classes in
    `exclude` are never mentioned."""
    excluded = set(exclude)
    sentences = []
    normal = names[NORMAL_INDEX] if len(names) > NORMAL_INDEX and names[NORMAL_INDEX] == "Normal" else "Normal"
    for label, value in zip(names, labels):
        if value <= 0.5 or label in excluded:
            continue
        if label == normal:
            sentences.append(NORMAL_SENTENCES[int(rng.integers(len(NORMAL_SENTENCES)))])
        else:
            template = FINDING_TEMPLATES[int(rng.integers(len(FINDING_TEMPLATES)))]
            sentences.append(template.format(finding=finding_name(label)))
    if not sentences:
        return NEUTRAL_SENTENCE
    rng.shuffle(sentences)
    return " ".join(sentences)


class DualBranchModel(nn.Module):
    """An open_clip model plus the ASL head over the seen classes."""

    def __init__(self, clip_model: nn.Module, num_seen: int) -> None:
        super().__init__()
        self.clip = clip_model
        self.head = nn.Linear(int(clip_model.visual.output_dim), num_seen)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        image = self.clip.encode_image(pixels)
        text = self.clip.encode_text(tokens)
        return image, text, self.head(image)


class ClipJob(Job):
    def __init__(self, recipe: Recipe, data: SplitData) -> None:
        self.recipe = recipe
        settings = recipe.clip
        self.holdout = tuple(settings.get("holdout") or ())
        self.seen = tuple(label for label in TASK1_LABELS if label not in self.holdout)
        self.primary = "val_zs_holdout_mAP" if self.holdout else "val_zs_seen_mAP"
        self.model_name = recipe.profile_spec.clip.model_name
        config = PreprocessConfig.clip(recipe.image_size)
        loader = image_loader(recipe.cache_images)
        self.train_table = data.select(recipe.projection, "train")
        self.val_table = data.select(recipe.projection, "val")
        if len(self.train_table) == 0 or len(self.val_table) == 0:
            raise TrainingError(f"{recipe.name}: no training or validation images for projection {recipe.projection!r}")
        self.train_set = CxrDataset(self.train_table, data.image_root, config, Augment(**recipe.augment),
                                    labels=TASK1_LABELS, loader=loader)
        self.val_set = CxrDataset(self.val_table, data.image_root, config, None, labels=TASK1_LABELS, loader=loader)
        self.seen_index = torch.tensor([TASK1_LABELS.index(label) for label in self.seen])
        self.train_counts = self.train_table.positives()
        torch.manual_seed(recipe.seed)
        self.module = DualBranchModel(create_clip(self.model_name, init_weights_path(recipe)), len(self.seen))
        self.tokenizer = tokenizer_for(self.model_name)
        params = {k: v for k, v in recipe.loss.items() if k != "name"}
        self.loss_fn = DualBranchLoss(alpha=float(settings.get("asl_weight", 1.5)),
                                      contrastive=ClipContrastiveLoss(learnable=False), asl=AsymmetricLoss(**params))
        self._rng = np.random.default_rng(recipe.seed)

    def served(self, module: nn.Module) -> nn.Module:
        return module.clip

    def extra(self, module: nn.Module) -> nn.Module | None:
        return module.head

    def train_loader(self, epoch: int):
        self._rng = np.random.default_rng([self.recipe.seed, epoch])  # reports of this epoch
        return _loader(self.train_set, self.recipe.batch_size, self.recipe, epoch)

    def training_loss(self, module, batch, device, dtype):
        pixels, labels, _ = batch
        reports = [synthesize_report(row, TASK1_LABELS, self._rng, self.holdout) for row in labels.numpy()]
        tokens = self.tokenizer(reports).to(device)
        with autocast(device, dtype):
            image, text, logits = module(pixels.to(device), tokens)
        scale = module.clip.logit_scale.exp().clamp(max=100.0)
        total, parts = self.loss_fn(image.float(), text.float(), logits.float(),
                                    labels[:, self.seen_index].to(device), logit_scale=scale, return_parts=True)
        return total, {k: float(v) for k, v in parts.items()}

    @torch.no_grad()
    def embed_val(self, module: DualBranchModel, device, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit image embeddings [N, D] as served, ASL head logits [N, seen], labels [N, 30])."""
        module.eval()
        embeds, logits, labels = [], [], []
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.recipe.batch_size, shuffle=False,
                                             num_workers=self.recipe.num_workers)
        for pixels, target, _ in loader:
            with autocast(device, dtype):
                image = module.clip.encode_image(pixels.to(device)).float()
            embeds.append(F.normalize(image, dim=-1).cpu())
            logits.append(module.head(image).float().cpu())
            labels.append(target)
        return torch.cat(embeds).double().numpy(), torch.cat(logits).double().numpy(), torch.cat(labels).numpy()

    def text_embeddings(self, module: DualBranchModel, classes: Sequence[str]) -> np.ndarray:
        clip = module.clip
        device = next(clip.parameters()).device
        tokenizer = lambda texts: self.tokenizer(texts).to(device)  # noqa: E731
        return encode_prompt_ensembles(clip, tokenizer, [class_prompts(c) for c in classes]).float().cpu().double().numpy()

    def zeroshot_map(self, module, embeds: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
        text = self.text_embeddings(module, classes)
        probs = zeroshot_probabilities(embeds, text)
        columns = [TASK1_LABELS.index(c) for c in classes]
        counts = self.train_counts[columns]
        return evaluate_predictions(labels[:, columns], probs, list(classes), counts if len(classes) >= 3 else None)

    def validate(self, module, device, dtype):
        embeds, logits, labels = self.embed_val(module, device, dtype)
        seen_columns = self.seen_index.numpy()
        head = evaluate_predictions(labels[:, seen_columns], sigmoid(logits), list(self.seen))
        row = {"val_mAP": head["mAP"], "val_mAUC": head["mAUC"],
               "val_zs_seen_mAP": self.zeroshot_map(module, embeds, labels, self.seen)["mAP"]}
        if self.holdout:
            held = self.zeroshot_map(module, embeds, labels, self.holdout)
            row["val_zs_holdout_mAP"] = held["mAP"]
            row["val_zs_holdout_mAUC"] = held["mAUC"]
            row["val_holdout_prevalence_mAP"] = _prevalence(labels[:, [TASK1_LABELS.index(c) for c in self.holdout]])
        return row

    def summary(self) -> dict[str, Any]:
        return {"train_images": len(self.train_table), "val_images": len(self.val_table),
                "clip_model": self.model_name, "holdout": list(self.holdout), "seen_classes": len(self.seen)}


def zeroshot_probabilities(embeds: np.ndarray, text: np.ndarray, alpha: float = DEFAULT_ZEROSHOT_ALPHA) -> np.ndarray:
    """sigmoid(alpha * v @ t) for unit image embeddings [N, D] and prompt-ensembled text rows
    [C, D]: cxrlt.contract.ensemble.zeroshot_scores (the served scoring) for a batch."""
    from cxrlt.contract.ensemble import zeroshot_scores

    return np.stack([zeroshot_scores(v, text, None, alpha)[0] for v in embeds]).astype(np.float64)


def _prevalence(labels: np.ndarray) -> float:
    rates = labels.mean(axis=0)
    evaluable = (rates > 0) & (rates < 1)
    return float(rates[evaluable].mean()) if evaluable.any() else float("nan")


# ------------------------------------------------------------------------ proxy


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
    from training.train import build_job, load_split, select_device, train

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
        job = build_job(held, data)
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
            chance_mAP=_prevalence(labels[:, columns]), seen_head_mAP=head["mAP"],
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
    (out / "zeroshot_proxy.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")
