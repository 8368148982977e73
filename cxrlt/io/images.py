"""Read PACS images (DICOM, or PNG/JPEG exports) into what the server expects.

The server's ``IMAGE`` input is a UINT16 [H, W] array with MONOCHROME2 meaning (higher =
brighter). :func:`load_image` always returns exactly that, **full-scale 16-bit**: whatever
the source's bit depth, the darkest value the source's display pipeline can produce maps
to 0 and the brightest to 65535. 8-bit sources become ``x * 257``.

For DICOM the display pipeline is applied with pydicom's own helpers, in the order the
standard gives (PS3.4 N.2): stored values -> Modality LUT / rescale -> VOI LUT or the first
window -> MONOCHROME1 / Presentation LUT Shape INVERSE inversion. The projection hint comes
from ViewPosition, or from ViewCodeSequence when ViewPosition is missing or not usable.

Anything the models cannot use raises :class:`InputError` naming the file and what to do:
an empty file, not an image, no pixel data, CT/MR/US, multi-frame, colour (in every format:
an RGB image is accepted only when its three channels are equal, a grey image saved as RGB),
1-bit or floating-point pixels, pixel data that is truncated or disagrees with Rows/Columns,
a transfer syntax no installed decoder handles, and more than MAX_PIXELS pixels: that limit
is checked from the header (DICOM Rows x Columns, the PNG/JPEG size) *before* anything is
decoded, so a file claiming 60000 x 60000 pixels is refused without allocating them.

What the server refuses for the image's shape or content (smaller than 24 px, an aspect ratio
over 10:1, a constant image) is checked by :func:`cxrlt.contract.preprocessing.validate_served_image`
and ``check_not_constant`` on the server, not here: training reads small synthetic images
through this loader too. An unusable ViewPosition (unknown term, non-ASCII or over-long
text) is logged as a warning and ignored: the image is classified without that hint.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.sr.codedict import codes

from cxrlt.contract.acceptance import (ACCEPTED_MODALITIES, SECONDARY_CAPTURE_SOP_CLASSES,  # noqa: F401 (re-exported)
                                       body_part_problem, modality_problem)
from cxrlt.contract.labels import ACCEPTED_HINTS, projection_from_hint
from cxrlt.contract.preprocessing import MAX_PIXELS

__all__ = ["InputError", "LoadedImage", "load_image", "load_pixels", "hint_from_dataset", "dicom_to_uint16", "header_only"]

log = logging.getLogger(__name__)

UINT16_MAX = 65535
# The 3-sample photometric interpretations; such an image is accepted only when it is grey in fact.
_RGB_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# An RGB image counts as grey when at most 1 % of its pixels have channels more than 8/255 of
# full scale apart (lossy JPEG and YBR round trips move equal channels by a step or two).
COLOUR_TOLERANCE = 8 / 255
COLOUR_FRACTION = 0.01
_OVER_LIMIT = (f"over the limit of {MAX_PIXELS} pixels (decompression-bomb guard, checked before decoding); "
               "downsample the image before sending")
_ONE_BIT = ("1-bit (black and white) image: it has no grey levels, so it is a mask or a scanned document, not a radiograph; "
            "send the original grayscale image")

# ViewCodeSequence (CID 4010 "DX View") -> ViewPosition term, one line per view: the current
# SNOMED CT code from pydicom's code dictionary, then the legacy SNOMED RT (SRT) code that older
# modalities still send.
_VIEW_CODES: dict[str, str] = {
    codes.SCT.PosteroAnterior.value: "PA", "R-10214": "PA",  # 272479007
    codes.SCT.AnteroPosterior.value: "AP", "R-10206": "AP",  # 399348003
    codes.SCT.RightLateral.value: "RL", "R-10232": "RL",  # 399198007
    codes.SCT.LeftLateral.value: "LL", "R-10236": "LL",  # 399173006
    codes.SCT.LateralProjection.value: "LATERAL", "R-102CD": "LATERAL",  # 399067008
}
# CodeMeaning text, normalised (lower case, no spaces/hyphens), for codes we do not know.
_VIEW_MEANINGS: dict[str, str] = {"posteroanterior": "PA", "pa": "PA", "anteroposterior": "AP", "ap": "AP",
                                  "rightlateral": "RL", "leftlateral": "LL", "lateral": "LATERAL"}


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


def load_image(source: str | Path | bytes | Dataset, name: str | Path | None = None,
               body_parts: Sequence[str] | None = None) -> LoadedImage:
    """Load a DICOM, PNG or other Pillow-readable image as full-scale UINT16 MONOCHROME2.

    ``source``: a file's path, its content (bytes, e.g. a C-STORE or WADO-RS payload) or a
    pydicom Dataset (with its pixel data). ``name`` names a source that is not a path in
    messages and in ``LoadedImage.source`` (default: ``<bytes>``, or the dataset's
    SOPInstanceUID). The format is decided by content, not by extension: a DICOM file (with
    the 'DICM' preamble, or a bare dataset that pydicom can parse) or anything Pillow can open.
    A DICOM is checked against the one rule set of cxrlt.contract.acceptance (modality, SOP class,
    body part) from the header before anything is decoded. ``body_parts`` replaces the accepted
    BodyPartExamined terms (default: CHEST_BODY_PARTS; an empty BodyPartExamined passes).
    """
    if isinstance(source, Dataset):
        return _load_dicom(Path(str(name or source.get("SOPInstanceUID", "") or "<dataset>")), source, body_parts)
    if isinstance(source, (bytes, bytearray, memoryview)):
        content = bytes(source)
        return _load_content(Path(str(name or "<bytes>")), content[:132], lambda: io.BytesIO(content), body_parts)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path")
    with path.open("rb") as handle:
        head = handle.read(132)
    return _load_content(path, head, lambda: path, body_parts)


def _load_content(path: Path, head: bytes, open_file: Callable[[], Any], body_parts: Sequence[str] | None) -> LoadedImage:
    """load_image of a file or bytes; ``path`` names it, ``open_file()`` gives what pydicom/Pillow read."""
    if not head:
        raise InputError(f"{path}: empty file (0 bytes); the export or transfer failed: send it again")
    if head[128:132] == b"DICM":
        return _load_dicom(path, _read_dicom(path, open_file()), body_parts)
    pil_image, pil_error = _try_pillow(path, open_file())
    if pil_image is not None:
        return _load_pillow(path, pil_image)
    # Some PACS exports are bare datasets without the 128-byte preamble.
    ds = _try_bare_dicom(open_file())
    if ds is not None:
        return _load_dicom(path, ds, body_parts)
    if pil_error is not None:
        raise pil_error
    raise InputError(f"{path}: not a DICOM file and not an image Pillow can read; "
                     "send a DICOM (CR, DX or Secondary Capture) or a grayscale PNG")


def header_only(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data (what a report about the image needs to reference it)."""
    header = Dataset()
    for element in ds:
        if element.tag.group != 0x7FE0:
            header.add(copy.deepcopy(element))
    if getattr(ds, "file_meta", None) is not None:
        header.file_meta = copy.deepcopy(ds.file_meta)
    return header


