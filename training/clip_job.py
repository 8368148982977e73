"""The zero-shot fine-tuning job (task clip): dual branch on the profile's open_clip model.

* contrastive image-text alignment with a descriptive report synthesised from each image's
  labels: one sentence per positive finding from `FINDING_TEMPLATES`, shuffled per sample,
  and a 'no acute findings' style sentence for Normal;
* an ASL branch: a linear head on the image embedding over the SEEN classes;
* L = L_con + 1.5 * L_ASL (training.losses.DualBranchLoss).
The served checkpoint `clip.pt` holds the open_clip state_dict (EMA weights preferred), so
`cxrlt build-repo --checkpoints` reads it; the head is kept in the file for resuming only.
Classes in `clip.holdout` are never mentioned in the reports and have no ASL output: the
zero-shot proxy (training.zeroshot_proxy) measures the zero-shot mAP on them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxrlt.contract.ensemble import DEFAULT_ZEROSHOT_ALPHA, sigmoid
from cxrlt.contract.labels import NORMAL_INDEX, TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig

from networks.clip import create_clip, encode_prompt_ensembles, tokenizer_for
from training.data import Augment, CxrDataset
from training.distributed import gather, sharded, unwrap
from training.job import (Job, SplitData, TrainingError, autocast, data_loader, init_weights_path,
                          prevalence_map, register_job)
from training.losses import AsymmetricLoss, ClipContrastiveLoss, DualBranchLoss
from training.metrics import evaluate_predictions
from training.recipes import Recipe

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


@register_job("clip")
class ClipJob(Job):
    def __init__(self, recipe: Recipe, data: SplitData) -> None:
        self.recipe = recipe
        settings = recipe.clip
        self.holdout = tuple(settings.get("holdout") or ())
        self.seen = tuple(label for label in TASK1_LABELS if label not in self.holdout)
        self.primary = "val_zs_holdout_mAP" if self.holdout else "val_zs_seen_mAP"
        self.model_name = recipe.profile_spec.clip.model_name
        config = PreprocessConfig.clip(recipe.image_size)
        loader = data.loader(recipe.cache_images, recipe.image_size)
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
        return data_loader(self.train_set, self.recipe.batch_size, self.recipe, epoch)

    def training_loss(self, module, batch, device, dtype):
        pixels, labels, _ = batch
        reports = [synthesize_report(row, TASK1_LABELS, self._rng, self.holdout) for row in labels.numpy()]
        tokens = self.tokenizer(reports).to(device)
        with autocast(device, dtype):
            image, text, logits = module(pixels.to(device), tokens)
        scale = unwrap(module).clip.logit_scale.exp().clamp(max=100.0)
        total, parts = self.loss_fn(image.float(), text.float(), logits.float(),
                                    labels[:, self.seen_index].to(device), logit_scale=scale, return_parts=True)
        return total, {k: float(v) for k, v in parts.items()}

    @torch.no_grad()
    def embed_val(self, module: DualBranchModel, device, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit image embeddings [N, D] as served, ASL head logits [N, seen], labels [N, 30])."""
        module.eval()
        embeds, logits, labels = [], [], []
        loader = torch.utils.data.DataLoader(sharded(self.val_set), batch_size=self.recipe.batch_size, shuffle=False,
                                             num_workers=self.recipe.num_workers)
        for pixels, target, _ in loader:
            with autocast(device, dtype):
                image = module.clip.encode_image(pixels.to(device)).float()
            embeds.append(F.normalize(image, dim=-1).cpu())
            logits.append(module.head(image).float().cpu())
            labels.append(target)
        return tuple(gather([torch.cat(embeds).double().numpy(), torch.cat(logits).double().numpy(),
                             torch.cat(labels).numpy()]))

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
            row["val_holdout_prevalence_mAP"] = prevalence_map(labels[:, [TASK1_LABELS.index(c) for c in self.holdout]])
        return row

    def summary(self) -> dict[str, Any]:
        return {"train_images": len(self.train_table), "val_images": len(self.val_table),
                "clip_model": self.model_name, "holdout": list(self.holdout), "seen_classes": len(self.seen)}


def zeroshot_probabilities(embeds: np.ndarray, text: np.ndarray, alpha: float = DEFAULT_ZEROSHOT_ALPHA) -> np.ndarray:
    """sigmoid(alpha * v @ t) for unit image embeddings [N, D] and prompt-ensembled text rows
    [C, D]: cxrlt.contract.ensemble.zeroshot_scores (the served scoring) for a batch."""
    from cxrlt.contract.ensemble import zeroshot_scores

    return np.stack([zeroshot_scores(v, text, None, alpha)[0] for v in embeds]).astype(np.float64)
