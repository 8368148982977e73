"""What every training job shares, and the registry that picks a job for a recipe.

A job is what differs between recipes (the module, the batches, the loss, the validation);
the loop (training.loop) is the same for all of them. Job classes register under the recipe
tasks they train (`register_job`); `create_job` builds the one a recipe asks for. The
registry is filled by importing the job modules: training.jobs does that, and is what
callers use.

Also here, because every job uses them: the patient-level split of a CXR-LT CSV
(`load_split`), the image loader (cxrlt.io.images.load_pixels, the client's loader, so
training sees exactly the pixels a client sends), device and autocast selection, seeding
and the per-epoch DataLoader.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cxrlt.contract.labels import PROJECTIONS, TASK1_LABELS
from cxrlt.io.images import load_pixels

from training import image_cache
from training.data import LabelTable, patient_split, read_labels
from training.recipes import Recipe
from training.samplers import DistributedBatchSampler, ShuffleDraw

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
    resized_root: Path | None = None  # a `cxrlt prepare-data` cache (training.image_cache), if any

    def loader(self, memory: bool, size: int) -> Callable[[Path], np.ndarray]:
        """The image loader of one recipe: through the cache of `size` when it is present."""
        folder = image_cache.find(self.resized_root, size)
        return image_loader(memory, image_cache.ResizedLoader(folder, self.image_root) if folder else None)

    def select(self, projection: str, part: str) -> LabelTable:
        """The train or val images of one projection ('all': every image with a known projection
        for the router, every image for the others)."""
        indices = self.train if part == "train" else self.val
        if projection in PROJECTIONS:
            indices = [i for i in indices if self.table.projections[i] == projection]
        return self.table.subset(indices)


def load_split(data_csv: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
               labels: tuple[str, ...] = TASK1_LABELS, image_root: str | os.PathLike | None = None,
               resized: str | os.PathLike | None = "auto") -> SplitData:
    """Read a CXR-LT CSV or a PadChest label file (training.data.read_labels) and split it 9:1 by
    patient (deterministic for seed and fraction).

    resized: the pre-resized image cache's folder ("auto": `resized/` next to the CSV; None: none)."""
    data_csv = Path(data_csv)
    if not data_csv.is_file():
        raise TrainingError(f"data CSV {data_csv} does not exist; make one with `cxrlt synth-data --out DIR --n 600`")
    table = read_labels(data_csv, labels=labels)
    if len(table) < 2:
        raise TrainingError(f"{data_csv} holds {len(table)} image(s); training needs at least two patients")
    train, val = patient_split(table.patient_ids, val_fraction, seed)
    root = image_cache.default_root(data_csv) if resized == "auto" else (Path(resized) if resized else None)
    return SplitData(table, Path(image_root) if image_root else data_csv.parent, train, val, root)


def prevalence_map(labels: np.ndarray) -> float:
    """The mAP of a constant (uninformed) score: the mean positive rate of the evaluable classes."""
    rates = labels.mean(axis=0)
    evaluable = (rates > 0) & (rates < 1)
    return float(rates[evaluable].mean()) if evaluable.any() else float("nan")


CACHE_MAX_IMAGE_BYTES = 1 << 20  # full-size radiographs are re-read, never kept in memory
_IMAGE_CACHE: dict[tuple[str, int, int, str], np.ndarray] = {}


def _cached_image(path: Path, load: Callable[[Path], np.ndarray] = load_pixels, tag: str = "") -> np.ndarray:
    stat = os.stat(path)
    key = (str(path), stat.st_mtime_ns, stat.st_size, tag)  # a rewritten file is read again
    image = _IMAGE_CACHE.get(key)
    if image is None:
        image = load(path)
        if image.nbytes <= CACHE_MAX_IMAGE_BYTES:
            image.setflags(write=False)
            _IMAGE_CACHE[key] = image
    return image


def image_loader(cache: bool, resized: Callable[[Path], np.ndarray] | None = None) -> Callable[[Path], np.ndarray]:
    """cxrlt.io.images.load_pixels, or `resized` (a training.image_cache.ResizedLoader), optionally
    memoised (images up to 1 MiB: the tiny profile's)."""
    if not cache:
        return resized or load_pixels
    if resized is None:
        return _cached_image
    return functools.partial(_cached_image, load=resized, tag=str(getattr(resized, "folder", "resized")))


def init_weights_path(recipe: Recipe) -> Path | None:
    """The recipe's `init_weights` file, checked (None when it has none)."""
    if not recipe.init_weights:
        return None
    path = Path(recipe.init_weights).expanduser()
    if not path.is_file():
        raise TrainingError(f"{recipe.name}: init_weights {recipe.init_weights!r} not found; give the path of a "
                            "pretrained weights file you downloaded, or remove the key to start from random weights")
    return path


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


def rank_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one process's epoch (augmentation): epoch_seed for rank 0, offset for the others."""
    return (epoch_seed(seed, epoch) + 1_000_033 * int(rank)) % (2**31)


def data_loader(dataset, batch_size: int, recipe: Recipe, epoch: int, sampler=None, shuffle: bool = True,
                device: torch.device | None = None) -> torch.utils.data.DataLoader:
    """The training batches of one epoch, shuffled (or sampled) from a seed of (recipe.seed, epoch).

    In a distributed run, or with recipe.accumulate_steps > 1, the epoch's draw (the sampler's,
    or a shuffle from (seed, epoch)) is shared out by a DistributedBatchSampler: batch_size
    images per optimiser step over all processes and accumulation passes together."""
    from training.distributed import world

    generator = torch.Generator().manual_seed(epoch_seed(recipe.seed, epoch))
    common = dict(num_workers=recipe.num_workers, generator=generator,
                  pin_memory=bool(device is not None and device.type == "cuda"), persistent_workers=False)
    current = world()
    if current.distributed or recipe.accumulate_steps > 1:
        draw = sampler if sampler is not None else ShuffleDraw(len(dataset), recipe.seed)
        batches = DistributedBatchSampler(draw, batch_size, current.rank, current.size, recipe.accumulate_steps)
        batches.set_epoch(epoch)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    if sampler is not None:
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                                       **common)


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


# -------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Job]] = {}


def register_job(*kinds: str) -> Callable[[type[Job]], type[Job]]:
    """Class decorator: train recipes whose `task` is one of `kinds` with this Job class."""

    def add(cls: type[Job]) -> type[Job]:
        for kind in kinds:
            if kind in _REGISTRY and _REGISTRY[kind] is not cls:
                raise ValueError(f"job kind {kind!r} is already taken by {_REGISTRY[kind].__name__}")
            _REGISTRY[kind] = cls
        return cls

    return add


def job_kinds() -> tuple[str, ...]:
    """The recipe tasks a job is registered for (import training.jobs to register them all)."""
    return tuple(sorted(_REGISTRY))


def create_job(recipe: Recipe, data: SplitData) -> Job:
    """The job that trains `recipe` (chosen by recipe.task) on `data`."""
    try:
        cls = _REGISTRY[recipe.task]
    except KeyError:
        known = ", ".join(job_kinds()) or "none (import training.jobs to register them)"
        raise TrainingError(f"{recipe.name}: no training job for task {recipe.task!r}; known: {known}") from None
    return cls(recipe, data)
