"""Out-of-distribution image sets for measuring the gate (docs/gate.md), none of them made here
except the synthetic noise, constant and gradient images:

- `photographs`: scikit-image's bundled photographs and scans (camera, astronaut, coins, moon,
  page, text, ...), converted to 16-bit grey;
- `pydicom_non_chest`: the non-chest images of pydicom and pydicom-data (CT, MR, US, NM and the CR
  extremity RG3), one frame each, decoded without the DICOM tag rules (which refuse them all
  before the gate would see them; here the gate alone is measured);
- `synthetic`: uniform and Gaussian noise, gradients, and constant images (the server refuses a
  constant image before the gate: they are listed, not scored);
- `real_chest`: pydicom-data's real chest radiograph RG1 (PA CR), in its three encodings.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

UINT16_MAX = 65535
IMAGE_SUFFIXES = (".png", ".dcm", ".jpg", ".jpeg", ".tif", ".tiff", "")
PHOTOGRAPHS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
               "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
               "rocket", "text", "shepp_logan_phantom")
# One file per distinct image (pydicom-data holds several encodings of some).
PYDICOM_NON_CHEST = {
    "CT": ("693_UNCR.dcm", "CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm"),
    "MR": ("MR_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm"),
    "US": ("US1_UNCR.dcm", "OBXXXX1A.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "examples_rgb_color.dcm", "gdcm-US-ALOKA-16.dcm",
           "color-pl.dcm", "examples_palette.dcm"),
    "NM": ("JPEG2000_UNC.dcm",),
    "CR extremity": ("RG3_UNCR.dcm",),
}
REAL_CHEST = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Any 2-D or colour array -> full-scale UINT16 grey (min -> 0, max -> 65535)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, np.uint16)
    return np.round((image - low) / (high - low) * UINT16_MAX).astype(np.uint16)


def photographs(names: Sequence[str] = PHOTOGRAPHS) -> dict[str, np.ndarray]:
    """scikit-image's bundled images by name (those this installation has), as 16-bit grey."""
    import skimage.data

    images = {}
    for name in names:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - an image that needs a download is skipped
            continue
        images[name] = to_uint16(image)
    return images


def _dicom_frame(path) -> np.ndarray:
    """One grey frame of any DICOM image (the middle one of several), MONOCHROME2, 16-bit."""
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif samples == 3 and photometric.startswith("YBR"):
        pixels = convert_color_space(pixels, photometric, "RGB")
    image = to_uint16(pixels)
    return UINT16_MAX - image if photometric == "MONOCHROME1" else image


def pydicom_files(names: Sequence[str]) -> dict[str, np.ndarray]:
    """{file name: frame} of the named pydicom / pydicom-data files this machine has and can decode."""
    from cxrlt.io.samples import pydicom_data_file

    images = {}
    for name in names:
        try:
            images[name] = _dicom_frame(pydicom_data_file(name))
        except Exception:  # noqa: BLE001 - absent or undecodable here: left out (the count says so)
            continue
    return images


def pydicom_non_chest() -> dict[str, dict[str, np.ndarray]]:
    return {group: pydicom_files(names) for group, names in PYDICOM_NON_CHEST.items()}