def load_pixels(path: str | Path) -> np.ndarray:
    """Just the pixels of :func:`load_image` (UINT16 [H, W] MONOCHROME2): what a client sends,
    and so what training and evaluation read."""
    return load_image(path).pixels


# ----------------------------------------------------------------------------- DICOM


def _load_dicom(path: Path, ds: Dataset, body_parts: Sequence[str] | None = None) -> LoadedImage:
    try:
        body_part = str(ds.get("BodyPartExamined", "") or "")
    except Exception:  # undecodable bytes: no claim either way
        body_part = ""
    problem = body_part_problem(body_part, body_parts)
    if problem:
        raise InputError(f"{path}: {problem}")
    _check_usable(path, ds)
    pixels = dicom_to_uint16(_decode_pixels(path, ds), ds, path)
    image_id = str(ds.get("SOPInstanceUID", "") or path.stem)
    return LoadedImage(pixels=pixels, hint=hint_from_dataset(ds, path), image_id=image_id, dataset=ds, source=path)


def _read_dicom(path: Path, file: Any) -> Dataset:
    # pydicom only *warns* when a file ends early (and then drops the unfinished element,
    # e.g. encapsulated PixelData); record that so the error can say "truncated".
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(file)
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


def _try_bare_dicom(file: Any) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(file, force=True)
        except Exception:
            return None
    # force=True happily "parses" arbitrary bytes; demand the elements of a real image.
    return ds if "SOPClassUID" in ds and "Rows" in ds else None


