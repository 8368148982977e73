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
