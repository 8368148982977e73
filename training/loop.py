"""The training loop behind `cxrlt train`: one recipe (training/recipes.py) -> one checkpoint.

The recipe's task picks the job (training.jobs: the network job for the router and the Task 1
networks, the CLIP job for zero-shot fine-tuning); this loop is the same for all of them.

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

Launched by torchrun (`cxrlt train --nproc N`), the same loop trains data-parallel
(training.distributed): DistributedDataParallel, each epoch's draw shared out between the
processes, validation sharded and gathered, checkpoints, metrics and logs from rank 0 only.
`batch_size` is the images of one optimiser step over all processes and `accumulate_steps`
passes, so the optimiser, schedule and EMA in a checkpoint mean the same at any process count
and a run resumes with another one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlt.io.atomic import atomic_path

from networks.checkpoints import CheckpointError, checkpoint_path, file_sha256, state_dict_sha256
from training import distributed, image_cache
from training.ema import ModelEma
from training.job import (Log, TrainingError, autocast_dtype, init_weights_path, load_split, rank_seed,
                          seed_everything, select_device, set_threads)
from training.jobs import create_job
from training.recipes import Recipe
from training.samplers import DistributedBatchSampler
from training.schedule import WarmupCosine

CHECKPOINT_FORMAT = "cxrlt-train/1"


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
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    fields: list[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


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


def train(recipe: Recipe, data_csv: str | os.PathLike, out_dir: str | os.PathLike, *, resume: bool = False,
          epochs: int | None = None, stop_after_epoch: int | None = None, device: str | None = None,
          image_root: str | os.PathLike | None = None, progress: bool | None = None,
          resized: str | os.PathLike | None = "auto", log: Log = print) -> TrainResult:
    """Train one recipe and write OUT/<model>.pt and OUT/<model>.metrics.csv.

    epochs: override the recipe's total. resume: continue from OUT/<model>.pt (model, EMA,
    optimiser, scheduler, scaler, epoch, history). stop_after_epoch: end this run after that
    epoch (a later --resume continues to `epochs`). progress: a tqdm bar per epoch (None: only
    on a terminal). resized: the `cxrlt prepare-data` cache to read images from when it holds
    the recipe's size ("auto": `resized/` next to the CSV; None: always decode the sources).
    """
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=int(epochs))
    threads = torch.get_num_threads()
    try:
        return _train(recipe, data_csv, Path(out_dir), resume, stop_after_epoch, device, (image_root, resized), progress, log)
    finally:
        torch.set_num_threads(threads)  # the recipe's thread count is for this run only


@dataclasses.dataclass
class _Run:
    """One training run's moving parts: what a checkpoint holds and what an epoch advances."""

    recipe: Recipe
    job: Any
    device: torch.device
    dtype: Any
    info: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEma
    scaler: Any
    steps_per_epoch: int
    model: nn.Module | None = None  # what the batches go through: the module, DDP-wrapped when distributed
    world: distributed.World = distributed.World()
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    epoch: int = 0
    global_step: int = 0
    pending: int = 0  # backward passes since the last optimiser step

    @property
    def module(self) -> nn.Module:
        return self.job.module


def _schedule(recipe: Recipe, steps_per_epoch: int) -> WarmupCosine:
    """The recipe's learning-rate factor per optimiser step, over its epochs."""
    return WarmupCosine(steps_per_epoch * recipe.epochs, round(steps_per_epoch * float(recipe.schedule.get("warmup_epochs", 1))),
                        float(recipe.schedule.get("min_lr_ratio", 0.01)))


