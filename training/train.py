"""The training loop behind `cxrlt train`: one recipe (training/recipes.py) -> one checkpoint.

What every recipe gets:
* data: a CXR-LT CSV, split 9:1 by patient (training.data.patient_split, the same split
  `cxrlt evaluate` and `cxrlt tune-weights` use), filtered to the recipe's projection;
* AdamW (no weight decay on biases and norm weights), linear warm-up then cosine, per step;
* gradient clipping, mixed precision on a GPU (torch.autocast, bf16 where supported, else
  fp16 with a GradScaler), fp32 on CPU;
* an EMA of the weights, which is what validation measures and what is served;
* validation each epoch with the served test-time augmentation (logits averaged over the
  views), metrics per epoch in `<model>.metrics.csv`;
* a checkpoint `<model>.pt` after every epoch (`state_dict`, `ema_state_dict`, optimiser,
  scheduler, scaler, epoch, metric history, recipe), which `cxrlt build-repo --checkpoints`
  reads directly and `--resume` continues from.
Each epoch is seeded from (seed, epoch), so an interrupted-and-resumed run reproduces an
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxrlt.contract.labels import PROJECTIONS, TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig, normalize, prepare_square, tta_view

from networks.checkpoints import CheckpointError, checkpoint_path, file_sha256, read_state_dict, state_dict_sha256
from training.data import Augment, CxrDataset, LabelTable, load_image, patient_split, read_cxrlt_csv
from training.ema import ModelEma
from training.losses import create_loss
from training.metrics import evaluate_predictions
from training.recipes import Recipe
from training.samplers import RepeatFactorSampler
from training.schedule import WarmupCosine, warmup_cosine

CHECKPOINT_FORMAT = "cxrlt-train/1"
Log = Callable[[str], None]


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class SplitData:
    """A label table and its patient-level train / validation indices (whole table)."""

    table: LabelTable
    image_root: Path
    train: np.ndarray
    val: np.ndarray

    def select(self, projection: str, part: str) -> LabelTable:
        """The train or val images of one projection ('all': every image with a known projection
        for the router, every image for the others)."""
        indices = self.train if part == "train" else self.val
        if projection in PROJECTIONS:
            indices = [i for i in indices if self.table.projections[i] == projection]
        return self.table.subset(indices)


def load_split(data_csv: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
               labels: tuple[str, ...] = TASK1_LABELS, image_root: str | os.PathLike | None = None) -> SplitData:
    """Read a CXR-LT CSV and split it 9:1 by patient (deterministic for seed and fraction)."""
    data_csv = Path(data_csv)
    if not data_csv.is_file():
        raise TrainingError(f"data CSV {data_csv} does not exist; make one with `cxrlt synth-data --out DIR --n 600`")
    table = read_cxrlt_csv(data_csv, labels=labels)
    if len(table) < 2:
        raise TrainingError(f"{data_csv} holds {len(table)} image(s); training needs at least two patients")
    train, val = patient_split(table.patient_ids, val_fraction, seed)
    return SplitData(table, Path(image_root) if image_root else data_csv.parent, train, val)


CACHE_MAX_IMAGE_BYTES = 1 << 20  # full-size radiographs are re-read, never kept in memory
_IMAGE_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def _cached_image(path: Path) -> np.ndarray:
    stat = os.stat(path)
    key = (str(path), stat.st_mtime_ns, stat.st_size)  # a rewritten file is read again
    image = _IMAGE_CACHE.get(key)
    if image is None:
        image = load_image(path)
        if image.nbytes <= CACHE_MAX_IMAGE_BYTES:
            image.setflags(write=False)
            _IMAGE_CACHE[key] = image
    return image


def image_loader(cache: bool) -> Callable[[Path], np.ndarray]:
    """training.data.load_image, optionally memoised (images up to 1 MiB: the tiny profile's)."""
    return _cached_image if cache else load_image


class TtaViews(torch.utils.data.Dataset):
    """Validation inputs as served: (views FP32 [V, 3, S, S], labels FP32 [C], projection)."""

    def __init__(self, table: LabelTable, image_root: Path, config: PreprocessConfig, views: Iterable[str],
                 labels: tuple[str, ...] = TASK1_LABELS, loader: Callable[[Path], np.ndarray] = load_image) -> None:
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


# -------------------------------------------------------------------------- devices


def select_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for full precision.

    auto: bf16 on a CUDA GPU that supports it, else fp16 there; fp32 on CPU. bf16 also runs
    on CPU (torch's CPU autocast); fp16 needs CUDA (its GradScaler)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if device.type != "cuda":
        raise TrainingError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**31)


# ---------------------------------------------------------------------------- jobs


class Job(abc.ABC):
    """What differs between recipes: the module, the batches, the loss and the validation."""

    recipe: Recipe
    module: nn.Module  # what the optimiser trains and the EMA averages
    primary: str = "val_mAP"  # the headline validation metric

    def served(self, module: nn.Module) -> nn.Module:
        """The part saved as `state_dict` (what build-repo loads)."""
        return module

    def extra(self, module: nn.Module) -> nn.Module | None:
        """Trained parts that are not served (saved separately for resume)."""
        return None

    @abc.abstractmethod
    def train_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """Batches of one epoch."""

    @abc.abstractmethod
    def training_loss(self, module: nn.Module, batch: Any, device: torch.device,
                      dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch and figures to log."""

    @abc.abstractmethod
    def validate(self, module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict[str, float]:
        """Validation metrics (with `primary` among them)."""

    def before_training(self, out_dir: Path, log: Log) -> dict[str, Any]:
        """Set-up that needs the output folder (e.g. CaiT's frozen backbone); returns checkpoint info."""
        return {}

    def to(self, device: torch.device) -> None:
        """Move the module and the loss (its buffers: class weights, priors) to the device."""
        self.module.to(device)
        loss = getattr(self, "loss_fn", None)
        if isinstance(loss, nn.Module):
            loss.to(device)

    def summary(self) -> dict[str, Any]:
        return {}


def _loader(dataset, batch_size: int, recipe: Recipe, epoch: int, sampler=None, shuffle: bool = True,
            device: torch.device | None = None) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(epoch_seed(recipe.seed, epoch))
    if sampler is not None:
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
        num_workers=recipe.num_workers, generator=generator, drop_last=False,
        pin_memory=bool(device is not None and device.type == "cuda"),
        persistent_workers=False,
    )


class NetworkJob(Job):
    """The router (task projection) and the Task 1 networks (task multilabel)."""

    def __init__(self, recipe: Recipe, data: SplitData) -> None:
        from networks.factory import create_model

        self.recipe = recipe
        self.router = recipe.task == "projection"
        self.primary = "val_acc" if self.router else "val_mAP"
        config = PreprocessConfig(size=recipe.image_size)
        loader = image_loader(recipe.cache_images)
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
        return _loader(self.train_set, self.recipe.batch_size, self.recipe, epoch, self.sampler)

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
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=max(1, self.recipe.batch_size // len(self.recipe.tta)),
                                             shuffle=False, num_workers=self.recipe.num_workers)
        for views, target, projection in loader:
            batch, n_views = views.shape[:2]
            with autocast(device, dtype):
                out = module(views.flatten(0, 1).to(device))
            out = out.float().cpu().double().reshape(batch, n_views, -1).mean(dim=1)
            logits.append(out)
            labels.append(target)
            projections.append(projection)
        return torch.cat(logits).numpy(), torch.cat(labels).numpy(), torch.cat(projections).numpy()

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
        row["val_prevalence_mAP"] = _prevalence_map(labels)
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


def _prevalence_map(labels: np.ndarray) -> float:
    """The mAP of a constant (uninformed) score: the mean positive rate of the evaluable classes."""
    rates = labels.mean(axis=0)
    evaluable = (rates > 0) & (rates < 1)
    return float(rates[evaluable].mean()) if evaluable.any() else float("nan")


def init_weights_path(recipe: Recipe) -> Path | None:
    """The recipe's `init_weights` file, checked (None when it has none)."""
    if not recipe.init_weights:
        return None
    path = Path(recipe.init_weights).expanduser()
    if not path.is_file():
        raise TrainingError(f"{recipe.name}: init_weights {recipe.init_weights!r} not found; give the path of a "
                            "pretrained weights file you downloaded, or remove the key to start from random weights")
    return path


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


# ------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class TrainResult:
    recipe: Recipe
    checkpoint: Path
    metrics_csv: Path
    history: list[dict[str, Any]]
    epoch: int
    seconds: float
    resumed_from: int | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    primary: str = "val_mAP"  # the headline validation metric of this recipe

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_save(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    fields: list[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def metrics_csv_path(out_dir: Path | str, model_name: str) -> Path:
    return Path(out_dir) / f"{model_name}.metrics.csv"


def _plain(value: Any) -> Any:
    """Python scalars only (checkpoints are read with torch.load(weights_only=True))."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def build_job(recipe: Recipe, data: SplitData) -> Job:
    if recipe.task == "clip":
        from training.zeroshot_finetune import ClipJob

        return ClipJob(recipe, data)
    return NetworkJob(recipe, data)


def train(recipe: Recipe, data_csv: str | os.PathLike, out_dir: str | os.PathLike, *, resume: bool = False,
          epochs: int | None = None, stop_after_epoch: int | None = None, device: str | None = None,
          image_root: str | os.PathLike | None = None, progress: bool | None = None,
          log: Log = print) -> TrainResult:
    """Train one recipe and write OUT/<model>.pt and OUT/<model>.metrics.csv.

    epochs: override the recipe's total. resume: continue from OUT/<model>.pt (model, EMA,
    optimiser, scheduler, scaler, epoch, history). stop_after_epoch: end this run after that
    epoch (a later --resume continues to `epochs`). progress: a tqdm bar per epoch (None: only
    on a terminal).
    """
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=int(epochs))
    threads = torch.get_num_threads()
    try:
        return _train(recipe, data_csv, Path(out_dir), resume, stop_after_epoch, device, image_root, progress, log)
    finally:
        torch.set_num_threads(threads)  # the recipe's thread count is for this run only


def _train(recipe: Recipe, data_csv, out: Path, resume: bool, stop_after_epoch: int | None, device: str | None,
           image_root, progress: bool | None, log: Log) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    set_threads(recipe.threads)
    torch_device = select_device(device)
    dtype = autocast_dtype(torch_device, recipe.precision)
    seed_everything(recipe.seed)
    started = time.perf_counter()

    data = load_split(data_csv, recipe.val_fraction, recipe.split_seed, image_root=image_root)
    job = build_job(recipe, data)
    info = {**job.summary(), **job.before_training(out, log)}
    if recipe.init_weights:
        init = init_weights_path(recipe)
        info.update(init_weights=str(init), init_weights_sha256=file_sha256(init))
        log(f"{recipe.name}: started from the pretrained weights in {init}")
    job.to(torch_device)
    module = job.module
    params = _param_groups(module, float(recipe.optimizer["weight_decay"]))
    betas = tuple(recipe.optimizer.get("betas", (0.9, 0.999)))
    optimizer = torch.optim.AdamW(params, lr=float(recipe.optimizer["lr"]), betas=betas,
                                  eps=float(recipe.optimizer.get("eps", 1e-8)))
    steps_per_epoch = max(1, len(job.train_loader(0)))
    scheduler = warmup_cosine(optimizer, steps_per_epoch, recipe.epochs, float(recipe.schedule.get("warmup_epochs", 1)),
                              float(recipe.schedule.get("min_lr_ratio", 0.01)))
    ema = ModelEma(module, float(recipe.ema.get("decay", 0.999)), bool(recipe.ema.get("warmup", True)))
    scaler = torch.amp.GradScaler(torch_device.type, enabled=dtype == torch.float16)

    ckpt_path = checkpoint_path(out, recipe.checkpoint_name())
    csv_path = metrics_csv_path(out, recipe.checkpoint_name())
    history: list[dict[str, Any]] = []
    start_epoch, global_step, resumed_from = 0, 0, None
    if resume:
        if ckpt_path.is_file():
            state = _load_training_checkpoint(ckpt_path, recipe)
            job.served(module).load_state_dict(state["state_dict"])
            job.served(ema.module).load_state_dict(state["ema_state_dict"])
            if job.extra(module) is not None:
                job.extra(module).load_state_dict(state["extra_state_dict"])
                job.extra(ema.module).load_state_dict(state["ema_extra_state_dict"])
            ema.load_ema_state(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            # the schedule follows this run's total (--epochs may have grown)
            scheduler.lr_lambdas[0].__dict__.update(
                WarmupCosine(steps_per_epoch * recipe.epochs, round(steps_per_epoch * float(recipe.schedule.get("warmup_epochs", 1))),
                             float(recipe.schedule.get("min_lr_ratio", 0.01))).__dict__)
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
            history = list(state.get("history", []))
            resumed_from = start_epoch
            log(f"{recipe.name}: resumed from {ckpt_path} at epoch {start_epoch}/{recipe.epochs}")
        else:
            log(f"{recipe.name}: --resume but no {ckpt_path}; starting from scratch")
    last_epoch = recipe.epochs if stop_after_epoch is None else min(recipe.epochs, int(stop_after_epoch))

    for epoch in range(start_epoch, last_epoch):
        epoch_started = time.perf_counter()
        torch.manual_seed(epoch_seed(recipe.seed, epoch))
        module.train()
        loader = job.train_loader(epoch)
        totals: dict[str, float] = {"train_loss": 0.0}
        count = 0
        bar = _progress(loader, f"{recipe.name} {epoch + 1}/{recipe.epochs}", progress)
        for batch in bar:
            loss, parts = job.training_loss(module, batch, torch_device, dtype)
            if not torch.isfinite(loss):
                raise TrainingError(f"{recipe.name}: the loss became {loss.item()} at epoch {epoch + 1}; lower optimizer.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], recipe.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ema.update(module)
            global_step += 1
            count += 1
            totals["train_loss"] += float(loss.detach())
            for key, value in parts.items():
                totals[f"train_{key}"] = totals.get(f"train_{key}", 0.0) + float(value)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{totals['train_loss'] / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        row: dict[str, Any] = {"epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"]}
        row.update({k: v / max(1, count) for k, v in totals.items()})
        row.update(job.validate(ema.module, torch_device, dtype))
        row["epoch_s"] = time.perf_counter() - epoch_started
        history.append(_plain(row))
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model_name": recipe.checkpoint_name(),
            "profile": recipe.profile,
            "task": recipe.task,
            "state_dict": job.served(module).state_dict(),
            "ema_state_dict": job.served(ema.module).state_dict(),
            "ema": ema.ema_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch + 1,
            "epochs": recipe.epochs,
            "global_step": global_step,
            "history": history,
            "recipe": _plain(recipe.to_dict()),
            "info": _plain(info),
        }
        if job.extra(module) is not None:
            payload["extra_state_dict"] = job.extra(module).state_dict()
            payload["ema_extra_state_dict"] = job.extra(ema.module).state_dict()
        _atomic_save(payload, ckpt_path)
        _write_history(history, csv_path)
        log(_epoch_line(recipe, row, job.primary))

    if last_epoch <= start_epoch:
        log(f"{recipe.name}: already trained for {start_epoch} epoch(s); nothing to do (raise --epochs to continue)")
    return TrainResult(recipe, ckpt_path, csv_path, history, max(start_epoch, last_epoch),
                       time.perf_counter() - started, resumed_from, info, job.primary)


def _load_training_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "optimizer" not in state:
        raise TrainingError(f"{path} is not a resumable `cxrlt train` checkpoint (a bare state_dict?); train without --resume")
    if state.get("model_name") != recipe.checkpoint_name() or state.get("profile") != recipe.profile:
        raise TrainingError(
            f"{path} was trained for {state.get('model_name')} (profile {state.get('profile')}), not "
            f"{recipe.checkpoint_name()} (profile {recipe.profile}); use another --out or drop --resume"
        )
    return state


def _progress(iterable, description: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, disable=None if progress is None else not progress)


def _epoch_line(recipe: Recipe, row: dict[str, Any], primary: str) -> str:
    shown = [f"{recipe.name} epoch {row['epoch']}/{recipe.epochs}", f"loss {row['train_loss']:.4f}"]
    for key in (primary, "val_mAUC", "val_loss"):
        value = row.get(key)
        if isinstance(value, float) and not math.isnan(value):
            shown.append(f"{key} {value:.4f}")
    shown.append(f"{row['epoch_s']:.1f}s")
    return "  ".join(shown)
