"""cxrlt.io.images against a real chest radiograph (pydicom-data) and datasets built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrlt.io.images import InputError, LoadedImage, load_image

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: pydicom-data is a dependency; reinstall the project"
    return path


@pytest.fixture(scope="module")
def uncompressed() -> LoadedImage:
    return load_image(_testdata("RG1_UNCR.dcm"))


def make_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    sop_class: str = DX_IMAGE,
    modality: str | None = "DX",
    **attributes,
) -> Path:
    """Write a minimal but valid Part 10 file with the given pixels and header values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if modality is not None:
        ds.Modality = modality
    ds.PatientID = "TEST"
    if pixels is not None:
        ds.set_pixel_data(
            pixels,
            photometric_interpretation=photometric,
            bits_stored=bits_stored or pixels.dtype.itemsize * 8,
            generate_instance_uid=False,
        )
    else:
        ds.Rows, ds.Columns = 4, 4
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def view_code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# ------------------------------------------------------------------ the real radiograph


def test_real_cr_loads_as_uint16_with_header_hint(uncompressed):
    ds = pydicom.dcmread(_testdata("RG1_UNCR.dcm"))
    assert uncompressed.pixels.dtype == np.uint16
    assert uncompressed.pixels.shape == (ds.Rows, ds.Columns) == (1955, 1841)
    assert uncompressed.hint == "PA"  # ViewPosition in the header
    assert uncompressed.image_id == ds.SOPInstanceUID
    assert uncompressed.dataset.SOPInstanceUID == ds.SOPInstanceUID
    assert uncompressed.source == Path(_testdata("RG1_UNCR.dcm"))


def test_lossless_jpeg2000_gives_identical_pixels(uncompressed):
    lossless = load_image(_testdata("RG1_J2KR.dcm"))
    assert lossless.dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    np.testing.assert_array_equal(lossless.pixels, uncompressed.pixels)


def test_lossy_jpeg2000_is_close(uncompressed):
    lossy = load_image(_testdata("RG1_J2KI.dcm")).pixels.astype(np.float64)
    reference = uncompressed.pixels.astype(np.float64)
    assert not np.array_equal(lossy, reference)  # it really is lossy
    assert np.abs(lossy - reference).mean() < 0.005 * 65535
    assert np.corrcoef(lossy.ravel(), reference.ravel())[0, 1] > 0.999