def synthetic(seed: int = 0, count: int = 4, size: int = 256) -> dict[str, np.ndarray]:
    """Noise, gradient and constant images (seeded)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    images: dict[str, np.ndarray] = {}
    for i in range(count):
        images[f"uniform_noise_{i}"] = rng.integers(0, UINT16_MAX + 1, (size, size), dtype=np.uint16)
        images[f"gaussian_noise_{i}"] = to_uint16(rng.normal(0.5, 0.15 * (i + 1), (size, size)).clip(0, 1))
    images["gradient_horizontal"] = to_uint16(np.tile(ramp, (size, 1)))
    images["gradient_vertical"] = to_uint16(np.tile(ramp[:, None], (1, size)))
    images["gradient_diagonal"] = to_uint16(ramp[:, None] + ramp[None, :])
    images["gradient_radial"] = to_uint16(-np.hypot(*np.meshgrid(ramp - 0.5, ramp - 0.5)))
    for level in (0, 32768, UINT16_MAX):
        images[f"constant_{level}"] = np.full((size, size), level, np.uint16)
    return images


def auroc(in_scores: Sequence[float], out_scores: Sequence[float]) -> float:
    """P(an out-of-distribution image scores above an in-distribution one), ties counting half."""
    inside, outside = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if not len(inside) or not len(outside):
        return float("nan")
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + 0.5 * ties)


def score_images(score: Callable[[list[np.ndarray]], np.ndarray], images: dict[str, np.ndarray]) -> dict[str, float]:
    """{name: score} of the images the served checks accept (`score` raises ImageError on the others)."""
    from cxrlt.contract.preprocessing import ImageError

    scores = {}
    for name, image in images.items():
        try:
            scores[name] = float(score([image])[0])
        except ImageError:
            continue
    return scores


def reference_images(source: Path | str, split: str = "train") -> list[np.ndarray]:
    """The reference images `source` names: a folder (every image file below it, DICOM or Pillow-readable)
    or a CXR-LT label CSV (the images of its `split`, the split `cxrlt train` used)."""
    from cxrlt.io.images import InputError, load_pixels

    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        from training.job import load_split

        data = load_split(source)
        table = data.table.subset(data.train if split == "train" else data.val)
        return [load_pixels(data.image_root / path) for path in table.image_paths]
    if not source.is_dir():
        raise FileNotFoundError(f"--reference-images {source}: neither a folder of images nor a label CSV")
    images = []
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            images.append(load_pixels(path))
        except InputError as exc:
            log.warning("reference image skipped: %s", exc)
    return images


def measure_gate(repository: Path | str, in_distribution: Sequence[np.ndarray], real_chest: bool = True) -> dict:
    """The repository's gate on held-out in-distribution images against every set above: per set
    the count, its scores and AUROC (in = `in_distribution`), the share of in-distribution images
    refused, and (`real_chest`) the scores of the real chest radiograph. What docs/gate.md reports."""
    from cxrlt.contract.ood_gate import load_gate
    from exporters.ood_gate import Embedder

    from cxrlt.contract.releases import files_of

    gate = load_gate(files_of(repository))
    if gate is None:
        raise ValueError(f"{repository} has no fitted gate")
    embed = Embedder(repository)

    def score(images: list[np.ndarray]) -> np.ndarray:
        return gate.score(embed(images))

    embeddings, skipped = embed.embed_each(in_distribution)
    inside = gate.score(embeddings)
    sets = {"photographs (scikit-image)": photographs(),
            **{f"pydicom {group}": images for group, images in pydicom_non_chest().items()},
            "synthetic noise and gradients": synthetic()}
    result: dict = {"threshold": gate.threshold, "in_distribution": {
        "count": int(len(inside)), "skipped": skipped, "refused": float(np.mean(inside > gate.threshold)),
        "median": float(np.median(inside)), "max": float(inside.max())}, "sets": {}}
    everything: list[float] = []
    for name, images in sets.items():
        scores = score_images(score, images)
        everything.extend(scores.values())
        result["sets"][name] = {"count": len(scores), "not_scored": sorted(set(images) - set(scores)),
                                "auroc": auroc(inside, list(scores.values())),
                                "refused": float(np.mean([s > gate.threshold for s in scores.values()])) if scores else float("nan"),
                                "min": min(scores.values(), default=float("nan")), "scores": scores}
    result["all_out_of_distribution"] = {"count": len(everything), "auroc": auroc(inside, everything),
                                         "refused": float(np.mean(np.asarray(everything) > gate.threshold))}
    result["real_chest"] = score_images(score, pydicom_files(REAL_CHEST)) if real_chest else {}
    return result
