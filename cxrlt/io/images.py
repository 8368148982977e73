"""Read PACS images (DICOM, or PNG/JPEG exports) into what the server expects.

The server's ``IMAGE`` input is a UINT16 [H, W] array with MONOCHROME2 meaning (higher =
brighter). :func:`load_image` always returns exactly that, **full-scale 16-bit**: whatever
the source's bit depth, the darkest value the source's display pipeline can produce maps
to 0 and the brightest to 65535. 8-bit sources become ``x * 257``.

For DICOM the display pipeline is applied with pydicom's own helpers, in the order the
standard gives (PS3.4 N.2): stored values -> Modality LUT / rescale -> VOI LUT or the first
window -> MONOCHROME1 / Presentation LUT Shape INVERSE inversion. The projection hint comes
from ViewPosition, or from ViewCodeSequence when ViewPosition is missing or not usable.

Anything the models cannot use (not an image, no pixel data, CT/MR/US, multi-frame,
colour, truncated pixel data) raises :class:`InputError` naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sr.codedict import codes

from cxrlt.contract.labels import projection_from_hint

__all__ = ["InputError", "LoadedImage", "load_image", "load_pixels", "hint_from_dataset", "dicom_to_uint16"]

UINT16_MAX = 65535

ACCEPTED_MODALITIES = ("CR", "DX")
# Secondary Capture: exported/scanned films arrive with Modality OT (or anything else), so
# these are accepted by SOP class regardless of Modality. The multi-frame grayscale SC
# classes are accepted too, as long as they hold a single frame.
SECONDARY_CAPTURE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
)
# CR and DX SOP classes, for files that omit Modality (Type 1, but PACS exports vary).
_RADIOGRAPHY_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
)

# ViewCodeSequence (CID 4010 "DX View") -> ViewPosition term. Current SNOMED CT codes come
# from pydicom's code dictionary; the legacy SNOMED RT (SRT) codes are what older
# modalities still send.
_VIEW_CODES: dict[str, str] = {
    codes.SCT.PosteroAnterior.value: "PA",  # 272479007
    "R-10214": "PA",
    codes.SCT.AnteroPosterior.value: "AP",  # 399348003
    "R-10206": "AP",
    codes.SCT.RightLateral.value: "RL",  # 399198007
    "R-10232": "RL",
    codes.SCT.LeftLateral.value: "LL",  # 399173006
    "R-10236": "LL",
    codes.SCT.LateralProjection.value: "LATERAL",  # 399067008
    "R-102CD": "LATERAL",
}
# CodeMeaning text, normalised (lower case, no spaces/hyphens), for codes we do not know.
_VIEW_MEANINGS: dict[str, str] = {
    "posteroanterior": "PA",
    "pa": "PA",
    "anteroposterior": "AP",
    "ap": "AP",
    "rightlateral": "RL",
    "leftlateral": "LL",
    "lateral": "LATERAL",
}


class InputError(ValueError):
    """An input file the service cannot classify; the message says which file and why."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedImage:
    """One image ready for ``cxr_findings``.

    pixels: np.uint16 [H, W], full-scale 16-bit MONOCHROME2.
    hint: a ViewPosition term ('PA', 'AP', 'LL', 'RL', 'LATERAL') or None.
    image_id: SOPInstanceUID for DICOM, the file stem otherwise.
    dataset: the pydicom Dataset (needed to build a DICOM SR), None for PNG/JPEG.
    """

    pixels: np.ndarray
    hint: str | None
    image_id: str
    dataset: Dataset | None
    source: Path