def _start(recipe: Recipe, data_csv, device: str | None, images: tuple, out: Path, log: Log) -> _Run:
    """Data, job, optimiser, schedule, EMA and scaler of a fresh run (the recipe's seed set first)."""
    set_threads(recipe.threads)
    torch_device = distributed.process_device(select_device(device))
    world = distributed.setup(torch_device)
    dtype = autocast_dtype(torch_device, recipe.precision)
    seed_everything(recipe.seed)
    data = load_split(data_csv, recipe.val_fraction, recipe.split_seed, image_root=images[0], resized=images[1])
    cache = image_cache.find(data.resized_root, recipe.image_size)
    if cache is not None:
        log(f"{recipe.name}: reading images pre-resized to {recipe.image_size} px from {cache}")
    job = create_job(recipe, data)
    info = {**job.summary(), **job.before_training(out, log)}
    if recipe.init_weights:
        init = init_weights_path(recipe)
        info.update(init_weights=str(init), init_weights_sha256=file_sha256(init))
        log(f"{recipe.name}: started from the pretrained weights in {init}")
    job.to(torch_device)
    params = _param_groups(job.module, float(recipe.optimizer["weight_decay"]))
    optimizer = torch.optim.AdamW(params, lr=float(recipe.optimizer["lr"]), betas=tuple(recipe.optimizer.get("betas", (0.9, 0.999))),
                                  eps=float(recipe.optimizer.get("eps", 1e-8)))
    steps_per_epoch = max(1, _optimizer_steps(job.train_loader(0), 0))
    ema = ModelEma(job.module, float(recipe.ema.get("decay", 0.999)), bool(recipe.ema.get("warmup", True)))
    scaler = torch.amp.GradScaler(torch_device.type, enabled=dtype == torch.float16)
    model = distributed.wrap(job.module, torch_device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, steps_per_epoch))
    return _Run(recipe, job, torch_device, dtype, info, optimizer, scheduler, ema, scaler, steps_per_epoch, model, world)


def _optimizer_steps(loader, epoch: int) -> int:
    sampler = getattr(loader, "batch_sampler", None)
    return sampler.steps(epoch) if isinstance(sampler, DistributedBatchSampler) else len(loader)


def _passes(loader, epoch: int):
    """Per batch: (its share of the step's images over all processes, whether it ends the step)."""
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, DistributedBatchSampler):
        return sampler.passes(epoch)
    return itertools.repeat((1.0, True))


