"""Repeat factors by hand; the sampler raises rare-class exposure, deterministically."""

import math

import numpy as np
import pytest

from training.samplers import RepeatFactorSampler, class_repeat_factors, repeat_factors


def toy_labels() -> np.ndarray:
    # 10 images, class A in image 0 only (f 0.1), class B in images 0-4 (f 0.5).
    labels = np.zeros((10, 2), dtype=np.float32)
    labels[0, 0] = 1
    labels[:5, 1] = 1
    return labels


def test_repeat_factors_by_hand():
    r_a, r_b = math.sqrt(0.4 / 0.1), max(1.0, math.sqrt(0.4 / 0.5))  # 2.0 and 1.0
    got = repeat_factors(toy_labels(), threshold=0.4, max_repeat=10)
    expected = [max(r_a, r_b)] + [r_b] * 4 + [1.0] * 5  # max over positives; 1 for none
    assert got.tolist() == pytest.approx(expected)


def test_repeat_factors_cap_and_empty_class():
    got = repeat_factors(toy_labels(), threshold=3.6, max_repeat=4)  # r_A = sqrt(36) = 6 -> 4
    assert got[0] == 4.0
    assert got[1] == pytest.approx(math.sqrt(3.6 / 0.5))
    assert class_repeat_factors(np.array([0.0, 0.01]), 0.04).tolist() == [1.0, 2.0]


def test_sampler_deterministic_and_changes_per_epoch():
    labels = np.random.default_rng(0).random((200, 5)) < np.array([0.5, 0.2, 0.05, 0.02, 0.01])
    a = RepeatFactorSampler(labels, threshold=0.1, seed=3)
    b = RepeatFactorSampler(labels, threshold=0.1, seed=3)
    assert a.epoch_indices(0).tolist() == b.epoch_indices(0).tolist()
    assert a.epoch_indices(0).tolist() != a.epoch_indices(1).tolist()
    a.set_epoch(5)
    assert len(a) == len(list(a)) == len(b.epoch_indices(5))
    assert list(a) == b.epoch_indices(6).tolist()  # iterating moves on to the next epoch


def test_sampler_rounds_stochastically_to_the_factor():
    sampler = RepeatFactorSampler(factors=np.array([1.0, 2.5, 1.25]), seed=0, shuffle=False)
    totals = np.zeros(3)
    for epoch in range(2000):
        counts = np.bincount(sampler.epoch_indices(epoch), minlength=3)
        assert counts[0] == 1 and counts[1] in (2, 3) and counts[2] in (1, 2)
        totals += counts
    assert (totals / 2000).tolist() == pytest.approx([1.0, 2.5, 1.25], abs=0.05)


def test_sampler_increases_rare_class_exposure():
    rng = np.random.default_rng(1)
    labels = rng.random((1000, 3)) < np.array([0.4, 0.03, 0.005])
    labels[:5, 2] = True  # at least a few rare positives
    base = labels.mean(axis=0)
    sampler = RepeatFactorSampler(labels, threshold=0.1, max_repeat=10, seed=0)
    drawn = np.concatenate([sampler.epoch_indices(e) for e in range(5)])
    exposure = labels[drawn].mean(axis=0)
    assert exposure[1] > 1.5 * base[1] and exposure[2] > 2 * base[2]
    assert exposure[2] / base[2] > exposure[0] / base[0]


def test_sampler_needs_one_input():
    with pytest.raises(ValueError, match="either labels"):
        RepeatFactorSampler()


# ------------------------------------------------------------------ distributed sampling

from training.samplers import DistributedBatchSampler, ShuffleDraw, plan_steps  # noqa: E402


def _all_ranks(draw, batch, world, accumulate, epoch):
    samplers = [DistributedBatchSampler(draw, batch, rank, world, accumulate) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return samplers, [[list(b) for b in sampler] for sampler in samplers]


@pytest.mark.parametrize("world, accumulate, batch", [(1, 1, 8), (2, 1, 8), (3, 1, 8), (2, 2, 16), (4, 1, 6), (2, 3, 7)])
@pytest.mark.parametrize("kind", ["repeat_factor", "shuffle"])
def test_ranks_draw_disjoint_shares_that_make_up_the_one_process_epoch(world, accumulate, batch, kind):
    labels = np.random.default_rng(0).random((53, 4)) < np.array([0.5, 0.2, 0.05, 0.02])
    draw = RepeatFactorSampler(labels, threshold=0.1, seed=3) if kind == "repeat_factor" else ShuffleDraw(53, seed=3)
    for epoch in (0, 1):
        whole = draw.epoch_indices(epoch)
        samplers, batches = _all_ranks(draw, batch, world, accumulate, epoch)
        # every process runs the same number of passes, none of them empty
        assert len({len(b) for b in batches}) == 1 and all(len(x) > 0 for b in batches for x in b)
        # disjoint positions of the draw, together exactly the draw: the same multiset as one process
        assert sorted(i for b in batches for x in b for i in x) == sorted(whole.tolist())
        one = [i for b in _all_ranks(draw, batch, 1, 1, epoch)[1] for x in b for i in x]
        assert sorted(one) == sorted(whole.tolist())
        # step by step, the ranks' shares of a pass are consecutive pieces of the draw
        flat = [i for step in zip(*[iter(b) for b in batches]) for share in step for i in share]
        assert flat == whole.tolist()
        # each step's shares over all processes and passes add up to the whole step
        passes = [s.passes(epoch) for s in samplers]
        steps = samplers[0].steps(epoch)
        assert sum(f for p in passes for f, _ in p) == pytest.approx(steps)
        assert all(sum(last for _, last in p) == steps for p in passes)
        assert len(samplers[0]) == steps * accumulate


def test_distributed_draw_is_deterministic_per_seed_and_epoch():
    a = DistributedBatchSampler(ShuffleDraw(40, seed=1), 8, rank=1, world=2)
    b = DistributedBatchSampler(ShuffleDraw(40, seed=1), 8, rank=1, world=2)
    assert a.shares(4)[0].tolist() == b.shares(4)[0].tolist()
    assert [s.tolist() for s in a.shares(4)] != [s.tolist() for s in a.shares(5)]
    assert [s.tolist() for s in a.shares(4)] != [s.tolist() for s in DistributedBatchSampler(ShuffleDraw(40, seed=2), 8, 1, 2).shares(4)]


def test_a_short_last_step_joins_the_one_before_it():
    steps = plan_steps(np.arange(17), global_batch=8, parts=2)  # 8 + 8 + 1: the 1 cannot be shared by 2
    assert [sum(len(p) for p in step) for step in steps] == [8, 9]
    assert [len(p) for p in steps[1]] == [5, 4]
    assert [sum(len(p) for p in step) for step in plan_steps(np.arange(17), 8, 1)] == [8, 8, 1]  # one process: as before
    with pytest.raises(ValueError, match="cannot be shared"):
        plan_steps(np.arange(3), 8, 4)


def test_one_process_without_accumulation_keeps_the_plain_loader(tmp_path):
    import torch

    from training.job import data_loader
    from training.recipes import load_recipe

    dataset = torch.utils.data.TensorDataset(torch.arange(20))
    recipe = load_recipe("router")
    assert not isinstance(data_loader(dataset, 4, recipe, 0).batch_sampler, DistributedBatchSampler)
    import dataclasses

    accumulating = data_loader(dataset, 8, dataclasses.replace(recipe, accumulate_steps=2), 0)
    assert isinstance(accumulating.batch_sampler, DistributedBatchSampler)
    assert [len(b[0]) for b in accumulating] == [4, 4, 4, 4, 2, 2]
