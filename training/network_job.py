"""The job of the router (task projection) and the Task 1 networks (task multilabel).

The network comes from networks.factory (the profile's spec, optionally started from
`init_weights`) and must load into the network `cxrlt build-repo` builds (`check_servable`).
Validation runs the served test-time augmentation (logits averaged over the views). CaiT
members train on top of the frozen ConvNeXt-V2 backbone of their projection's PCAM
checkpoint (`pcam_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxrlt.contract.labels import TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig, normalize, prepare_square, tta_view
from cxrlt.io.images import load_pixels

from networks.checkpoints import CheckpointError, read_state_dict, state_dict_sha256
from training.data import Augment, CxrDataset, LabelTable
from training.distributed import gather, sharded
from training.job import (Job, Log, SplitData, TrainingError, autocast, data_loader, init_weights_path,
                          prevalence_map, register_job)
from training.losses import create_loss
from training.metrics import evaluate_predictions
from training.recipes import Recipe
from training.samplers import RepeatFactorSampler


class TtaViews(torch.utils.data.Dataset):
    """Validation inputs as served: (views FP32 [V, 3, S, S], labels FP32 [C], projection)."""

    def __init__(self, table: LabelTable, image_root: Path, config: PreprocessConfig, views: Iterable[str],
                 labels: tuple[str, ...] = TASK1_LABELS, loader: Callable[[Path], np.ndarray] = load_pixels) -> None:
        self.table, self.image_root, self.config = table, Path(image_root), config
        self.views = tuple(views)
        self.targets = torch.from_numpy(np.ascontiguousarray(table.columns(labels), dtype=np.float32))
        self.projections = table.projection_indices()
        self.loader = loader

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        square = prepare_square(self.loader(self.image_root / self.table.image_paths[index]), self.config)
        views = normalize(np.stack([tta_view(square, v) for v in self.views]), self.config)
        return torch.from_numpy(views), self.targets[index], int(self.projections[index])


@register_job("multilabel", "projection")
class NetworkJob(Job):
    """The router (task projection) and the Task 1 networks (task multilabel)."""

    def __init__(self, recipe: Recipe, data: SplitData) -> None:
        from networks.factory import create_model

        self.recipe = recipe
        self.router = recipe.task == "projection"
        self.primary = "val_acc" if self.router else "val_mAP"
        config = PreprocessConfig(size=recipe.image_size)
        loader = data.loader(recipe.cache_images, recipe.image_size)
        self.train_table = data.select(recipe.projection, "train")
        self.val_table = data.select(recipe.projection, "val")
        if self.router:  # the router learns from images whose projection is known
            self.train_table = self.train_table.subset(np.flatnonzero(self.train_table.projection_indices() >= 0))
            self.val_table = self.val_table.subset(np.flatnonzero(self.val_table.projection_indices() >= 0))
        if len(self.train_table) == 0 or len(self.val_table) == 0:
            raise TrainingError(
                f"{recipe.name}: {len(self.train_table)} training and {len(self.val_table)} validation images of "
                f"projection {recipe.projection!r}; the data needs both (check the CSV's Projection column)"
            )
        self.train_set = CxrDataset(self.train_table, data.image_root, config, Augment(**recipe.augment),
                                    labels=TASK1_LABELS, loader=loader)
        self.val_set = TtaViews(self.val_table, data.image_root, config, recipe.tta, TASK1_LABELS, loader)
        self.train_counts = self.train_table.positives()
        torch.manual_seed(recipe.seed)
        self.module = create_model(recipe.network_spec(), recipe.num_outputs, recipe.image_size,
                                   pretrained_file=init_weights_path(recipe))
        check_servable(self.module, recipe)
        self.loss_fn = self._loss()
        self.sampler = None
        if recipe.sampler.get("name", "none") == "repeat_factor":
            self.sampler = RepeatFactorSampler(
                self.train_table.labels, threshold=float(recipe.sampler.get("threshold", 0.05)),
                max_repeat=float(recipe.sampler.get("max_repeat", 10.0)), seed=recipe.seed,
            )

    def _loss(self) -> nn.Module:
        params = {k: v for k, v in self.recipe.loss.items() if k != "name"}
        name = self.recipe.loss["name"]
        if name == "ce":
            return nn.CrossEntropyLoss(**params)
        if name == "db":  # class priors come from this recipe's training images
            params.setdefault("class_counts", self.train_counts.astype(np.float64))
            params.setdefault("num_images", len(self.train_table))
        return create_loss(name, **params)

    def train_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        return data_loader(self.train_set, self.recipe.batch_size, self.recipe, epoch, self.sampler)

    def _targets(self, batch, device):
        pixels, labels, projection = batch
        target = projection if self.router else labels
        return pixels.to(device, non_blocking=True), target.to(device, non_blocking=True)

    def training_loss(self, module, batch, device, dtype):
        pixels, target = self._targets(batch, device)
        with autocast(device, dtype):
            logits = module(pixels)
        loss = self.loss_fn(logits.float(), target)
        return loss, {}

    def before_training(self, out_dir: Path, log: Log) -> dict[str, Any]:
        if not self.recipe.pcam_checkpoint:
            return {}
        path = resolve_pcam_checkpoint(self.recipe.pcam_checkpoint, out_dir)
        digest = load_frozen_backbone(self.module, path)
        log(f"{self.recipe.name}: froze the ConvNeXt-V2 backbone from {path}")
        return {"pcam_checkpoint": str(path), "pcam_backbone_sha256": digest}

    @torch.no_grad()
    def predict(self, module: nn.Module, device: torch.device, dtype: torch.dtype | None):
        """(TTA-averaged logits float64 [N, K], labels [N, C], projections [N]) of the val set."""
        module.eval()
        logits, labels, projections = [], [], []
        loader = torch.utils.data.DataLoader(sharded(self.val_set), batch_size=max(1, self.recipe.batch_size // len(self.recipe.tta)),
                                             shuffle=False, num_workers=self.recipe.num_workers)
        for views, target, projection in loader:
            batch, n_views = views.shape[:2]
            with autocast(device, dtype):
                out = module(views.flatten(0, 1).to(device))
            out = out.float().cpu().double().reshape(batch, n_views, -1).mean(dim=1)
            logits.append(out)
            labels.append(target)
            projections.append(projection)
        return tuple(gather([torch.cat(logits).numpy(), torch.cat(labels).numpy(), torch.cat(projections).numpy()]))

    def validate(self, module, device, dtype):
        logits, labels, projections = self.predict(module, device, dtype)
        if self.router:
            target = torch.from_numpy(projections)
            loss = float(F.cross_entropy(torch.from_numpy(logits), target))
            return {"val_loss": loss, "val_acc": float((logits.argmax(axis=1) == projections).mean())}
        loss = float(self.loss_fn(torch.from_numpy(logits).float().to(device), torch.from_numpy(labels).to(device)))
        metrics = evaluate_predictions(labels, 1.0 / (1.0 + np.exp(-logits)), TASK1_LABELS, self.train_counts)
        row = {"val_loss": loss, **{f"val_{k}": metrics[k] for k in ("mAP", "mAUC", "mF1", "mECE")},
               "val_classes": metrics["n_evaluable"]}
        for group, values in metrics["groups"].items():
            row[f"val_{group}_mAP"] = values["mAP"]
        row["val_prevalence_mAP"] = prevalence_map(labels)
        return row

    def summary(self) -> dict[str, Any]:
        return {"train_images": len(self.train_table), "val_images": len(self.val_table),
                "projection": self.recipe.projection}


def check_servable(module: nn.Module, recipe: Recipe) -> None:
    """The trained weights must load into the network `cxrlt build-repo` builds for this model."""
    served = recipe.served_spec()
    if served is None or not recipe.model_kwargs:
        return
    from networks.factory import create_model

    expected = {k: tuple(v.shape) for k, v in create_model(served, recipe.num_outputs, recipe.image_size).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if expected != actual:
        changed = sorted(set(expected.items()) ^ set(actual.items()))[:1]
        raise TrainingError(
            f"{recipe.name}: model_kwargs {recipe.model_kwargs} change the network's weights (e.g. {changed}); "
            "only training-time arguments (init values, dropout rates) may be set there"
        )


def resolve_pcam_checkpoint(value: str, out_dir: Path) -> Path:
    path = Path(value)
    candidates = [path] if path.is_absolute() else [out_dir / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise TrainingError(
        f"pcam_checkpoint {value!r} not found (looked in {', '.join(str(c) for c in candidates)}); "
        "train that projection's PCAM recipe into the same --out folder first"
    )


def load_frozen_backbone(model: nn.Module, pcam_path: Path) -> str:
    """Load the ConvNeXt-V2 backbone of a PCAM checkpoint (its EMA weights when present) into a
    CaiT member and freeze it. Returns the backbone's weight hash."""
    from networks.factory import cait_backbone

    state = read_state_dict(pcam_path)
    prefix = "backbone."
    backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone_state:
        raise CheckpointError(f"{pcam_path} holds no 'backbone.*' weights; is it a convnextv2_pcam checkpoint?")
    target = cait_backbone(model)
    try:
        target.load_state_dict(backbone_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the backbone in {pcam_path} does not fit this CaiT's ConvNeXt-V2 (same profile?): {str(exc).splitlines()[0]}"
        ) from None
    target.requires_grad_(False)
    target.eval()
    return state_dict_sha256(target)