def test_monochrome1_window_and_inversion_match_the_standard(uncompressed):
    """RG1 is MONOCHROME1, 15 bits stored, window 15000/30000: redo PS3.3 C.11.2.1.2 by hand."""
    ds = pydicom.dcmread(_testdata("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    raw = ds.pixel_array.astype(np.float64)
    y_max = 2**15 - 1
    center, width = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1
    windowed = np.clip(((raw - center) / width + 0.5) * y_max, 0, y_max)
    expected = (y_max - windowed) * 65535 / y_max  # MONOCHROME1: invert within the range
    assert np.abs(uncompressed.pixels - expected).max() <= 1.0
    # Inverted means the stored-high (dark on film) lungs come out darker than the spine.
    rows, cols = uncompressed.pixels.shape
    middle = uncompressed.pixels[rows // 3 : rows // 2]
    spine = middle[:, cols // 2 - 40 : cols // 2 + 40].mean()
    lungs = np.concatenate([middle[:, cols // 4 - 40 : cols // 4 + 40], middle[:, 3 * cols // 4 - 40 : 3 * cols // 4 + 40]]).mean()
    assert spine > lungs + 5000


def test_brightness_does_not_depend_on_image_content(tmp_path, uncompressed):
    """A crop of the image keeps its grey values: no per-image min/max stretching."""
    ds = pydicom.dcmread(_testdata("RG1_UNCR.dcm"))
    crop = np.ascontiguousarray(ds.pixel_array[900:1000, 850:1000])  # mediastinum only
    ds.set_pixel_data(crop, "MONOCHROME1", 15)
    ds.save_as(tmp_path / "crop.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(load_image(tmp_path / "crop.dcm").pixels, uncompressed.pixels[900:1000, 850:1000])


# ------------------------------------------------------------------ grayscale pipeline


def test_monochrome2_without_voi_uses_stored_bit_range(tmp_path):
    pixels = np.array([[0, 1000, 2000, 4095]], dtype=np.uint16)
    loaded = load_image(make_dicom(tmp_path / "a.dcm", pixels, bits_stored=12))
    expected = np.rint(pixels * (65535 / 4095)).astype(np.uint16)
    np.testing.assert_array_equal(loaded.pixels, expected)


def test_eight_bit_secondary_capture_maps_times_257(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = make_dicom(tmp_path / "sc.dcm", pixels, sop_class=SECONDARY_CAPTURE, modality="OT")
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded.pixels, pixels.astype(np.uint16) * 257)
    assert loaded.hint is None


def test_signed_pixels_span_the_signed_range(tmp_path):
    pixels = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    loaded = load_image(make_dicom(tmp_path / "signed.dcm", pixels, bits_stored=12))
    assert loaded.dataset.PixelRepresentation == 1
    expected = np.rint((pixels.astype(np.float64) + 2048) * (65535 / 4095))
    np.testing.assert_array_equal(loaded.pixels, expected.astype(np.uint16))


def test_voi_window_is_applied(tmp_path):
    pixels = np.array([[0, 700, 1024, 1300, 4095]], dtype=np.uint16)
    path = make_dicom(tmp_path / "window.dcm", pixels, bits_stored=12, WindowCenter=1024, WindowWidth=512)
    out = load_image(path).pixels
    assert out[0, 0] == 0 and out[0, 1] == 0  # below the window: black
    assert out[0, 3] == 65535 and out[0, 4] == 65535  # above the window: white
    assert abs(int(out[0, 2]) - 32768) < 200  # the centre: mid-grey


def test_first_of_several_windows_is_used(tmp_path):
    pixels = np.array([[100, 200, 300]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "two.dcm", pixels, bits_stored=12, WindowCenter=[200, 3000], WindowWidth=[200, 100]
    )
    out = load_image(path).pixels
    assert out[0, 0] == 0 and out[0, 2] == 65535 and 0 < out[0, 1] < 65535


def test_rescale_then_window(tmp_path):
    # Stored 0..4095, rescale to -1024..3071: the window is in rescaled units.
    pixels = np.array([[0, 1024, 1124, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "rescale.dcm", pixels, bits_stored=12,
        RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=50, WindowWidth=100,
    )
    out = load_image(path).pixels
    assert out[0, 0] == 0 and out[0, 1] < 1000 and out[0, 2] > 64500 and out[0, 3] == 65535


def test_presentation_lut_inverse_inverts_monochrome2(tmp_path):
    pixels = np.array([[0, 1000, 4095]], dtype=np.uint16)
    plain = load_image(make_dicom(tmp_path / "p.dcm", pixels, bits_stored=12)).pixels
    inverse = load_image(make_dicom(tmp_path / "i.dcm", pixels, bits_stored=12, PresentationLUTShape="INVERSE")).pixels
    np.testing.assert_array_equal(inverse.astype(np.int64), 65535 - plain.astype(np.int64))


# ------------------------------------------------------------------ hints


@pytest.mark.parametrize(
    ("view_position", "codes", "expected"),
    [
        (None, [view_code("399173006", "SCT", "left lateral")], "LL"),
        (None, [view_code("399198007", "SCT", "right lateral")], "RL"),
        (None, [view_code("272479007", "SCT", "postero-anterior")], "PA"),
        (None, [view_code("R-10214", "SRT", "postero-anterior")], "PA"),
        (None, [view_code("R-10206", "SRT", "antero-posterior")], "AP"),
        (None, [view_code("X-123", "99LOCAL", "Antero-Posterior")], "AP"),  # by meaning
        (None, [view_code("X-123", "99LOCAL", "lateral")], "LATERAL"),
        ("", [view_code("399348003", "SCT", "antero-posterior")], "AP"),  # empty ViewPosition
        ("LLO", [view_code("399348003", "SCT", "antero-posterior")], "AP"),  # odd ViewPosition
        ("LLO", [], None),
        (None, [view_code("X-999", "99LOCAL", "cranio-caudal")], None),
        (None, None, None),
        ("AP ", None, "AP"),
    ],
)
def test_projection_hint(tmp_path, view_position, codes, expected):
    attributes = {}
    if view_position is not None:
        attributes["ViewPosition"] = view_position
    if codes is not None:
        attributes["ViewCodeSequence"] = codes
    path = make_dicom(tmp_path / "hint.dcm", np.zeros((4, 4), np.uint16), bits_stored=12, **attributes)
    assert load_image(path).hint == expected


# ------------------------------------------------------------------ refusals


def test_ct_is_refused(tmp_path):
    path = make_dicom(tmp_path / "ct.dcm", np.zeros((4, 4), np.int16), bits_stored=12, sop_class=CT_IMAGE, modality="CT")
    with pytest.raises(InputError, match=r"ct\.dcm: modality CT .*only CR, DX and Secondary Capture"):
        load_image(path)


def test_missing_modality_is_accepted_for_radiography_sop_class(tmp_path):
    path = make_dicom(tmp_path / "nomod.dcm", np.zeros((4, 4), np.uint16), bits_stored=12, sop_class=CR_IMAGE, modality=None)
    assert load_image(path).pixels.shape == (4, 4)


def test_body_parts_refuse_another_body_part_and_pass_an_empty_one(tmp_path):
    knee = make_dicom(tmp_path / "knee.dcm", np.zeros((4, 4), np.uint16), bits_stored=12, BodyPartExamined="KNEE")
    with pytest.raises(InputError, match=r"knee\.dcm: body part 'KNEE' is not a chest \(accepted: CHEST, THORAX\)"):
        load_image(knee, body_parts=("CHEST", "THORAX"))
    # no body_parts: the one rule set's chest terms (cxrlt.contract.acceptance), for every path
    with pytest.raises(InputError, match=r"body part 'KNEE' is not a chest \(accepted: CHEST, THORAX, TORAX"):
        load_image(knee)
    assert load_image(knee, body_parts=("KNEE",)).pixels.shape == (4, 4)  # an override replaces them
    unnamed = make_dicom(tmp_path / "unnamed.dcm", np.zeros((4, 4), np.uint16), bits_stored=12)
    assert load_image(unnamed, body_parts=("CHEST",)).pixels.shape == (4, 4)
    chest = make_dicom(tmp_path / "chest.dcm", np.zeros((4, 4), np.uint16), bits_stored=12, BodyPartExamined="Chest ")
    assert load_image(chest.read_bytes(), body_parts=("CHEST",)).pixels.shape == (4, 4)


def test_non_dicom_file_is_refused(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, not an image\n" * 20)
    with pytest.raises(InputError, match=r"notes\.dcm: not a DICOM file and not an image"):
        load_image(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "absent.dcm")


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_truncated_dicom_is_refused(tmp_path, name):
    data = Path(_testdata(name)).read_bytes()
    path = tmp_path / f"cut_{name}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"cut_{name}: .*truncated"):
        load_image(path)


def test_truncated_jpeg2000_codestream_is_refused(tmp_path):
    """The file is complete but the codestream inside it stops half way."""
    ds = pydicom.dcmread(_testdata("RG1_J2KR.dcm"))
    codestream = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    assert codestream[:2] == b"\xff\x4f"  # a real J2K codestream (SOC marker)
    ds.PixelData = pydicom.encaps.encapsulate([codestream[: len(codestream) // 2]])
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(InputError, match=r"bad\.dcm: the pixel data is truncated or cannot be decoded \(JPEG 2000"):
        load_image(tmp_path / "bad.dcm")


def test_missing_pixel_data_is_refused(tmp_path):
    path = make_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(InputError, match=r"nopix\.dcm: .*no pixel data"):
        load_image(path)


def test_multi_frame_is_refused(tmp_path):
    path = make_dicom(tmp_path / "mf.dcm", np.zeros((3, 4, 4), np.uint16), bits_stored=12)
    with pytest.raises(InputError, match=r"multi-frame image \(3 frames\)"):
        load_image(path)


def test_colour_dicom_is_refused(tmp_path):
    # An RGB DICOM whose channels are equal is a grey image and is accepted (as PNG/JPEG are);
    # this one is really coloured: red only.
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200
    path = make_dicom(tmp_path / "rgb.dcm", colour, photometric="RGB", sop_class=SECONDARY_CAPTURE, modality="OT")
    with pytest.raises(InputError, match=r"rgb\.dcm: colour image \(PhotometricInterpretation RGB"):
        load_image(path)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


# ------------------------------------------------------------------ PNG / JPEG


def test_png_8bit(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "eight.png")
    loaded = load_image(tmp_path / "eight.png")
    np.testing.assert_array_equal(loaded.pixels, pixels.astype(np.uint16) * 257)
    assert loaded.pixels.dtype == np.uint16
    assert (loaded.hint, loaded.image_id, loaded.dataset) == (None, "eight", None)


def test_png_16bit_is_kept_exactly(tmp_path):
    pixels = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(64, 48)
    Image.fromarray(pixels).save(tmp_path / "sixteen.png")
    loaded = load_image(tmp_path / "sixteen.png")
    assert loaded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(loaded.pixels, pixels)


def test_png_rgb_becomes_grayscale(tmp_path):
    grey = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    loaded = load_image(tmp_path / "rgb.png")
    assert loaded.pixels.shape == (5, 5)
    np.testing.assert_array_equal(loaded.pixels, grey.astype(np.uint16) * 257)


def test_jpeg_via_pillow(tmp_path):
    grey = np.full((32, 32), 128, dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "film.jpg")
    loaded = load_image(tmp_path / "film.jpg")
    assert loaded.pixels.shape == (32, 32)
    assert abs(float(loaded.pixels.mean()) - 128 * 257) < 2 * 257


def test_jpeg_lossless_the_usual_cr_compression_is_decoded(tmp_path):
    """JPEG Lossless SV1 (process 14), decoded through GDCM (the `client` extra), gives pydicom's pixels."""
    from cxrlt.node.node import transfer_syntaxes

    ds = pydicom.dcmread(_testdata("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    ds.Modality, ds.SOPClassUID = "CR", "1.2.840.10008.5.1.4.1.1.1"  # a CR compressed the same way
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(tmp_path / "lossless.dcm")
    ds.decompress()  # the same image, uncompressed: lossless means identical served pixels
    ds.save_as(tmp_path / "uncompressed.dcm")
    loaded = load_image(tmp_path / "lossless.dcm")
    assert loaded.pixels.shape == (768, 1024) and loaded.pixels.max() > 0
    np.testing.assert_array_equal(loaded.pixels, load_image(tmp_path / "uncompressed.dcm").pixels)
    assert pydicom.uid.JPEGLosslessSV1 in transfer_syntaxes()  # and the DICOM node accepts it


def test_a_file_its_bytes_and_its_dataset_load_alike(uncompressed):
    """load_image takes a path, the file's content or a pydicom dataset (WADO-RS, C-STORE: no temporary file)."""
    path = get_testdata_file("RG1_UNCR.dcm")
    from_bytes = load_image(Path(path).read_bytes(), name="wado")
    from_dataset = load_image(pydicom.dcmread(path))
    for loaded in (from_bytes, from_dataset):
        assert np.array_equal(loaded.pixels, uncompressed.pixels)
        assert loaded.hint == uncompressed.hint and loaded.image_id == uncompressed.image_id
        assert loaded.dataset is not None
    with pytest.raises(InputError, match="^wado: empty file"):
        load_image(b"", name="wado")
    with pytest.raises(InputError, match="^<bytes>: not a DICOM file"):
        load_image(b"not an image at all" * 20)
