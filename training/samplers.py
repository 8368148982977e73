"""Class-aware repeat-factor sampling (after LVIS's repeat factor sampling, Gupta et al. 2019).

Each class c with image frequency f_c (fraction of training images that are positive)
gets r_c = max(1, sqrt(T / f_c)): classes rarer than the threshold T are repeated, common
ones are not. An image is repeated r_i = max over its positive classes of r_c (1 when it
has none), capped at `max_repeat` so a handful of tail images cannot dominate an epoch.
Per epoch every image appears floor(r_i) times plus once more with probability
frac(r_i) ("stochastic rounding"), so the expected exposure is exactly r_i.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch.utils.data


def class_repeat_factors(class_frequency: np.ndarray, threshold: float) -> np.ndarray:
    """r_c = max(1, sqrt(T / f_c)); classes with f_c = 0 (no images to repeat) get 1."""
    freq = np.asarray(class_frequency, dtype=np.float64)
    with np.errstate(divide="ignore"):
        factors = np.sqrt(threshold / freq)
    return np.where(freq > 0, np.maximum(1.0, factors), 1.0)


def repeat_factors(labels: np.ndarray, threshold: float = 0.05, max_repeat: float = 10.0) -> np.ndarray:
    """Per-image repeat factors, float64 [N], from 0/1 labels [N, C]."""
    labels = np.asarray(labels) > 0
    if labels.ndim != 2:
        raise ValueError(f"labels must be [images, classes], got shape {list(labels.shape)}")
    if threshold <= 0 or max_repeat < 1:
        raise ValueError(f"need threshold > 0 and max_repeat >= 1, got {threshold} and {max_repeat}")
    if labels.shape[0] == 0:
        return np.zeros(0)
    per_class = class_repeat_factors(labels.mean(axis=0), threshold)
    # Max over positive classes; the 1.0 floor covers images with no positive class.
    per_image = np.max(np.where(labels, per_class[None, :], 1.0), axis=1, initial=1.0)
    return np.minimum(per_image, max_repeat)


class RepeatFactorSampler(torch.utils.data.Sampler[int]):
    """Yields dataset indices, each image floor(r) or ceil(r) times per epoch, shuffled.

    Deterministic for (seed, epoch). Call `set_epoch(e)` before each epoch like
    DistributedSampler; without it each full iteration moves on to the next epoch by
    itself, so successive epochs still draw differently. len() is the size of the epoch
    that the next iteration will yield.
    """

    def __init__(self, labels: np.ndarray | None = None, threshold: float = 0.05, max_repeat: float = 10.0,
                 seed: int = 0, shuffle: bool = True, factors: np.ndarray | None = None) -> None:
        if (labels is None) == (factors is None):
            raise ValueError("pass either labels [N, C] or precomputed per-image factors [N]")
        self.factors = np.asarray(factors, dtype=np.float64) if factors is not None else repeat_factors(
            labels, threshold, max_repeat)
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The indices of one epoch (what iteration yields), int64."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self.factors)
        counts = (whole + (rng.random(len(self.factors)) < self.factors - whole)).astype(np.int64)
        indices = np.repeat(np.arange(len(self.factors), dtype=np.int64), counts)
        if self.shuffle:
            rng.shuffle(indices)
        self._cache = (epoch, indices)
        return indices

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        self.epoch += 1
        return iter(indices.tolist())

    def __len__(self) -> int:
        return len(self.epoch_indices(self.epoch))


# ------------------------------------------------------------------ distributed sampling


class ShuffleDraw:
    """Every image once per epoch in an order drawn from (seed, epoch): the plain shuffle's
    draw when it is shared between processes (same `epoch_indices` interface as the
    repeat-factor sampler)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed = int(size), int(seed)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(self.size).astype(np.int64)


def plan_steps(order: np.ndarray, global_batch: int, parts: int) -> list[list[np.ndarray]]:
    """One epoch's draw cut into optimiser steps of `global_batch` images, each split into
    `parts` (processes x accumulation steps) near-equal, non-empty shares.

    A last step with fewer images than `parts` joins the step before it, so no share is ever
    empty (every process runs the same number of passes) and no image is dropped or repeated.
    """
    order = np.asarray(order, dtype=np.int64)
    if len(order) < parts:
        raise ValueError(f"an epoch of {len(order)} image(s) cannot be shared by {parts} processes x accumulation steps")
    steps = [order[start:start + global_batch] for start in range(0, len(order), global_batch)]
    if len(steps) > 1 and len(steps[-1]) < parts:
        steps[-2:] = [np.concatenate(steps[-2:])]
    return [np.array_split(step, parts) for step in steps]


class DistributedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This process's batches of an epoch drawn once for all processes.

    `draw.epoch_indices(epoch)` is the epoch's draw (the repeat-factor sampler's, or a
    `ShuffleDraw`), the same in every process because it depends only on (seed, epoch). Each
    optimiser step takes the next `global_batch` indices of it and splits them into
    world x accumulate shares (training.samplers.plan_steps); process `rank` takes share
    a * world + rank in accumulation pass a. The shares of all processes are disjoint and
    together are exactly the draw: an N-process epoch sees the images a 1-process epoch sees.
    `passes(epoch)` tells the loop, per batch, the fraction of its step's images it holds and
    whether it ends the step.
    """

    def __init__(self, draw, global_batch: int, rank: int = 0, world: int = 1, accumulate: int = 1) -> None:
        if not 0 <= rank < world or accumulate < 1 or global_batch < 1:
            raise ValueError(f"need 0 <= rank < world, accumulate >= 1 and batch >= 1 (got {rank}, {world}, {accumulate}, {global_batch})")
        self.draw, self.global_batch = draw, int(global_batch)
        self.rank, self.world, self.accumulate = int(rank), int(world), int(accumulate)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> list[list[np.ndarray]]:
        """Every process's shares: plan[step][pass * world + rank]."""
        return plan_steps(self.draw.epoch_indices(epoch), self.global_batch, self.world * self.accumulate)

    def shares(self, epoch: int) -> list[np.ndarray]:
        """This process's batches, in order."""
        return [step[a * self.world + self.rank] for step in self.plan(epoch) for a in range(self.accumulate)]

    def passes(self, epoch: int) -> list[tuple[float, bool]]:
        """Per batch of this process: (its images / its step's images, last pass of the step)."""
        out = []
        for step in self.plan(epoch):
            total = sum(len(share) for share in step)
            for a in range(self.accumulate):
                out.append((len(step[a * self.world + self.rank]) / total, a == self.accumulate - 1))
        return out

    def steps(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def __iter__(self):
        return iter([share.tolist() for share in self.shares(self.epoch)])

    def __len__(self) -> int:
        return len(self.plan(self.epoch)) * self.accumulate
