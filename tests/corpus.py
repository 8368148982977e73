"""The bad-input corpus: every case generated here (nothing downloaded), each with the outcome
it must get and a fragment of the message that names the problem.

Two kinds of case:

* :data:`FILE_CASES`: a file as a PACS export could deliver it. ``outcome`` is where it ends:
  ``classified``; ``InputError`` (refused by ``cxrlt.io.images.load_image`` on the client,
  before anything is sent); or ``INVALID_ARGUMENT`` (loaded, then refused by the server's
  shared validation, ``cxrlt.contract.preprocessing.validate_served_image`` and
  ``check_not_constant``). ``cxrlt classify`` reports the message of either refusal.
* :data:`GRPC_CASES`: a raw request straight to a served model (plain tritonclient, no client
  checks), with the gRPC status code it must get.

As fuzz input::

    python -m tests.corpus --out DIR      # DIR/<file cases>, DIR/cases.csv (every case)

``cases.csv`` has the columns name, kind (file / grpc), file, model, outcome, message,
description. A gRPC case's request is code: ``grpc_inputs(case, size)`` builds its tritonclient
inputs. ``docs/bad_inputs.md`` is generated from this module (``--markdown``), and a test
checks the two agree.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import struct
import sys
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

CLASSIFIED, INPUT_ERROR, INVALID_ARGUMENT = "classified", "InputError", "INVALID_ARGUMENT"

DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BOMB_SIDE = 60_000
BOMB = "over the limit of 50000000 pixels (decompression-bomb guard"
SEED_UID = "1.2.826.0.1.3680043.8.498.7"  # a fixed UID root: the corpus is byte-identical run to run


@dataclasses.dataclass(frozen=True)
class FileCase:
    name: str
    filename: str
    write: Callable[[Path], None]
    outcome: str  # CLASSIFIED, INPUT_ERROR or INVALID_ARGUMENT
    message: str  # a fragment of the refusal's message ("" when classified)
    description: str
    hint: str | None = None  # the projection hint load_image must find (classified DICOMs)


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # Triton's: UINT16, FP32, BYTES ...
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GrpcCase:
    name: str
    model: str
    inputs: Callable[[int], list[Tensor]]  # argument: the model's network input size (network models)
    status: str  # the gRPC status code name, e.g. INVALID_ARGUMENT
    message: str
    description: str
    model_version: str = ""
    channel_args: tuple[tuple[str, int], ...] | None = None  # the client's channel, when the case needs one


# ----------------------------------------------------------------------------- images


@lru_cache(maxsize=None)
def _synthetic() -> dict[str, np.ndarray]:
    from cxrlt.io.synthetic import synthetic_radiographs

    return synthetic_radiographs()


def frontal() -> np.ndarray:
    """The synthetic frontal radiograph, uint16 full scale (what a good request sends)."""
    return _synthetic()["frontal"]


def lateral() -> np.ndarray:
    return _synthetic()["lateral"]


def _twelve_bit(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.uint32) >> 4).astype(np.uint16)


def _eight_bit(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.uint32) >> 8).astype(np.uint8)


def _ramp(height: int, width: int, dtype=np.uint16, top: int = 4095) -> np.ndarray:
    """A non-constant image of any size: a diagonal ramp."""
    v, u = np.mgrid[0:height, 0:width]
    return ((u + v) * top // max(1, height + width - 2)).astype(dtype)


def _colour_photo(height: int = 480, width: int = 640) -> np.ndarray:
    """An RGB 'photograph': hue varies across the image, every pixel really coloured."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 120 * np.sin(u / 40.0)
    green = 128 + 120 * np.sin(v / 30.0 + 1.0)
    blue = 128 + 120 * np.cos((u + v) / 50.0)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM writers


def _uid(suffix: str) -> str:
    return f"{SEED_UID}.{int(hashlib.sha256(suffix.encode()).hexdigest()[:24], 16)}"


