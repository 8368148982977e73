"""The shared preprocessing and ensemble math."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlt.contract import ensemble
from cxrlt.contract.labels import ACCEPTED_HINTS, projection_from_hint
from cxrlt.contract.preprocessing import (TTA_VIEWS, ImageError, PreprocessConfig, downscale_for_sending, prepare_square,
                                         preprocess, scale_to_unit, tta_view)


def test_percentile_clip_scales_to_unit_range():
    image = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    image[0, 0] = 65535  # an outlier far above the 99.5th percentile
    unit = scale_to_unit(image, PreprocessConfig(size=32))
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert np.mean(unit == 1.0) == pytest.approx(0.005, abs=0.001)  # the top 0.5 % saturate


def test_clip_mode_divides_by_the_source_maximum():
    config = PreprocessConfig.clip(224)
    assert scale_to_unit(np.full((8, 8), 255, np.uint16), config).max() == pytest.approx(1.0)
    assert scale_to_unit(np.full((8, 8), 32768, np.uint16), config).max() == pytest.approx(32768 / 65535)


def test_prepare_square_keeps_aspect_ratio_with_zero_padding():
    wide = np.full((50, 100), 65535, np.uint16)  # "max" mode: every pixel scales to 1.0
    square = prepare_square(wide, PreprocessConfig.clip(64))
    assert square.shape == (64, 64)
    assert square[:15].max() == 0 and square[-15:].max() == 0  # padded top and bottom
    assert square[32].min() == pytest.approx(1.0)


def _radiograph(height: int = 1955, width: int = 1841) -> np.ndarray:
    """A smooth 15-bit field with noise: the statistics of a detector image, not a flat one."""
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:height, 0:width]
    field = 12_000 + 8_000 * np.sin(rows / 300.0) * np.cos(cols / 250.0) + rng.normal(0, 600, (height, width))
    return np.clip(field, 0, 32767).astype(np.uint16)


def _full_resolution_square(image: np.ndarray, size: int) -> np.ndarray:
    """The slow definition the fast path replaces: percentile clip over every pixel, then a
    plain bilinear resize of the full matrix."""
    from PIL import Image

    pixels = image.astype(np.float32)
    low, high = np.percentile(pixels, (0.5, 99.5))
    unit = (np.clip(pixels, low, high) - low) / (high - low)
    height, width = image.shape
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    resized = np.asarray(Image.fromarray(unit, mode="F").resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((size, size), np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


@pytest.mark.parametrize("size", [64, 224])
def test_fast_path_stays_close_to_the_full_resolution_definition(size):
    image = _radiograph()
    fast = prepare_square(image, PreprocessConfig(size=size))
    slow = _full_resolution_square(image, size)
    assert fast.shape == slow.shape == (size, size)
    assert fast.min() == 0.0 and fast.max() == pytest.approx(1.0)
    padding = (slow == 0).all(axis=0)  # the image is taller than wide: black columns either side
    assert padding.sum() >= 2 and (fast[:, padding] == 0).all() and (fast[:, ~padding] > 0).any(axis=0).all()
    assert np.abs(fast - slow).mean() < 0.02  # the clip window moves a little, the picture does not


def test_downscale_for_sending_keeps_dtype_and_what_the_server_computes():
    image = _radiograph()
    sent = downscale_for_sending(image, 224)
    assert sent.dtype == np.uint16 and max(sent.shape) == 224
    assert sent.shape[1] == round(1841 * 224 / 1955)
    config = PreprocessConfig(size=64)
    np.testing.assert_allclose(prepare_square(sent, config), prepare_square(image, config), atol=0.05)
    small = image[:200, :180]
    assert downscale_for_sending(small, 224) is small  # small enough already: sent as it is
    with pytest.raises(ValueError, match="send size must be >= 24"):
        downscale_for_sending(image, 8)


def test_clip_mode_scale_comes_from_the_full_image_not_the_resized_one():
    image = np.full((400, 400), 10, np.uint16)
    image[0, 0] = 300  # one pixel above 8-bit: the source is 16-bit, however the resize averages it away
    square = prepare_square(image, PreprocessConfig.clip(64))
    assert square.max() < 300 / 65535 + 1e-6 and square[32, 32] == pytest.approx(10 / 65535, rel=1e-3)


def test_preprocess_output_and_tta_views():
    image = (np.random.default_rng(0).random((120, 90)) * 4000).astype(np.uint16)
    config = PreprocessConfig(size=32)
    batch = preprocess(image, config, views=TTA_VIEWS)
    assert batch.shape == (len(TTA_VIEWS), 3, 32, 32) and batch.dtype == np.float32
    mean, std = np.array(config.mean)[:, None, None], np.array(config.std)[:, None, None]
    gray = batch[0] * std + mean
    np.testing.assert_allclose(gray[0], gray[1], atol=1e-6)  # grayscale replicated, then normalised per channel
    np.testing.assert_allclose(batch[1], batch[0][..., ::-1])  # hflip
    square = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    assert tta_view(square, "zoom0.9")[0].max() == 0  # zoom out pads with black
    with pytest.raises(ValueError, match="unknown TTA view"):
        tta_view(square, "vflip")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 5), np.uint16), "empty"),
        (np.zeros((4, 100), np.uint16), "too small"),
        (np.zeros((10, 10), np.int32), "dtype"),
        (np.zeros((10, 10, 3), np.uint16), "2-D"),
    ],
)
def test_bad_images_raise_image_error(image, message):
    with pytest.raises(ImageError, match=message):
        preprocess(image, PreprocessConfig(size=32))


def test_config_round_trips_through_triton_parameters():
    config = PreprocessConfig(size=512, clip_percentiles=(1.0, 99.0))
    assert PreprocessConfig.from_parameters(config.to_parameters()) == config


def test_projection_hints():
    assert [projection_from_hint(h) for h in ACCEPTED_HINTS] == ["frontal", "frontal", "lateral", "lateral", "lateral"]
    assert projection_from_hint(b" pa ") == "frontal" and projection_from_hint("") is None and projection_from_hint(None) is None
    with pytest.raises(ValueError, match="unknown projection hint"):
        projection_from_hint("LAO")


def test_zeroshot_scores_are_mean_cosines_and_negative_softmax():
    rng = np.random.default_rng(0)
    prompts = rng.standard_normal((6, 3, 8))
    prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
    image = rng.standard_normal(8)
    unit = image / np.linalg.norm(image)
    probabilities, similarities = ensemble.zeroshot_scores(image * 3.0, prompts.mean(axis=1), alpha=5.0)
    np.testing.assert_allclose(similarities, (prompts @ unit).mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-5.0 * similarities)), atol=1e-6)
    negative = -prompts.mean(axis=1)
    p_softmax, _ = ensemble.zeroshot_scores(image, prompts.mean(axis=1), negative, alpha=5.0)
    two_way = np.exp(5 * similarities) / (np.exp(5 * similarities) + np.exp(-5 * similarities))
    np.testing.assert_allclose(p_softmax, two_way, atol=1e-6)


def test_weights_parse_and_normalise():
    weights = ensemble.parse_weights("pcam=2,cait=1,swin=1")
    logits = {"pcam": np.full((2, 30), 1.0), "cait": np.full((2, 30), -1.0), "swin": np.zeros((2, 30))}
    assert ensemble.combine_member_logits(logits, weights)[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="non-negative"):
        ensemble.parse_weights("pcam=-1,cait=1,swin=1")
    with pytest.raises(ValueError, match="bad ensemble weight"):
        ensemble.parse_weights("pcam=heavy,cait=1,swin=1")