def _check_usable(path: Path, ds: Dataset) -> None:
    """Every refusal the header alone decides, before any pixel is decoded."""
    problem = modality_problem(str(ds.get("Modality", "") or ""), str(ds.get("SOPClassUID", "")))
    if problem:
        raise InputError(f"{path}: {problem}")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError(
                f"{path}: floating-point pixel data (Float/DoubleFloatPixelData, a parametric map); a radiograph "
                "stores integer pixels: send the original CR/DX image"
            )
        raise InputError(
            f"{path}: the DICOM object has no pixel data (it may be a report, presentation "
            "state or key-object note); send the image instance itself"
        )
    frames = _int(ds, "NumberOfFrames", 1)
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or columns <= 0:
        raise InputError(f"{path}: the header gives no image size (Rows {rows}, Columns {columns}); fix the header or re-export")
    if rows * columns * max(frames, 1) > MAX_PIXELS:
        raise InputError(f"{path}: the header claims {rows}x{columns}{f' x {frames} frames' if frames > 1 else ''} = "
                         f"{rows * columns * max(frames, 1)} pixels, {_OVER_LIMIT}")
    if frames > 1:
        raise InputError(f"{path}: multi-frame image ({frames} frames); send one radiograph per file")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples == 1 and not photometric:
        raise InputError(
            f"{path}: the header has no PhotometricInterpretation, so black and white are "
            "unknown; fix the header (MONOCHROME1 or MONOCHROME2) or re-export the image"
        )
    grey_or_rgb = ((samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"))
                   or (samples == 3 and photometric in _RGB_PHOTOMETRICS))
    if not grey_or_rgb:  # PALETTE COLOR and the like: colour by definition
        raise InputError(_colour_message(path, f"PhotometricInterpretation {photometric or 'missing'}, "
                                               f"{samples} sample{'s' if samples != 1 else ''} per pixel"))
    if _int(ds, "BitsAllocated", 16) == 1:
        raise InputError(f"{path}: {_ONE_BIT}")
    syntax = _syntax(ds)
    if syntax is not None and syntax.is_encapsulated:
        _check_decoder(path, syntax)
    else:
        _check_pixel_data_length(path, ds, rows, columns, samples, photometric)


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def _colour_message(path: Path, detail: str) -> str:
    return (
        f"{path}: colour image ({detail}); a chest radiograph is grayscale: send the original "
        "grayscale image (a DICOM CR/DX, or a grayscale PNG)"
    )


def _syntax(ds: Dataset):
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _check_pixel_data_length(path: Path, ds: Dataset, rows: int, columns: int, samples: int, photometric: str) -> None:
    """Native (uncompressed) pixel data must hold what Rows x Columns x bits say, no less, no more."""
    bits = _int(ds, "BitsAllocated", 16)
    if photometric == "YBR_FULL_422":
        samples = 2  # chroma subsampled 2:1 horizontally: 2 values per pixel on average
    expected = rows * columns * samples * bits // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise InputError(
            f"{path}: the pixel data is truncated, or Rows x Columns are wrong: it holds {actual} bytes but "
            f"Rows x Columns ({rows} x {columns}, {bits}-bit, {samples} sample(s)) need {expected}; "
            "re-export or re-transfer it from the PACS"
        )
    if actual > expected + 1:  # one byte of padding to an even length is allowed
        raise InputError(
            f"{path}: the header disagrees with the pixel data: Rows x Columns ({rows} x {columns}, {bits}-bit, "
            f"{samples} sample(s)) need {expected} bytes but the pixel data holds {actual}; fix Rows/Columns "
            "or re-export the image"
        )


def _check_decoder(path: Path, syntax: pydicom.uid.UID) -> None:
    """A compressed transfer syntax needs a decoder installed here: say which, before decoding."""
    try:
        decoder = get_decoder(syntax)
        available = decoder.is_available
        missing = "; ".join(decoder.missing_dependencies)
    except NotImplementedError:
        available, missing = False, "pydicom has no decoder for it at all"
    if not available:
        raise InputError(
            f"{path}: the pixel data cannot be decoded here: no installed decoder handles transfer syntax "
            f"{syntax.name} ({syntax}) ({missing or 'no plugin'}); install one of those, or re-export the image "
            "uncompressed (Explicit VR Little Endian) or as JPEG 2000"
        )


def _decode_pixels(path: Path, ds: Dataset) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Decoders warn about benign header/codestream mismatches; errors still raise.
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except Exception as exc:
        name = getattr(_syntax(ds), "name", None) or "unknown transfer syntax"
        raise InputError(
            f"{path}: the pixel data is truncated or cannot be decoded ({name}; "
            f"{type(exc).__name__}: {exc}); re-export it uncompressed, or check that "
            "pylibjpeg and its plugins are installed for compressed images"
        ) from exc
    if stored.ndim == 3 and stored.shape[-1] == 3:  # RGB / YBR (pydicom converts YBR to RGB)
        bits = _int(ds, "BitsStored", 0) or _int(ds, "BitsAllocated", 8)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        _check_grey(path, stored, 2**bits - 1, f"PhotometricInterpretation {photometric}, 3 samples per pixel")
        stored = np.ascontiguousarray(stored[..., 0])
    if stored.ndim != 2:
        raise InputError(f"{path}: expected one grayscale frame, got pixel array of shape {stored.shape}")
    return stored