def _dataset(name: str, *, sop_class: str = DX_IMAGE, modality: str | None = "DX", syntax: str | None = None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(name)
    ds.StudyInstanceUID = _uid(name + "study")
    ds.SeriesInstanceUID = _uid(name + "series")
    if modality is not None:
        ds.Modality = modality
    ds.PatientID = "CORPUS"
    return ds


def _with_pixels(ds, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None):
    ds.set_pixel_data(pixels, photometric_interpretation=photometric,
                      bits_stored=bits_stored or pixels.dtype.itemsize * 8, generate_instance_uid=False)
    return ds


def _save(ds, path: Path, **attributes) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hostile cases are invalid on purpose
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def _dx(pixels: np.ndarray | None = None, bits_stored: int = 12, **attributes) -> Callable[[Path], None]:
    """A writer of a DX file (default: the synthetic frontal, 12-bit) with header attributes."""

    def write(path: Path) -> None:
        image = _twelve_bit(frontal()) if pixels is None else pixels
        _save(_with_pixels(_dataset(path.name), image, bits_stored=bits_stored), path, **attributes)

    return write


def _header_only(rows: int, columns: int, pixel_bytes: bytes, **attributes) -> Callable[[Path], None]:
    """A DX header with Rows/Columns as given and PixelData as given (they may disagree)."""

    def write(path: Path) -> None:
        ds = _dataset(path.name)
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixel_bytes
        ds["PixelData"].VR = "OW"
        _save(ds, path, **attributes)

    return write


def _write_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _write_random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _write_text(path: Path) -> None:
    path.write_text("Patient notes: chest X-ray ordered, see PACS.\n" * 20)


def _write_png_as_dcm(path: Path) -> None:
    from PIL import Image

    Image.fromarray(_eight_bit(frontal())).save(path, format="PNG")


def _write_truncated_pixels(path: Path) -> None:
    _dx()(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 256 * 100])  # ends inside the pixel data


def _write_no_pixel_data(path: Path) -> None:
    ds = _dataset(path.name)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 256, 256, 1, "MONOCHROME2"
    _save(ds, path)


def _other_modality(sop_class: str, modality: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        ds = _dataset(path.name, sop_class=sop_class, modality=modality)
        _save(_with_pixels(ds, _twelve_bit(frontal()), bits_stored=12), path)

    return write


def _write_ultrasound_rgb(path: Path) -> None:
    ds = _dataset(path.name, sop_class=US_IMAGE, modality="US")
    _save(_with_pixels(ds, _colour_photo(240, 320), photometric="RGB"), path)


def _write_sc_rgb(pixels: Callable[[], np.ndarray]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        ds = _dataset(path.name, sop_class=SECONDARY_CAPTURE, modality="OT")
        _save(_with_pixels(ds, pixels(), photometric="RGB"), path)

    return write


def _write_ybr_full(path: Path) -> None:
    from pydicom.pixels import convert_color_space

    ds = _dataset(path.name, sop_class=SECONDARY_CAPTURE, modality="OT")
    ybr = convert_color_space(_colour_photo(240, 320), "RGB", "YBR_FULL")
    ds.Rows, ds.Columns = ybr.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "YBR_FULL"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(ybr).tobytes()
    _save(ds, path)


def _write_palette(path: Path) -> None:
    ds = _dataset(path.name, sop_class=SECONDARY_CAPTURE, modality="OT")
    index = _eight_bit(frontal())
    ds.Rows, ds.Columns = index.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ramp = np.arange(256, dtype=np.uint16) * 257
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", ramp)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.tobytes())
    ds.PixelData = index.tobytes()
    _save(ds, path)


def _write_multi_frame(path: Path) -> None:
    frames = np.stack([_twelve_bit(frontal())] * 3)
    _save(_with_pixels(_dataset(path.name), frames, bits_stored=12), path)


def _write_one_bit(path: Path) -> None:
    from pydicom.pixels import pack_bits

    ds = _dataset(path.name)
    mask = (_twelve_bit(frontal()) > 2000).astype(np.uint8)
    ds.Rows, ds.Columns = mask.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(mask)
    _save(ds, path)


def _write_float(path: Path) -> None:
    ds = _dataset(path.name)
    values = frontal().astype(np.float32) / 65535.0
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = values.tobytes()
    _save(ds, path)


def _write_signed_rescale(path: Path) -> None:
    signed = (_twelve_bit(frontal()).astype(np.int32) - 1024).astype(np.int16)  # -1024 .. 3071
    ds = _with_pixels(_dataset(path.name), signed, bits_stored=16)
    _save(ds, path, RescaleSlope=1, RescaleIntercept=-1024, RescaleType="US")


def _write_bomb_dicom(path: Path) -> None:
    _header_only(BOMB_SIDE, BOMB_SIDE, bytes(64))(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grey) over a few real bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1) * 2)  # two rows; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _write_png_bomb(path: Path) -> None:
    path.write_bytes(_png_header_claiming(BOMB_SIDE, BOMB_SIDE))