def load_image(path: str | Path) -> LoadedImage:
    """Load a DICOM, PNG or other Pillow-readable image as full-scale UINT16 MONOCHROME2.

    The format is decided by content, not by extension: a DICOM file (with the 'DICM'
    preamble, or a bare dataset that pydicom can parse) or anything Pillow can open.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path")
    with path.open("rb") as handle:
        head = handle.read(132)
    if head[128:132] == b"DICM":
        return _load_dicom(path)
    pil_image = _try_pillow(path)
    if pil_image is not None:
        return _load_pillow(path, pil_image)
    # Some PACS exports are bare datasets without the 128-byte preamble.
    ds = _try_bare_dicom(path)
    if ds is not None:
        return _load_dicom(path, ds)
    raise InputError(
        f"{path}: not a DICOM file and not an image Pillow can read; "
        "send a DICOM (CR, DX or Secondary Capture) or a grayscale PNG"
    )


def load_pixels(path: str | Path) -> np.ndarray:
    """Just the pixels of :func:`load_image` (UINT16 [H, W] MONOCHROME2): what a client sends,
    and so what training and evaluation read."""
    return load_image(path).pixels


# ----------------------------------------------------------------------------- DICOM


def _load_dicom(path: Path, ds: Dataset | None = None) -> LoadedImage:
    if ds is None:
        ds = _read_dicom(path)
    _check_usable(path, ds)
    stored = _decode_pixels(path, ds)
    pixels = dicom_to_uint16(stored, ds, path)
    image_id = str(ds.get("SOPInstanceUID", "") or path.stem)
    return LoadedImage(pixels=pixels, hint=hint_from_dataset(ds), image_id=image_id, dataset=ds, source=path)


def _read_dicom(path: Path) -> Dataset:
    # pydicom only *warns* when a file ends early (and then drops the unfinished element,
    # e.g. encapsulated PixelData); record that so the error can say "truncated".
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as exc:
            raise InputError(f"{path}: not a valid DICOM file ({exc})") from exc
        except Exception as exc:  # pydicom raises many types on damaged files
            raise InputError(
                f"{path}: the DICOM file could not be parsed, it may be truncated or corrupt "
                f"({type(exc).__name__}: {exc}); re-export it from the PACS"
            ) from exc
    if "PixelData" not in ds and any("End of file" in str(w.message) for w in caught):
        raise InputError(
            f"{path}: the DICOM file is truncated (it ends inside the pixel data); "
            "re-export or re-transfer it from the PACS"
        )
    return ds


def _try_bare_dicom(path: Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            return None
    # force=True happily "parses" arbitrary bytes; demand the elements of a real image.
    if "SOPClassUID" in ds and "Rows" in ds:
        return ds
    return None


def _check_usable(path: Path, ds: Dataset) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "").upper()
    is_sc = sop_class in SECONDARY_CAPTURE_SOP_CLASSES
    if not is_sc and modality not in ACCEPTED_MODALITIES:
        if modality or sop_class not in _RADIOGRAPHY_SOP_CLASSES:
            raise InputError(
                f"{path}: modality {modality or 'unknown'!s} (SOP class {sop_class or 'unknown'}) "
                "is not a chest radiograph; only CR, DX and Secondary Capture images are accepted"
            )
    if "PixelData" not in ds:
        raise InputError(
            f"{path}: the DICOM object has no pixel data (it may be a report, presentation "
            "state or key-object note); send the image instance itself"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(
            f"{path}: multi-frame image ({frames} frames); send one radiograph per file"
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples == 1 and not photometric:
        raise InputError(
            f"{path}: the header has no PhotometricInterpretation, so black and white are "
            "unknown; fix the header (MONOCHROME1 or MONOCHROME2) or re-export the image"
        )
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{path}: colour image (PhotometricInterpretation {photometric or 'missing'}, "
            f"{samples} samples per pixel); send the original grayscale radiograph"
        )


def _decode_pixels(path: Path, ds: Dataset) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Decoders warn about benign header/codestream mismatches; errors still raise.
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        raise InputError(
            f"{path}: the pixel data is truncated or cannot be decoded ({name}; "
            f"{type(exc).__name__}: {exc}); re-export it uncompressed, or check that "
            "pylibjpeg and its plugins are installed for compressed images"
        ) from exc
    if stored.ndim != 2:
        raise InputError(f"{path}: expected one grayscale frame, got pixel array of shape {stored.shape}")
    return stored


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16))
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _display_transform(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT/rescale then VOI LUT/first window, with pydicom's helpers."""
    out = apply_modality_lut(values, ds)
    if ds.get("VOILUTSequence") and not np.issubdtype(out.dtype, np.integer):
        # A VOI LUT is indexed by integers; round rather than let it truncate a float.
        out = np.rint(out).astype(np.int64)
    return apply_voi_lut(out, ds, index=0)