def _check_grey(path: Path, rgb: np.ndarray, full_scale: float, what: str) -> None:
    """Refuse an [H, W, 3] image whose channels differ (see COLOUR_TOLERANCE)."""
    channels = rgb.astype(np.int64, copy=False)
    spread = channels.max(axis=-1) - channels.min(axis=-1)
    coloured = float(np.mean(spread > COLOUR_TOLERANCE * full_scale))
    if coloured > COLOUR_FRACTION:
        raise InputError(_colour_message(
            path, f"{what}: its red, green and blue channels differ in {coloured:.0%} of the pixels"))


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
        raise InputError(f"{path}: the header's LUT/window maps every pixel to one value; the image is blank")

    # MONOCHROME1 (and Presentation LUT Shape INVERSE) mean "higher = darker". Invert after
    # VOI and within the transform's own range; pydicom's apply_presentation_lut inverts
    # around the image's maximum, which would make brightness depend on content again.
    # PS3.3 C.11.6: INVERSE on a MONOCHROME1 image yields MONOCHROME2-like output (the two cancel).
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if monochrome1 != (str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"):
        image = (lo + hi) - image

    scaled = (image - lo) * (UINT16_MAX / (hi - lo))
    return np.clip(np.rint(scaled), 0, UINT16_MAX).astype(np.uint16)


def hint_from_dataset(ds: Dataset, source: str | Path = "<dataset>") -> str | None:
    """ViewPosition term for the image, or None; never raises on odd header values.

    A ViewPosition that is not a projection term (an unknown or odd term, non-ASCII or
    over-long text) gives no hint: it is logged as a warning and ignored, and
    ViewCodeSequence is tried; the image is classified either way."""
    try:
        view_position = str(ds.get("ViewPosition", "") or "").strip().upper()
    except Exception:  # undecodable bytes in the element
        view_position = "<undecodable>"
    if view_position:
        usable = view_position.isascii() and len(view_position) <= 16
        try:
            if usable and projection_from_hint(view_position) is not None:
                return view_position
        except ValueError:
            pass  # e.g. 'LLO', 'OBLIQUE': fall back to the coded view
        shown = view_position if len(view_position) <= 40 else view_position[:40] + "..."
        log.warning(
            "%s: ViewPosition %r is not a projection term (%s)%s; it is ignored, the image is classified "
            "without that hint (ViewCodeSequence is used when present)",
            source, shown, ", ".join(ACCEPTED_HINTS),
            "" if usable else f" ({'non-ASCII' if not view_position.isascii() else 'over 16 characters'})",
        )
    for item in ds.get("ViewCodeSequence", None) or []:
        code = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip().upper()
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        meaning = "".join(ch for ch in str(item.get("CodeMeaning", "") or "").lower() if ch.isalnum())
        if meaning in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[meaning]
    return None


# ----------------------------------------------------------------------------- Pillow


def _try_pillow(path: Path, file: Any):
    """(image, None) when Pillow reads the file; (None, InputError) when Pillow knows the format
    but cannot decode it (raised only if the file is not a bare DICOM either); (None, None)
    when it is not an image Pillow knows. The pixel count is checked from the header, before
    decoding; a decompression bomb is refused at once."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(file)
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f"{match.group(1)} pixels" if match else "more pixels than Pillow allows"
        raise InputError(f"{path}: the image header claims {claimed}, {_OVER_LIMIT}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise InputError(f"{path}: the {image.format or 'image'} header claims {height}x{width} = {width * height} "
                         f"pixels, {_OVER_LIMIT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # truncated or corrupt data behind a valid header
        image.close()
        return None, InputError(
            f"{path}: the {image.format or 'image'} file is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "export it again"
        )
    return image, None


def _load_pillow(path: Path, image) -> LoadedImage:
    from PIL import ImageOps

    if getattr(image, "n_frames", 1) > 1:
        raise InputError(f"{path}: multi-frame image ({image.n_frames} frames); send one radiograph per file")
    file_format = image.format or "image"
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
    elif mode == "1":
        raise InputError(f"{path}: {_ONE_BIT}")
    else:
        # L, LA, P, RGB, RGBA, CMYK, YCbCr ... -> 8-bit luminance, then 0..255 -> 0..65535.
        # Anything with colour must be grey in fact (equal channels): a colour photograph is refused.
        if mode not in ("L", "LA", "La"):
            _check_grey(path, np.asarray(image.convert("RGB")), 255, f"{file_format} mode {mode}")
        eight_bit = np.array(image if mode == "L" else image.convert("L"), dtype=np.uint16)
        pixels = eight_bit * 257
    if pixels.ndim != 2:
        raise InputError(f"{path}: expected a 2-D grayscale image, got shape {pixels.shape}")
    return LoadedImage(pixels=pixels, hint=None, image_id=path.stem, dataset=None, source=path)