def _write_png_over_limit(path: Path) -> None:
    path.write_bytes(_png_header_claiming(7100, 7100))  # 50.4 M pixels: under Pillow's limit, over ours


def _write_jpeg_bomb(path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_ramp(16, 16, np.uint8, 255)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", BOMB_SIDE, BOMB_SIDE)
    path.write_bytes(bytes(data))


def undecodable_syntax() -> str:
    """A compressed transfer syntax no installed decoder handles: JPEG Lossless SV1 (the usual
    CR/DX compression) unless pylibjpeg-libjpeg or GDCM is installed, else MPEG-2 (never)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLossless, JPEGLosslessSV1, MPEG2MPML

    for syntax in (JPEGLosslessSV1, JPEGLossless):
        if not get_decoder(syntax).is_available:
            return syntax
    return MPEG2MPML


def _encapsulated(path: Path, syntax: str, codestream: bytes, rows: int, columns: int, bits: int) -> None:
    from pydicom.encaps import encapsulate

    ds = _dataset(path.name, syntax=syntax)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8, 8, 7, 0) if bits == 8 else (16, bits, bits - 1, 0)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    _save(ds, path)


def _write_undecodable(path: Path) -> None:
    fake = b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"  # a lossless JPEG frame in name only
    _encapsulated(path, undecodable_syntax(), fake, 256, 256, 12)


def _write_jpeg_baseline(path: Path) -> None:
    from PIL import Image
    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    Image.fromarray(_eight_bit(frontal())).save(buffer, format="JPEG", quality=90)
    _encapsulated(path, JPEGBaseline8Bit, buffer.getvalue(), *frontal().shape, bits=8)


def _write_deflated(path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dataset(path.name, syntax=DeflatedExplicitVRLittleEndian)
    _save(_with_pixels(ds, _twelve_bit(frontal()), bits_stored=12), path, ViewPosition="PA")


def _write_bare(path: Path) -> None:
    import pydicom

    ds = _with_pixels(_dataset(path.name), _twelve_bit(frontal()), bits_stored=12)
    ds.preamble = None
    pydicom.dcmwrite(path, ds, enforce_file_format=False)  # no 128-byte preamble, no 'DICM'


def _write_no_photometric(path: Path) -> None:
    ds = _with_pixels(_dataset(path.name), _twelve_bit(frontal()), bits_stored=12)
    del ds.PhotometricInterpretation
    _save(ds, path)


# ----------------------------------------------------------------------------- other formats


def _pillow(make: Callable[[], np.ndarray], fmt: str, **options) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from PIL import Image

        Image.fromarray(make()).save(path, format=fmt, **options)

    return write


def _write_truncated_png(path: Path) -> None:
    _pillow(lambda: _eight_bit(frontal()), "PNG")(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_one_bit_png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(_eight_bit(frontal()) > 100).save(path, format="PNG")  # mode "1"


def _write_gif(path: Path) -> None:
    from PIL import Image

    frames = [Image.fromarray(_eight_bit(frontal())), Image.fromarray(_eight_bit(frontal())[::-1].copy())]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])


def _grey_rgb() -> np.ndarray:
    return np.repeat(_eight_bit(frontal())[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- the file cases

NON_ASCII_VIEW = "VUE ANTÉRO-POSTÉRIEURE"
LONG_VIEW = "POSTERO-ANTERIOR ERECT, FULL INSPIRATION " * 4

FILE_CASES: tuple[FileCase, ...] = (
    # ---- not DICOM, not an image
    FileCase("zero_bytes", "zero_bytes.dcm", _write_zero_bytes, INPUT_ERROR, "empty file (0 bytes)",
             "an empty file (a failed transfer)"),
    FileCase("random_bytes", "random_bytes.dcm", _write_random_bytes, INPUT_ERROR, "not a DICOM file and not an image",
             "4 kB of random bytes named .dcm"),
    FileCase("text_file", "notes.txt", _write_text, INPUT_ERROR, "not a DICOM file and not an image", "a text file"),
    FileCase("png_named_dcm", "png_named.dcm", _write_png_as_dcm, CLASSIFIED, "",
             "a grayscale PNG renamed .dcm: the format is decided by content, so it is read as the PNG it is"),
    # ---- DICOM structure
    FileCase("truncated_pixel_data", "truncated_pixel_data.dcm", _write_truncated_pixels, INPUT_ERROR, "truncated",
             "a DX file cut off inside the pixel data"),
    FileCase("no_pixel_data", "no_pixel_data.dcm", _write_no_pixel_data, INPUT_ERROR, "no pixel data",
             "a valid DX header without PixelData"),
    FileCase("rows_columns_too_large", "rows_columns_too_large.dcm",
             _header_only(300, 256, _twelve_bit(_ramp(256, 256)).tobytes()), INPUT_ERROR, "Rows x Columns",
             "Rows says 300, the pixel data holds 256 rows"),
    FileCase("rows_columns_too_small", "rows_columns_too_small.dcm",
             _header_only(200, 256, _twelve_bit(_ramp(256, 256)).tobytes()), INPUT_ERROR,
             "the header disagrees with the pixel data", "Rows says 200, the pixel data holds 256 rows"),
    FileCase("no_photometric", "no_photometric.dcm", _write_no_photometric, INPUT_ERROR, "no PhotometricInterpretation",
             "PhotometricInterpretation missing: black and white unknown"),
    FileCase("window_width_zero", "window_width_zero.dcm", _dx(WindowCenter=2048, WindowWidth=0), INPUT_ERROR,
             "cannot be applied", "a VOI window of width 0"),
    FileCase("bare_dataset", "bare_dataset", _write_bare, CLASSIFIED, "",
             "a dataset without the 128-byte preamble and 'DICM' (older PACS exports), no extension"),
    # ---- what the image is
    FileCase("modality_ct", "ct.dcm", _other_modality(CT_IMAGE, "CT"), INPUT_ERROR, "modality CT", "a CT slice"),
    FileCase("modality_mr", "mr.dcm", _other_modality(MR_IMAGE, "MR"), INPUT_ERROR, "modality MR", "an MR slice"),
    FileCase("ultrasound_rgb", "ultrasound_rgb.dcm", _write_ultrasound_rgb, INPUT_ERROR, "modality US",
             "an ultrasound-like RGB frame"),
    FileCase("multi_frame", "multi_frame.dcm", _write_multi_frame, INPUT_ERROR, "multi-frame image (3 frames)",
             "three frames in one DX file"),
    FileCase("one_bit", "one_bit.dcm", _write_one_bit, INPUT_ERROR, "1-bit", "a 1-bit (bi-level) mask"),
    FileCase("float_pixels", "float_pixels.dcm", _write_float, INPUT_ERROR, "floating-point pixel data",
             "32-bit float pixels (FloatPixelData)"),
    # ---- colour, in every format
    FileCase("rgb_dicom", "rgb.dcm", _write_sc_rgb(_colour_photo), INPUT_ERROR, "colour image",
             "a Secondary Capture RGB photograph"),
    FileCase("ybr_full", "ybr_full.dcm", _write_ybr_full, INPUT_ERROR, "colour image", "a YBR_FULL colour image"),
    FileCase("palette_color", "palette_color.dcm", _write_palette, INPUT_ERROR, "colour image",
             "PALETTE COLOR (colour by definition)"),
    FileCase("colour_png", "colour_photo.png", _pillow(_colour_photo, "PNG"), INPUT_ERROR, "colour image",
             "a 640 x 480 colour photograph as PNG"),
    FileCase("colour_jpeg", "colour_photo.jpg", _pillow(_colour_photo, "JPEG", quality=90), INPUT_ERROR,
             "colour image", "the same photograph as JPEG"),
    FileCase("grey_rgb_dicom", "grey_rgb.dcm", _write_sc_rgb(_grey_rgb), CLASSIFIED, "",
             "a grey image stored as RGB DICOM (equal channels)"),
    FileCase("grey_rgb_png", "grey_rgb.png", _pillow(_grey_rgb, "PNG"), CLASSIFIED, "",
             "a grey image saved as RGB PNG (equal channels)"),
    FileCase("grey_rgb_jpeg", "grey_rgb.jpg", _pillow(_grey_rgb, "JPEG", quality=85), CLASSIFIED, "",
             "a grey image saved as RGB JPEG (channels equal up to compression)"),
    FileCase("grey_png", "grey.png", _pillow(lambda: _eight_bit(frontal()), "PNG"), CLASSIFIED, "", "an 8-bit grayscale PNG"),
    FileCase("grey_png_16bit", "grey16.png", _pillow(frontal, "PNG"), CLASSIFIED, "", "a 16-bit grayscale PNG"),
    FileCase("truncated_png", "truncated.png", _write_truncated_png, INPUT_ERROR, "truncated or corrupt",
             "a PNG cut in half"),
    FileCase("one_bit_png", "one_bit.png", _write_one_bit_png, INPUT_ERROR, "1-bit", "a 1-bit PNG"),
    FileCase("animated_gif", "animated.gif", _write_gif, INPUT_ERROR, "multi-frame image (2 frames)", "a two-frame GIF"),
    # ---- size: decompression bombs, refused from the header before decoding
    FileCase("bomb_dicom", "bomb_60000.dcm", _write_bomb_dicom, INPUT_ERROR, BOMB,
             f"a DICOM header claiming {BOMB_SIDE} x {BOMB_SIDE} over 64 bytes of pixel data"),
    FileCase("bomb_png", "bomb_60000.png", _write_png_bomb, INPUT_ERROR, BOMB,
             f"a PNG header claiming {BOMB_SIDE} x {BOMB_SIDE} (Pillow's DecompressionBombError)"),
    FileCase("bomb_jpeg", "bomb_60000.jpg", _write_jpeg_bomb, INPUT_ERROR, BOMB,
             f"a JPEG header claiming {BOMB_SIDE} x {BOMB_SIDE}"),
    FileCase("png_over_limit", "over_limit_7100.png", _write_png_over_limit, INPUT_ERROR, BOMB,
             "a PNG header claiming 7100 x 7100 (under Pillow's limit, over ours)"),
    # ---- transfer syntaxes
    FileCase("undecodable_syntax", "jpeg_lossless.dcm", _write_undecodable, INPUT_ERROR, "no installed decoder",
             "JPEG Lossless SV1 without pylibjpeg-libjpeg or GDCM installed (else MPEG-2)"),
    FileCase("deflated", "deflated.dcm", _write_deflated, CLASSIFIED, "",
             "Deflated Explicit VR Little Endian (pydicom inflates it)", hint="PA"),
    FileCase("jpeg_baseline", "jpeg_baseline.dcm", _write_jpeg_baseline, CLASSIFIED, "",
             "lossy JPEG baseline, 8-bit (Pillow decodes it through pydicom)"),
    FileCase("signed_negative_rescale", "signed_rescale.dcm", _write_signed_rescale, CLASSIFIED, "",
             "signed 16-bit pixels with RescaleIntercept -1024"),
    # ---- shape and content: loaded, then refused by the server's shared validation
    FileCase("constant_image", "constant.dcm", _dx(np.zeros((256, 256), np.uint16)), INVALID_ARGUMENT, "constant image",
             "an all-zero image: nothing to classify"),
    FileCase("tiny_8x8", "tiny_8x8.dcm", _dx(_ramp(8, 8)), INVALID_ARGUMENT, "too small",
             "an 8 x 8 image (the minimum is 24 px on each side)"),
    FileCase("strip_10000x10", "strip_10000x10.dcm", _dx(_ramp(10000, 10)), INVALID_ARGUMENT, "aspect ratio",
             "a 10000 x 10 strip (the limit is 10:1)"),
    FileCase("tiny_png", "tiny_8x8.png", _pillow(lambda: _ramp(8, 8, np.uint8, 255), "PNG"), INVALID_ARGUMENT,
             "too small", "an 8 x 8 PNG"),
    # ---- projection hints
    FileCase("lateral_tagged_ap", "lateral_tagged_ap.dcm", lambda p: _dx(_twelve_bit(lateral()), ViewPosition="AP")(p),
             CLASSIFIED, "", "a lateral image whose header says AP: classified as frontal (the hint is trusted), "
             "PROJECTION_SCORE shows the router's doubt", hint="AP"),
    FileCase("view_position_non_ascii", "view_non_ascii.dcm", _dx(ViewPosition=NON_ASCII_VIEW), CLASSIFIED, "",
             "non-ASCII text in ViewPosition: no usable hint, a warning"),
    FileCase("view_position_overlong", "view_overlong.dcm", _dx(ViewPosition=LONG_VIEW), CLASSIFIED, "",
             "164 characters in ViewPosition (CS allows 16): no usable hint, a warning"),
    FileCase("no_view_position", "no_view.dcm", _dx(), CLASSIFIED, "",
             "neither ViewPosition nor ViewCodeSequence: classified without a hint"),
)


# ----------------------------------------------------------------------------- gRPC cases


def _image(array: np.ndarray, datatype: str = "UINT16") -> Tensor:
    return Tensor("IMAGE", datatype, array)


def _hint(*values: bytes) -> Tensor:
    return Tensor("PROJECTION_HINT", "BYTES", np.array([[v] for v in values], dtype=np.object_))


def good_image() -> np.ndarray:
    """[1, H, W] UINT16: the synthetic frontal, a request that must succeed."""
    return frontal()[None]


def _pixels(value: float) -> Callable[[int], list[Tensor]]:
    def build(size: int) -> list[Tensor]:
        batch = np.zeros((1, 3, size, size), np.float32)
        batch[0, 0, size // 2, size // 2 :] = value
        return [Tensor("pixel_values", "FP32", batch)]

    return build


def _fixed(*tensors: Tensor) -> Callable[[int], list[Tensor]]:
    return lambda _size: list(tensors)


_SMALL = _ramp(64, 64)
_DTYPES = (("FP32", np.float32), ("FP16", np.float16), ("FP64", np.float64), ("INT16", np.int16),
           ("INT32", np.int32), ("UINT8", np.uint8), ("UINT32", np.uint32))
GRPC_LIMIT_BYTES = 1 << 20  # the client channel's send limit in the size case (tritonclient's default: 2 GiB - 1)

GRPC_CASES: tuple[GrpcCase, ...] = (
    *(GrpcCase(f"image_dtype_{name.lower()}", "cxr_classifier", _fixed(_image(_SMALL[None].astype(dtype), name)),
               INVALID_ARGUMENT, "data-type", f"IMAGE as {name} (the contract: UINT16)") for name, dtype in _DTYPES),
    GrpcCase("image_dtype_bytes", "cxr_classifier",
             _fixed(_image(np.array([[[b"\x00\x01"] * 64] * 64], dtype=np.object_), "BYTES")), INVALID_ARGUMENT,
             "data-type", "IMAGE as BYTES"),
    GrpcCase("image_dtype_findings_fp32", "cxr_findings", _fixed(_image(_SMALL[None].astype(np.float32), "FP32")),
             INVALID_ARGUMENT, "data-type", "cxr_findings with an FP32 IMAGE"),
    GrpcCase("tensor_rank_1", "cxr_classifier", _fixed(_image(_SMALL.reshape(-1))), INVALID_ARGUMENT, "batch-size",
             "IMAGE [4096]: Triton reads the only axis as a batch of 4096"),
    GrpcCase("image_rank_1", "cxr_classifier", _fixed(_image(_SMALL.reshape(1, -1))), INVALID_ARGUMENT, "shape",
             "IMAGE [1, 4096]: a 1-D image"),
    GrpcCase("image_rank_3", "cxr_classifier", _fixed(_image(np.repeat(_SMALL[None, ..., None], 3, axis=-1))),
             INVALID_ARGUMENT, "shape", "IMAGE [1, 64, 64, 3]: an RGB array"),
    GrpcCase("image_rank_4", "cxr_classifier", _fixed(_image(_SMALL[None, None, ..., None])), INVALID_ARGUMENT, "shape",
             "IMAGE [1, 1, 64, 64, 1]"),
    GrpcCase("image_empty", "cxr_classifier", _fixed(_image(np.zeros((1, 0, 64), np.uint16))), INVALID_ARGUMENT,
             "empty", "IMAGE [1, 0, 64]"),
    GrpcCase("image_1x1", "cxr_classifier", _fixed(_image(np.full((1, 1, 1), 7, np.uint16))), INVALID_ARGUMENT,
             "too small", "a 1 x 1 image"),
    GrpcCase("image_8x8_findings", "cxr_findings", _fixed(_image(_ramp(8, 8)[None])), INVALID_ARGUMENT, "too small",
             "an 8 x 8 image to cxr_findings"),
    GrpcCase("image_strip_zeroshot", "cxr_zeroshot", _fixed(_image(_ramp(1000, 40)[None])), INVALID_ARGUMENT,
             "aspect ratio", "a 1000 x 40 strip to cxr_zeroshot"),
    GrpcCase("image_constant", "cxr_classifier", _fixed(_image(np.full((1, 64, 64), 1000, np.uint16))),
             INVALID_ARGUMENT, "constant image", "a constant 64 x 64 image"),
    GrpcCase("image_constant_findings", "cxr_findings", _fixed(_image(np.zeros((1, 64, 64), np.uint16))),
             INVALID_ARGUMENT, "constant image", "a constant image to cxr_findings"),
    GrpcCase("batch_over_max", "cxr_classifier", _fixed(_image(np.repeat(_SMALL[None], 17, axis=0))),
             INVALID_ARGUMENT, "batch-size must be <=", "17 images, max_batch_size 16"),
    GrpcCase("hint_count_mismatch", "cxr_classifier",
             _fixed(_image(np.stack([_SMALL, _SMALL[::-1]])), _hint(b"PA")), INVALID_ARGUMENT, "batch size",
             "two images, one hint"),
    GrpcCase("hint_two_per_image", "cxr_classifier",
             _fixed(_image(_SMALL[None]), Tensor("PROJECTION_HINT", "BYTES", np.array([[b"PA", b"AP"]], dtype=np.object_))),
             INVALID_ARGUMENT, "shape", "PROJECTION_HINT [1, 2] for one image"),
    GrpcCase("hint_not_utf8", "cxr_classifier", _fixed(_image(_SMALL[None]), _hint(b"\xff\xfeA\x00P\x00")),
             INVALID_ARGUMENT, "not UTF-8", "hint bytes that are not UTF-8 (UTF-16 'AP')"),
    GrpcCase("hint_10kb", "cxr_classifier", _fixed(_image(_SMALL[None]), _hint(b"PA" * 5000)), INVALID_ARGUMENT,
             "10000 bytes long", "a 10 kB hint"),
    GrpcCase("hint_10kb_findings", "cxr_findings", _fixed(_image(_SMALL[None]), _hint(b"A" * 10240)), INVALID_ARGUMENT,
             "10240 bytes long", "a 10 kB hint to cxr_findings"),
    GrpcCase("hint_unknown", "cxr_classifier", _fixed(_image(_SMALL[None]), _hint(b"OBLIQUE")), INVALID_ARGUMENT,
             "unknown projection hint", "hint OBLIQUE"),
    GrpcCase("hint_non_ascii", "cxr_classifier", _fixed(_image(_SMALL[None]), _hint("ÄP".encode())), INVALID_ARGUMENT,
             "unknown projection hint", "hint 'ÄP' (UTF-8, not a term)"),
    GrpcCase("hint_bad_and_image_constant", "cxr_findings",
             _fixed(_image(np.zeros((1, 64, 64), np.uint16)), _hint(b"OBLIQUE")), INVALID_ARGUMENT,
             "unknown projection hint", "bad hint and constant image: the hint is reported, always"),
    GrpcCase("missing_image", "cxr_classifier", _fixed(_hint(b"PA")), INVALID_ARGUMENT, "has no IMAGE input",
             "PROJECTION_HINT only, no IMAGE"),
    GrpcCase("unexpected_input", "cxr_classifier", _fixed(_image(_SMALL[None]), Tensor("PIXELS", "UINT16", _SMALL[None])),
             INVALID_ARGUMENT, "PIXELS", "an input the model does not have"),
    GrpcCase("message_over_grpc_limit", "cxr_classifier", _fixed(_image(_ramp(1024, 1024)[None])), "RESOURCE_EXHAUSTED",
             "larger than max", f"a 2 MiB request on a channel limited to {GRPC_LIMIT_BYTES} bytes; "
             "Triton's own limit is 2 GiB - 1 (INT32_MAX), too large to test",
             channel_args=(("grpc.max_send_message_length", GRPC_LIMIT_BYTES),)),
    GrpcCase("unknown_model", "cxr_nonexistent", _fixed(_image(_SMALL[None])), "NOT_FOUND", "cxr_nonexistent",
             "a model the server does not have"),
    GrpcCase("unknown_version", "cxr_classifier", _fixed(_image(_SMALL[None])), "NOT_FOUND", "version 7",
             "version 7 of cxr_classifier", model_version="7"),
    GrpcCase("network_nan", "projection_router", _pixels(float("nan")), INVALID_ARGUMENT, "non-finite pixel values",
             "NaN in pixel_values, straight to the router"),
    GrpcCase("network_inf", "ensemble_frontal_pcam", _pixels(float("inf")), INVALID_ARGUMENT, "non-finite pixel values",
             "+Inf in pixel_values, straight to an ensemble member"),
    GrpcCase("network_nan_clip", "clip_image_encoder", _pixels(float("-inf")), INVALID_ARGUMENT,
             "non-finite pixel values", "-Inf into the CLIP image encoder"),
    GrpcCase("network_dtype_fp64", "projection_router", lambda size: [Tensor("pixel_values", "FP64", np.zeros((1, 3, size, size)))],
             INVALID_ARGUMENT, "data-type", "pixel_values as FP64"),
    GrpcCase("network_wrong_size", "projection_router", lambda size: [Tensor("pixel_values", "FP32", np.zeros((1, 3, size + 1, size + 1), np.float32))],
             INVALID_ARGUMENT, "shape", "pixel_values one pixel larger than the network's size"),
)

ALL_CASES: tuple[FileCase | GrpcCase, ...] = FILE_CASES + GRPC_CASES


def grpc_inputs(case: GrpcCase, size: int = 0) -> list:
    """The tritonclient.grpc InferInputs of a gRPC case (size: the network model's input side)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for tensor in case.inputs(size):
        item = grpcclient.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
        item.set_data_from_numpy(tensor.data)
        inputs.append(item)
    return inputs


def write_files(out: Path | str, cases: Sequence[FileCase] = FILE_CASES) -> dict[str, Path]:
    """Write every file case into `out`; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        path = out / case.filename
        case.write(path)
        paths[case.name] = path
    return paths


def rows() -> list[dict[str, str]]:
    """One row per case, the columns of cases.csv and of the docs table."""
    table = []
    for case in ALL_CASES:
        if isinstance(case, FileCase):
            table.append({"name": case.name, "kind": "file", "file": case.filename, "model": "",
                          "outcome": case.outcome, "message": case.message, "description": case.description})
        else:
            model = case.model + (f" (version {case.model_version})" if case.model_version else "")
            table.append({"name": case.name, "kind": "grpc", "file": "", "model": model,
                          "outcome": case.status, "message": case.message, "description": case.description})
    return table


def markdown_table() -> str:
    """The table docs/bad_inputs.md holds (between its generated-table markers)."""
    lines = ["| case | kind | input | expected outcome | message names |", "|---|---|---|---|---|"]
    for row in rows():
        what = f"`{row['file']}`" if row["kind"] == "file" else f"`{row['model']}`"
        message = f"`{row['message']}`" if row["message"] else "-"
        description = row["description"].replace("|", "\\|")
        lines.append(f"| `{row['name']}` | {row['kind']} | {what}: {description} | {row['outcome']} | {message} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the file cases and cases.csv here")
    parser.add_argument("--markdown", action="store_true", help="print the docs/bad_inputs.md table")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
    if args.out is None:
        if not args.markdown:
            parser.error("give --out DIR (and/or --markdown)")
        return 0
    write_files(args.out)
    with (args.out / "cases.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "kind", "file", "model", "outcome", "message", "description"])
        writer.writeheader()
        writer.writerows(rows())
    print(f"{len(FILE_CASES)} file cases and {len(GRPC_CASES)} gRPC cases -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
