"""The one implementation of image preprocessing (numpy + Pillow, no torch).

Training, the exporters' parity checks, the Triton Python backends, the reference
pipeline and the client all call these functions, so serving cannot drift from
training. Parameters travel as a `PreprocessConfig`, which the repository builder
writes into each model's `config.pbtxt` and the backends read back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Test-time augmentation views, applied to the [0, 1] square image before normalisation
# so rotations and zoom-outs fill with black, exactly like the aspect-ratio padding.
TTA_VIEWS: tuple[str, ...] = ("identity", "hflip", "rot+5", "rot-5", "zoom1.1", "zoom0.9")

MIN_SIDE = 8  # smaller images carry no diagnostic content and break percentile clipping

# What the server (and a client that checks before sending) accepts as a radiograph. Training
# reads smaller synthetic images, so these apply to served images only (validate_served_image).
MIN_SERVED_SIDE = 24  # a chest radiograph is hundreds of pixels on a side; below 24 it is an icon, not an image
MAX_ASPECT_RATIO = 10.0  # long side / short side; detectors are at most about 2:1, a 10:1 strip is not a chest
MAX_PIXELS = 50_000_000  # ~7000 x 7000, beyond any chest radiograph detector: the default `max_pixels` of the
# served models, and the loaders' decompression-bomb guard (checked from the file's header before decoding)


class ImageError(ValueError):
    """The input image cannot be classified; the message says why."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of one preprocessing recipe.

    mode "percentile": Task 1 networks and router (percentile clip -> [0,1]).
    mode "max": CLIP (divide by the source's maximum, 255 or 65535).
    """

    size: int
    mode: str = "percentile"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "max"):
            raise ValueError(f"preprocessing mode must be 'percentile' or 'max', not {self.mode!r}")
        if self.size < MIN_SIDE:
            raise ValueError(f"preprocessing size must be >= {MIN_SIDE}, not {self.size}")

    @classmethod
    def clip(cls, size: int = 224) -> "PreprocessConfig":
        return cls(size=size, mode="max", mean=CLIP_MEAN, std=CLIP_STD)

    def to_parameters(self) -> dict[str, str]:
        """Flat string parameters for a Triton `config.pbtxt`."""
        return {
            "preprocess_size": str(self.size),
            "preprocess_mode": self.mode,
            "preprocess_clip_percentiles": json.dumps(list(self.clip_percentiles)),
            "preprocess_mean": json.dumps(list(self.mean)),
            "preprocess_std": json.dumps(list(self.std)),
        }

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "PreprocessConfig":
        try:
            return cls(
                size=int(params["preprocess_size"]),
                mode=params["preprocess_mode"],
                clip_percentiles=tuple(json.loads(params["preprocess_clip_percentiles"])),
                mean=tuple(json.loads(params["preprocess_mean"])),
                std=tuple(json.loads(params["preprocess_std"])),
            )
        except KeyError as exc:
            raise ValueError(
                f"model config lacks preprocessing parameter {exc.args[0]!r}; "
                "rebuild the repository with `cxrlt build-repo`"
            ) from None


def _check_array(image: np.ndarray) -> tuple[int, int]:
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"image dtype must be UINT16 (or uint8), got {image.dtype}")
    if image.ndim != 2:
        raise ImageError(f"image must be 2-D [height, width], got shape {list(image.shape)}")
    height, width = image.shape
    if height == 0 or width == 0:
        raise ImageError(f"image is empty (shape {list(image.shape)})")
    return height, width


def _check_pixel_limit(height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise ImageError(
            f"image of {height}x{width} = {height * width} pixels exceeds the limit of "
            f"{max_pixels} pixels; downsample it before sending"
        )


def validate_image(image: np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """Check a grayscale image that preprocessing can handle and return it, or raise ImageError.

    The floor for every use, training included; what is served is checked by the stricter
    :func:`validate_served_image`."""
    height, width = _check_array(image)
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageError(
            f"image of {height}x{width} pixels is too small; both sides must be >= {MIN_SIDE}"
        )
    _check_pixel_limit(height, width, max_pixels)
    return image


def validate_served_image(image: np.ndarray, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """The shape checks of every served image (cxr_classifier, cxr_zeroshot), in this order:
    dtype, rank, empty, `max_pixels`, aspect ratio (<= MAX_ASPECT_RATIO), both sides >=
    MIN_SERVED_SIDE. A client may call it before sending to get the server's own message.
    The content check (:func:`check_not_constant`) is separate: the server runs it after the
    projection hint is checked, so a bad hint is reported first."""
    height, width = _check_array(image)
    _check_pixel_limit(height, width, max_pixels)
    long_side, short_side = max(height, width), min(height, width)
    if long_side > MAX_ASPECT_RATIO * short_side:
        raise ImageError(
            f"image of {height}x{width} pixels has an aspect ratio of {long_side / short_side:.1f}:1, over the "
            f"limit of {MAX_ASPECT_RATIO:.0f}:1; it is a strip, not a chest radiograph: check the export (Rows/Columns) "
            "and send the whole image"
        )
    if short_side < MIN_SERVED_SIDE:
        raise ImageError(
            f"image of {height}x{width} pixels is too small; both sides must be >= {MIN_SERVED_SIDE} "
            "(a chest radiograph is hundreds of pixels on a side): send the full-resolution image, not a thumbnail"
        )
    return image


def check_not_constant(image: np.ndarray) -> np.ndarray:
    """Refuse an image whose pixels all have one value: it carries nothing to classify
    (a blank frame, a failed export), and every answer for it would be noise."""
    low, high = image.min(), image.max()
    if low == high:
        raise ImageError(
            f"constant image: all {image.shape[0]}x{image.shape[1]} pixels have the value {int(low)}, so there is "
            "nothing to classify (a blank or failed export?); check the source and send the real radiograph"
        )
    return image


# Downscaling first box-averages by the largest integer factor that keeps the image at least
# this many times the target size, then resamples bilinearly (Pillow's `reducing_gap`): the
# cost follows the target size instead of the detector's, at the quality of a full filter.
REDUCING_GAP = 2.0


def source_maximum(image: np.ndarray) -> float:
    """The full-scale value "max" mode divides by: 255 for 8-bit data (also 8-bit values sent
    as UINT16, as the served contract asks), else 65535."""
    return 255.0 if image.dtype == np.uint8 or int(image.max()) <= 255 else 65535.0


def scale_to_unit(pixels: np.ndarray, config: PreprocessConfig, source_max: float | None = None) -> np.ndarray:
    """Map pixel values to float32 in [0, 1] as the recipe says: percentile clipping over
    these pixels, or division by `source_max` (by default :func:`source_maximum` of them)."""
    if config.mode == "max":
        maximum = source_max if source_max is not None else source_maximum(pixels)
        return np.asarray(pixels, dtype=np.float32) / np.float32(maximum)
    pixels = np.asarray(pixels, dtype=np.float32)
    low, high = np.percentile(pixels, config.clip_percentiles)
    if high <= low:  # a flat image: nothing to stretch
        return np.zeros_like(pixels)
    return (np.clip(pixels, low, high) - low) / (high - low)


def _float_image(gray: np.ndarray) -> Image.Image:
    if gray.dtype == np.float32:
        return Image.fromarray(gray, mode="F")
    # uint16 and uint8 wrap without a copy (modes I;16 and L); Pillow converts to float32 in C.
    return Image.fromarray(np.ascontiguousarray(gray)).convert("F")


def _resize(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a grayscale array to float32 [height, width]."""
    resized = _float_image(gray).resize((width, height), Image.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.asarray(resized, dtype=np.float32)


def fit_long_side(gray: np.ndarray, long_side: int) -> np.ndarray:
    """Resize to float32 keeping the aspect ratio so the long side is `long_side`."""
    height, width = gray.shape
    scale = long_side / max(height, width)
    new_h, new_w = max(1, min(long_side, round(height * scale))), max(1, min(long_side, round(width * scale)))
    return _resize(gray, new_w, new_h)


def _pad_center(gray: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    height, width = gray.shape
    top, left = (size - height) // 2, (size - width) // 2
    out[top : top + height, left : left + width] = gray
    return out


def downscale_for_sending(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image at most `max_side` pixels on its long side, in its own integer dtype.

    What a remote client sends instead of the full detector matrix: the same resampling the
    server applies first, so the server's percentiles and resize see nearly the same pixels.
    An image already small enough is returned unchanged.
    """
    _check_array(image)
    if max_side < MIN_SERVED_SIDE:
        raise ValueError(f"send size must be >= {MIN_SERVED_SIDE} pixels, not {max_side}")
    if max(image.shape) <= max_side:
        return image
    resized = fit_long_side(image, max_side)
    limit = np.iinfo(image.dtype).max
    return np.clip(np.rint(resized), 0, limit).astype(image.dtype)


def tta_view(square: np.ndarray, view: str) -> np.ndarray:
    """One test-time augmentation view of a [S, S] image in [0, 1]."""
    size = square.shape[0]
    if view == "identity":
        return square
    if view == "hflip":
        return np.ascontiguousarray(square[:, ::-1])
    if view in ("rot+5", "rot-5"):
        angle = 5.0 if view == "rot+5" else -5.0
        rotated = Image.fromarray(square, mode="F").rotate(angle, resample=Image.BILINEAR, fillcolor=0.0)
        return np.asarray(rotated, dtype=np.float32)
    if view in ("zoom1.1", "zoom0.9"):
        factor = 1.1 if view == "zoom1.1" else 0.9
        zoomed_side = round(size * factor)
        zoomed = _resize(square, zoomed_side, zoomed_side)
        if zoomed_side >= size:
            start = (zoomed_side - size) // 2
            return np.ascontiguousarray(zoomed[start : start + size, start : start + size])
        return _pad_center(zoomed, size)
    raise ValueError(f"unknown TTA view {view!r}; choose from {', '.join(TTA_VIEWS)}")


def parse_tta_views(spec: str | Iterable[str]) -> tuple[str, ...]:
    """'identity,hflip' -> ('identity', 'hflip'), validated."""
    views = tuple(v.strip() for v in (spec.split(",") if isinstance(spec, str) else spec) if v.strip())
    if not views:
        raise ValueError("at least one TTA view is needed (e.g. 'identity')")
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise ValueError(f"unknown TTA view(s) {unknown}; choose from {', '.join(TTA_VIEWS)}")
    return views


def normalize(squares: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """[N, S, S] in [0, 1] -> [N, 3, S, S] float32, replicated and mean/std normalised."""
    mean = np.asarray(config.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((squares[:, None, :, :] - mean) / std).astype(np.float32)


def prepare_square(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Raw grayscale image -> [S, S] float32 in [0, 1] (before TTA and normalisation).

    The image is resized to fit S first and scaled to [0, 1] after, so the percentiles are
    taken over the S-sized image: a few thousand pixels instead of millions (the clip window
    of a box-averaged radiograph, which differs from the full matrix's by a fraction of a
    percent of the range).
    """
    validate_image(image)
    resized = fit_long_side(image, config.size)
    source_max = source_maximum(image) if config.mode == "max" else None
    return _pad_center(scale_to_unit(resized, config, source_max), config.size)


def preprocess(
    image: np.ndarray, config: PreprocessConfig, views: Sequence[str] = ("identity",)
) -> np.ndarray:
    """Raw grayscale image -> network input [len(views), 3, S, S]."""
    square = prepare_square(image, config)
    return normalize(np.stack([tta_view(square, v) for v in views]), config)