def _resume(run: _Run, ckpt_path: Path, log: Log) -> int | None:
    """Continue `run` from its checkpoint; the epoch it resumed from, or None without one."""
    if not ckpt_path.is_file():
        log(f"{run.recipe.name}: --resume but no {ckpt_path}; starting from scratch")
        return None
    state = _load_training_checkpoint(ckpt_path, run.recipe)
    job, ema = run.job, run.ema
    job.served(run.module).load_state_dict(state["state_dict"])
    job.served(ema.module).load_state_dict(state["ema_state_dict"])
    if job.extra(run.module) is not None:
        job.extra(run.module).load_state_dict(state["extra_state_dict"])
        job.extra(ema.module).load_state_dict(state["ema_extra_state_dict"])
    ema.load_ema_state(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    # this run's total steps (--epochs may have grown)
    run.scheduler.lr_lambdas[0].__dict__.update(_schedule(run.recipe, run.steps_per_epoch).__dict__)
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.global_step = int(state["epoch"]), int(state["global_step"])
    run.history = list(state.get("history", []))
    log(f"{run.recipe.name}: resumed from {ckpt_path} at epoch {run.epoch}/{run.recipe.epochs}")
    return run.epoch


def _train_epoch(run: _Run, progress: bool | None) -> dict[str, Any]:
    """One epoch of optimisation (seeded from (seed, epoch)), then validation of the EMA weights."""
    recipe, epoch, started = run.recipe, run.epoch, time.perf_counter()
    torch.manual_seed(rank_seed(recipe.seed, epoch, run.world.rank))
    run.model.train()
    totals: dict[str, float] = {"train_loss": 0.0}
    count = 0
    loader = run.job.train_loader(epoch)
    bar = _progress(loader, f"{recipe.name} {epoch + 1}/{recipe.epochs}", progress if run.world.main else False)
    for batch, (share, last) in zip(bar, _passes(loader, epoch)):
        loss, parts = _backward(run, batch, share, last)
        if last:
            _step(run)
            count += 1
        totals["train_loss"] += float(loss.detach()) * share
        for key, value in parts.items():
            totals[f"train_{key}"] = totals.get(f"train_{key}", 0.0) + float(value) * share
        if last and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{totals['train_loss'] / count:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
    totals = distributed.reduce_sums(totals)  # each step's images over every process
    row: dict[str, Any] = {"epoch": epoch + 1, "step": run.global_step, "lr": run.optimizer.param_groups[0]["lr"]}
    row.update({k: v / max(1, count) for k, v in totals.items()})
    row.update(run.job.validate(run.ema.module, run.device, run.dtype))
    if run.world.distributed:
        distributed.check_same(state_dict_sha256(run.ema.module), f"{recipe.name}: the EMA weights after epoch {epoch + 1}")
        row["processes"] = run.world.size
    row["epoch_s"] = time.perf_counter() - started
    run.epoch += 1
    run.history.append(_plain(row))
    return row


def _backward(run: _Run, batch, share: float, last: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and scaled backward of one batch. Its loss counts by its share of the step's
    images (DDP averages over the processes, accumulation adds the passes), so a step's gradient
    is that of the mean loss over all its images, whatever the process and pass count. Only the
    step's last pass synchronises the gradients."""
    if run.pending == 0:
        run.optimizer.zero_grad(set_to_none=True)
    quiet = not last and run.model is not run.module
    with run.model.no_sync() if quiet else contextlib.nullcontext():
        loss, parts = run.job.training_loss(run.model, batch, run.device, run.dtype)
        if not torch.isfinite(loss):
            raise TrainingError(f"{run.recipe.name}: the loss became {loss.item()} at epoch {run.epoch + 1}; lower optimizer.lr")
        weight = share * run.world.size
        run.scaler.scale(loss if weight == 1.0 else loss * weight).backward()
    run.pending = 0 if last else run.pending + 1
    return loss, parts


def _step(run: _Run) -> None:
    """One optimiser step after the step's backward passes: clipping, scheduler and EMA."""
    if run.recipe.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], run.recipe.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    distributed.sync_buffers(run.module)  # rank 0's batch-norm statistics, so every EMA is the same
    run.ema.update(run.module)
    run.global_step += 1


def _checkpoint(run: _Run) -> dict[str, Any]:
    recipe, job = run.recipe, run.job
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": recipe.checkpoint_name(),
        "profile": recipe.profile,
        "task": recipe.task,
        "state_dict": job.served(run.module).state_dict(),
        "ema_state_dict": job.served(run.ema.module).state_dict(),
        "ema": run.ema.ema_state(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "epoch": run.epoch,
        "epochs": recipe.epochs,
        "global_step": run.global_step,
        "history": run.history,
        "recipe": _plain(recipe.to_dict()),
        "info": _plain(run.info),
    }
    if job.extra(run.module) is not None:
        payload["extra_state_dict"] = job.extra(run.module).state_dict()
        payload["ema_extra_state_dict"] = job.extra(run.ema.module).state_dict()
    return payload


def _train(recipe: Recipe, data_csv, out: Path, resume: bool, stop_after_epoch: int | None, device: str | None,
           images: tuple, progress: bool | None, log: Log) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if distributed.env_rank() != 0:
        log = _silent  # rank 0 alone logs and writes
    run = _start(recipe, data_csv, device, images, out, log)
    ckpt_path = checkpoint_path(out, recipe.checkpoint_name())
    csv_path = metrics_csv_path(out, recipe.checkpoint_name())
    resumed_from = _resume(run, ckpt_path, log) if resume else None
    start_epoch = run.epoch
    last_epoch = recipe.epochs if stop_after_epoch is None else min(recipe.epochs, int(stop_after_epoch))
    while run.epoch < last_epoch:
        row = _train_epoch(run, progress)
        if run.world.main:
            _atomic_save(_checkpoint(run), ckpt_path)
            _write_history(run.history, csv_path)
        log(_epoch_line(recipe, row, run.job.primary))
    distributed.barrier()  # every process returns once rank 0's checkpoint is written
    if last_epoch <= start_epoch:
        log(f"{recipe.name}: already trained for {start_epoch} epoch(s); nothing to do (raise --epochs to continue)")
    return TrainResult(recipe, ckpt_path, csv_path, run.history, max(start_epoch, last_epoch),
                       time.perf_counter() - started, resumed_from, run.info, run.job.primary)


def _silent(line: str) -> None:
    pass


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