def dicom_to_uint16(stored: np.ndarray, ds: Dataset, path: str | Path = "<dataset>") -> np.ndarray:
    """Apply the DICOM grayscale pipeline to stored values; return full-scale uint16 MONOCHROME2.

    The output range used for the final linear map is the range of the transform itself,
    found by pushing every possible stored value (BitsStored/PixelRepresentation) through
    the same modality + VOI steps. It is deliberately NOT the image's own min/max: the
    brightness of an image must not depend on its content, and the networks were trained
    on images whose black and white points come from the acquisition, not from
    per-image stretching. For a MONOCHROME2 image without VOI this is the stored-bit range
    after the modality LUT; with a window it is pydicom's window output range.
    """
    lo_stored, hi_stored = _stored_range(ds)
    values = stored.astype(np.int64, copy=False)
    if lo_stored == 0:
        # Unsigned: bits above BitsStored may carry overlays or garbage; drop them.
        values = np.bitwise_and(values, hi_stored)
    values = np.clip(values, lo_stored, hi_stored)

    if hi_stored - lo_stored < 2**17:
        probe = np.arange(lo_stored, hi_stored + 1, dtype=np.int64)
    else:  # > 17 stored bits (not seen in radiography): assume a monotone transform
        probe = np.array([lo_stored, hi_stored], dtype=np.int64)
    try:
        probe_out = np.asarray(_display_transform(probe, ds), dtype=np.float64)
        image = np.asarray(_display_transform(values, ds), dtype=np.float64)
    except Exception as exc:  # malformed LUT descriptor, window width 0, unknown VOI function
        raise InputError(
            f"{path}: the modality/VOI LUT in the header cannot be applied ({exc}); "
            "fix the header or re-export the image"
        ) from exc
    lo, hi = float(probe_out.min()), float(probe_out.max())
    if not hi > lo:
        raise InputError(
            f"{path}: the header's LUT/window maps every pixel to one value; the image is blank"
        )

    # MONOCHROME1 (and Presentation LUT Shape INVERSE) mean "higher = darker". Invert after
    # VOI and within the transform's own range; pydicom's apply_presentation_lut inverts
    # around the image's maximum, which would make brightness depend on content again.
    inverse = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        # PS3.3 C.11.6: INVERSE on a MONOCHROME1 image yields MONOCHROME2-like output.
        inverse = not inverse
    if inverse:
        image = (lo + hi) - image

    scaled = (image - lo) * (UINT16_MAX / (hi - lo))
    return np.clip(np.rint(scaled), 0, UINT16_MAX).astype(np.uint16)


def hint_from_dataset(ds: Dataset) -> str | None:
    """ViewPosition term for the image, or None; never raises on odd header values."""
    view_position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view_position:
        try:
            if projection_from_hint(view_position) is not None:
                return view_position
        except ValueError:
            pass  # e.g. 'LLO', 'OBLIQUE': fall back to the coded view
    for item in ds.get("ViewCodeSequence", None) or []:
        code = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        if code.upper() in _VIEW_CODES:
            return _VIEW_CODES[code.upper()]
        meaning = str(item.get("CodeMeaning", "") or "")
        key = "".join(ch for ch in meaning.lower() if ch.isalnum())
        if key in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[key]
    return None


# ----------------------------------------------------------------------------- Pillow


def _try_pillow(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return image


def _load_pillow(path: Path, image) -> LoadedImage:
    from PIL import ImageOps

    if getattr(image, "n_frames", 1) > 1:
        raise InputError(f"{path}: multi-frame image ({image.n_frames} frames); send one radiograph per file")
    image = ImageOps.exif_transpose(image)  # phone/camera JPEGs carry their rotation in EXIF
    mode = image.mode
    if mode.startswith("I;16"):
        pixels = np.array(image, dtype=np.uint16)
    elif mode == "I":
        # Pillow opens 16-bit grayscale PNGs as 32-bit "I"; the values are still 0..65535.
        raw = np.array(image)
        if raw.min() < 0 or raw.max() > UINT16_MAX:
            raise InputError(f"{path}: 32-bit integer image with values outside 0..65535; save it as 16-bit grayscale")
        pixels = raw.astype(np.uint16)
    elif mode == "F":
        raise InputError(f"{path}: floating-point image; save it as 8- or 16-bit grayscale")
    else:
        # L, 1, P, RGB, RGBA, LA, CMYK, YCbCr ... -> 8-bit luminance, then 0..255 -> 0..65535.
        eight_bit = np.array(image if mode == "L" else image.convert("L"), dtype=np.uint16)
        pixels = eight_bit * 257
    if pixels.ndim != 2:
        raise InputError(f"{path}: expected a 2-D grayscale image, got shape {pixels.shape}")
    return LoadedImage(pixels=pixels, hint=None, image_id=path.stem, dataset=None, source=path)
