"""`cxrlt prepare-data`: the pre-resized cache holds what training would compute on the fly,
resumes where it stopped, and training reads it when it is present."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cxrlt.contract.labels import TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig
from training import image_cache
from training.data import CxrDataset, read_cxrlt_csv
from training.job import load_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """96 px synthetic radiographs: larger than the tiny profile's 64, smaller than CLIP's 224."""
    from training.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("prep"), 12, seed=2, image_size=96)


def _prepare(cxrlt, data, *extra):
    assert cxrlt("prepare-data", "--data", data, "--size", "64", "224", "--workers", "2", "--no-progress", *extra) == 0


def _tensors(data, size, resized, clip=False):
    split = load_split(data, resized=resized)
    config = PreprocessConfig.clip(size) if clip else PreprocessConfig(size=size)
    dataset = CxrDataset(split.table, split.image_root, config, None, TASK1_LABELS, split.loader(False, size))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_cached_tensors_equal_the_on_the_fly_ones(cxrlt, data):
    _prepare(cxrlt, data)
    cached = image_cache.entry_path(data.parent / "resized", 64, read_cxrlt_csv(data).image_paths[0])
    stored = np.load(cached)
    assert stored.dtype == np.uint16 and max(stored.shape) == 64
    # 224 > 96: the images are stored unchanged, and the tensors are identical (CLIP's max scaling too)
    for clip in (False, True):
        assert torch.equal(_tensors(data, 224, "auto", clip), _tensors(data, 224, None, clip))
    # 64 < 96: resized once and rounded to integers; the tensors differ by that rounding only
    fly, cache = _tensors(data, 64, None), _tensors(data, 64, "auto")
    assert not torch.equal(fly, cache)
    assert (fly - cache).abs().max() < 0.02  # normalised units: ~0.3 % of the [0, 1] range
    assert (fly - cache).abs().mean() < 1e-3


def test_prepare_data_resumes_and_rewrites_stale_files(cxrlt, data, capfd):
    _prepare(cxrlt, data)
    capfd.readouterr()
    entries = sorted((data.parent / "resized" / "64").glob("*.npy"))
    assert len(entries) == 12
    entries[0].unlink()
    source = data.parent / entries[1].name[:-len(".npy")]
    os.utime(source, ns=(entries[1].stat().st_mtime_ns + 10**9,) * 2)  # the source changed after it was cached
    _prepare(cxrlt, data)
    out = " ".join(capfd.readouterr().err.split())
    assert "64 px: 2 written, 10 already cached" in out and "224 px: 1 written, 11 already cached" in out  # the changed source at both sizes
    # a stale entry is never read: the loader falls back to the source
    loader = image_cache.ResizedLoader(data.parent / "resized" / "64", data.parent)
    os.utime(source, ns=(entries[1].stat().st_mtime_ns + 10**9,) * 2)
    assert max(loader(source).shape) == 96
    assert max(loader(data.parent / entries[2].name[:-len(".npy")]).shape) == 64


def test_training_reads_the_cache_when_present(data, tmp_path):
    from training.loop import train
    from training.recipes import load_recipe

    recipe = load_recipe("frontal_pcam", assignments=["batch_size=16"])
    lines: list[str] = []
    train(recipe, data, tmp_path / "a", epochs=1, progress=False, log=lines.append)
    assert any("pre-resized to 64 px" in line for line in lines)
    lines.clear()
    train(recipe, data, tmp_path / "b", epochs=1, progress=False, resized=None, log=lines.append)
    assert not any("pre-resized" in line for line in lines)
