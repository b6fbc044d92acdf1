"""Tests of xrayfm.data.images: decoding JPEG/PNG/DICOM to one grey uint8 channel, fitting, errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from xrayfm.data.images import (
    SUPPORTED_SUFFIXES,
    fit_square,
    image_info,
    read_image,
    read_image_resized,
    without_metadata,
)
from xrayfm.errors import ImageDecodeError

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# -- fixtures built here ---------------------------------------------------------------------------------
def phantom(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth grey picture with structure (gradient, a bright disc, mild noise), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = 40 + 120 * xx / max(width - 1, 1) + 40 * yy / max(height - 1, 1)
    disc = (yy - height * 0.4) ** 2 + (xx - width * 0.55) ** 2 < (min(height, width) * 0.2) ** 2
    img = img + 60 * disc + rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grey) followed by a tiny IDAT: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    preamble: bool = True,
    **tags,
) -> bytes:
    """A minimal CR DICOM (explicit VR little endian) with the given uint8/uint16 pixels and extra tags."""
    pixels = np.ascontiguousarray(pixels)
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYNTH-001"
    frames = pixels.shape[0] if pixels.ndim == 3 and photometric.startswith("MONO") else 1
    rows, cols = pixels.shape[-2:] if photometric.startswith("MONO") else pixels.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1 if photometric.startswith("MONO") else 3
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


# -- JPEG / PNG ------------------------------------------------------------------------------------------
def test_supported_suffixes_are_lowercase_dotted():
    assert {".jpg", ".jpeg", ".png", ".dcm"} <= set(SUPPORTED_SUFFIXES)
    assert all(s.startswith(".") and s == s.lower() for s in SUPPORTED_SUFFIXES)


def test_grey_png_roundtrips_exactly(tmp_path):
    img = phantom()
    out = read_image(write(tmp_path / "a.png", encode(Image.fromarray(img), "PNG")))
    assert out.dtype == np.uint8 and out.ndim == 2
    np.testing.assert_array_equal(out, img)


def test_grey_jpeg_is_close_to_source(tmp_path):
    img = phantom()
    out = read_image(write(tmp_path / "a.jpg", encode(Image.fromarray(img), "JPEG", quality=95)))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 2.0


def test_format_comes_from_content_not_name(tmp_path):
    img = phantom()
    path = write(tmp_path / "really_a_png.jpg", encode(Image.fromarray(img), "PNG"))
    np.testing.assert_array_equal(read_image(path), img)
    assert image_info(path)["format"] == "PNG"


def test_16bit_png_uses_its_own_range_and_keeps_contrast(tmp_path):
    base = phantom().astype(np.float64)
    values = (1000 + base / 255 * 3000).round().astype(np.uint16)  # uses only 1000..4000 of 0..65535
    out = read_image(write(tmp_path / "a16.png", encode(Image.fromarray(values), "PNG")))
    assert out.dtype == np.uint8 and out.shape == values.shape
    assert out.min() == 0 and out.max() == 255  # full contrast, not values / 256 (which would top out at 15)
    expected = (values.astype(float) - values.min()) / (values.max() - values.min()) * 255
    assert np.abs(out - expected).max() <= 0.5 + 1e-6
    assert image_info(tmp_path / "a16.png")["bit_depth"] == 16


def test_rgb_encoded_grey_equals_grey(tmp_path):
    img = phantom()
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    out = read_image(encode(Image.fromarray(rgb, "RGB"), "PNG"))
    np.testing.assert_array_equal(out, img)


def test_rgb_colour_becomes_luminance():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (255, 0, 0)  # pure red is darker than pure green in luminance
    rgb[:, 3:] = (0, 255, 0)
    out = read_image(encode(Image.fromarray(rgb, "RGB"), "PNG"))
    assert out.shape == (4, 6)
    assert 0 < out[0, 0] < out[0, 5] < 255


def test_rgba_opaque_equals_grey_and_transparent_is_black():
    img = phantom()
    rgba = np.dstack([img, img, img, np.full_like(img, 255)])
    np.testing.assert_array_equal(read_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")), img)
    rgba[:, : img.shape[1] // 2, 3] = 0
    out = read_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.ndim == 2
    assert (out[:, : img.shape[1] // 2] == 0).all()
    np.testing.assert_array_equal(out[:, img.shape[1] // 2 :], img[:, img.shape[1] // 2 :])


def test_grey_alpha_png_half_transparent_halves_the_value():
    la = np.dstack([np.full((5, 5), 200, np.uint8), np.full((5, 5), 128, np.uint8)])
    out = read_image(encode(Image.fromarray(la, "LA"), "PNG"))
    assert np.abs(out.astype(int) - round(200 * 128 / 255)).max() <= 1


def test_palette_png_decodes_to_its_grey_values():
    img = phantom()
    pal = Image.fromarray(img).convert("P")  # a grey palette: every index maps to R=G=B
    out = read_image(encode(pal, "PNG"))
    expected = np.asarray(pal.convert("RGB"))[:, :, 0]
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - img).mean() < 1.0


def test_bytes_and_path_give_identical_arrays(tmp_path):
    img = phantom()
    for name, data in {
        "a.png": encode(Image.fromarray(img), "PNG"),
        "a.jpg": encode(Image.fromarray(img), "JPEG", quality=90),
        "a.dcm": make_dicom(img.astype(np.uint16) * 16, bits_stored=12),
    }.items():
        path = write(tmp_path / name, data)
        from_path, from_bytes = read_image(path), read_image(data)
        np.testing.assert_array_equal(from_path, from_bytes)
        np.testing.assert_array_equal(read_image(str(path)), from_bytes)
        np.testing.assert_array_equal(read_image(bytearray(data)), from_bytes)


def test_exif_orientation_is_applied():
    img = phantom(height=30, width=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    data = encode(Image.fromarray(img), "PNG", exif=exif)
    out = read_image(data)
    np.testing.assert_array_equal(out, np.rot90(img, k=-1))
    assert (image_info(data)["width"], image_info(data)["height"]) == (30, 50)


def test_without_metadata_drops_text_and_exif_and_keeps_the_pixels():
    img = phantom(height=40, width=70)
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "Doe^Jane")
    exif = Image.Exif()
    exif[0x010E] = "Doe^Jane"  # ImageDescription
    files = {
        "PNG": encode(Image.fromarray(img), "PNG", pnginfo=info, exif=exif),
        "JPEG": encode(Image.fromarray(img), "JPEG", exif=exif, comment=b"Doe^Jane", quality=95),
    }
    for kind, data in files.items():
        assert b"Doe^Jane" in data
        stripped = without_metadata(data)
        assert stripped is not None and b"Doe^Jane" not in stripped and len(stripped) < len(data), kind
        np.testing.assert_array_equal(read_image(stripped), read_image(data))
        assert image_info(stripped)["format"] == kind


def test_without_metadata_loses_the_exif_orientation_and_refuses_what_it_cannot_walk():
    img = phantom(height=30, width=50)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(Image.fromarray(img), "JPEG", exif=exif, quality=95)
    assert (
        read_image(without_metadata(rotated)).shape == (30, 50) != read_image(rotated).shape
    )  # callers check
    png = encode(Image.fromarray(img), "PNG")
    assert without_metadata(png[:-20]) is None  # truncated: no IEND
    assert without_metadata(rotated[:3] + b"\x00" * 10) is None  # not a marker where one must be
    assert without_metadata(b"DICM" * 40) is None


def test_image_info_reports_header_facts_without_pixels(tmp_path):
    img = phantom(height=40, width=70)
    info = image_info(write(tmp_path / "x.jpg", encode(Image.fromarray(img), "JPEG")))
    assert info == {
        "format": "JPEG", "width": 70, "height": 40, "bit_depth": 8, "channels": 1, "mode": "L", "orientation": 1
    }  # fmt: skip


# -- fit_square / read_image_resized ---------------------------------------------------------------------
def tall_with_bands(height: int = 400, width: int = 100, band: int = 12) -> np.ndarray:
    img = np.full((height, width), 60, np.uint8)
    img[:band] = 255
    img[-band:] = 255
    return img


@pytest.mark.parametrize("mode", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(400, 100), (100, 400), (50, 50), (7, 300)])
def test_fit_square_shapes(mode, shape):
    out = fit_square(np.full(shape, 100, np.uint8), 64, mode)
    assert out.shape == (64, 64) and out.dtype == np.uint8


def test_fit_square_pad_keeps_all_content_and_letterboxes_black():
    out = fit_square(tall_with_bands(), 64, "pad")  # 400x100 -> 64x16 centred in 64x64
    cols = slice(24, 40)
    assert out[:, :23].max() == 0 and out[:, 41:].max() == 0  # letterbox
    assert out[0, cols].min() > 200 and out[-1, cols].min() > 200  # top and bottom bands survive
    assert abs(int(np.median(out[32, cols])) - 60) <= 2  # the middle keeps its grey level


def test_fit_square_crop_cuts_the_long_side_and_stretch_keeps_both_ends():
    img = tall_with_bands()
    crop = fit_square(img, 64, "crop")
    assert crop.max() < 100  # the bands at the ends of the long side were cropped away
    assert (crop > 0).all()  # no letterbox
    stretch = fit_square(img, 64, "stretch")
    assert stretch[0].min() > 200 and stretch[-1].min() > 200 and (stretch > 0).all()


def test_fit_square_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        fit_square(np.zeros((4, 4), np.uint8), 8, "zoom")
    with pytest.raises(ValueError, match="size"):
        fit_square(np.zeros((4, 4), np.uint8), 0)
    with pytest.raises(ValueError, match="2-D uint8"):
        fit_square(np.zeros((4, 4, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="mode"):
        read_image_resized(b"irrelevant", 8, "zoom")


def test_read_image_resized_matches_fit_square_for_png():
    img = phantom(height=120, width=90)
    data = encode(Image.fromarray(img), "PNG")
    for mode in ("pad", "crop", "stretch"):
        np.testing.assert_array_equal(read_image_resized(data, 32, mode), fit_square(img, 32, mode))


def test_draft_mode_resize_of_large_jpeg_is_close_to_full_decode(tmp_path, monkeypatch):
    big = phantom(height=2000, width=1600, seed=1)
    path = write(tmp_path / "big.jpg", encode(Image.fromarray(big), "JPEG", quality=90))
    drafted_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        drafted_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for mode in ("pad", "crop"):
        fast = read_image_resized(path, 224, mode)
        full = fit_square(read_image(path), 224, mode)
        assert fast.shape == (224, 224) and fast.dtype == np.uint8
        assert np.abs(fast.astype(int) - full).mean() < 1.5, mode
    # libjpeg really decoded at reduced scale (1/4 here), still at least the target size on both sides
    assert drafted_sizes and all(224 <= min(s) and max(s) < 1000 for s in drafted_sizes)


# -- DICOM -----------------------------------------------------------------------------------------------
def ramp16(height: int = 40, width: int = 64, top: int = 4000) -> np.ndarray:
    """A horizontal ramp 0..top with a brighter square, uint16."""
    img = np.tile(np.linspace(0, top, width), (height, 1))
    img[10:20, 10:20] = top
    return img.round().astype(np.uint16)


def test_dicom_monochrome2_without_voi_uses_own_range():
    pixels = ramp16()
    out = read_image(make_dicom(pixels, bits_stored=12))
    expected = pixels / pixels.max() * 255
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    assert np.abs(out - expected).max() <= 0.5 + 1e-6


def test_dicom_monochrome1_is_inverted():
    pixels = ramp16()
    mono2 = read_image(make_dicom(pixels, "MONOCHROME2", bits_stored=12))
    mono1 = read_image(make_dicom(pixels, "MONOCHROME1", bits_stored=12))
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))
    assert mono1[:, 0].mean() > 250 and mono1[:, -1].mean() < 5  # low stored value = bright in MONOCHROME1


def dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window to 0..255, written out independently of pydicom."""
    c, w = center - 0.5, width - 1
    return np.clip(((values - c) / w + 0.5) * 255, 0, 255)


def test_dicom_rescale_then_window_are_applied():
    stored = ramp16(top=4000)
    # modality values = 2 * stored - 1000; the window [2000, 4000] in modality units = stored 1500..2500
    data = make_dicom(
        stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2000
    )
    out = read_image(data)
    expected = dicom_window(2.0 * stored - 1000, 3000, 2000)
    assert np.abs(out - expected).max() <= 1.0
    assert (out[stored <= 1500] == 0).all() and (out[stored >= 2500] == 255).all()


def test_dicom_window_on_monochrome1_is_inverted_after_windowing():
    stored = ramp16(top=1000)
    out = read_image(make_dicom(stored, "MONOCHROME1", bits_stored=10, WindowCenter=500, WindowWidth=400))
    expected = 255 - dicom_window(stored.astype(float), 500, 400)
    assert np.abs(out - expected).max() <= 1.0


def test_dicom_voi_lut_sequence_is_applied():
    stored = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(
        "LUTData", "US", list(range(255, -1, -1))
    )  # inverting LUT: the picture must come out inverted
    data = make_dicom(stored, bits_stored=8, VOILUTSequence=pydicom.Sequence([item]))
    np.testing.assert_array_equal(read_image(data).astype(int), 255 - stored.astype(int))


def test_dicom_multiframe_takes_first_frame():
    frames = np.stack([ramp16(), ramp16()[:, ::-1]])
    out = read_image(make_dicom(frames, bits_stored=12))
    np.testing.assert_array_equal(out, read_image(make_dicom(frames[0], bits_stored=12)))
    assert out[:, 0].mean() < out[:, -1].mean()


def test_dicom_rle_compressed_decodes_like_uncompressed():
    pixels = ramp16()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels, bits_stored=12)))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert image_info(buf.getvalue())["transfer_syntax"] == "RLE Lossless"
    np.testing.assert_array_equal(read_image(buf.getvalue()), read_image(make_dicom(pixels, bits_stored=12)))


def test_dicom_without_preamble_is_read(tmp_path):
    pixels = ramp16()
    raw = make_dicom(pixels, bits_stored=12, preamble=False)
    assert raw[128:132] != b"DICM"
    path = write(tmp_path / "no_preamble", raw)
    np.testing.assert_array_equal(read_image(path), read_image(make_dicom(pixels, bits_stored=12)))


def test_dicom_rgb_becomes_luminance():
    img = phantom(height=20, width=24)
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_image(make_dicom(rgb, "RGB")), img)


def test_dicom_info_has_no_patient_fields():
    info = image_info(make_dicom(ramp16(), "MONOCHROME1", bits_stored=12))
    assert info["format"] == "DICOM" and info["photometric"] == "MONOCHROME1" and info["bit_depth"] == 12
    assert (info["width"], info["height"], info["frames"]) == (64, 40, 1)
    text = repr(info).lower()
    assert "synth" not in text and "patient" not in text


# -- errors ----------------------------------------------------------------------------------------------
def assert_decode_error(source, name: str, match: str, **kwargs) -> None:
    with pytest.raises(ImageDecodeError) as excinfo:
        read_image(source, **kwargs)
    message = str(excinfo.value)
    assert name in message, message
    assert match in message.lower(), message


def test_pillow_truncated_loading_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file(tmp_path):
    assert_decode_error(tmp_path / "nope.jpg", str(tmp_path / "nope.jpg"), "not found")


def test_directory(tmp_path):
    assert_decode_error(tmp_path, str(tmp_path), "directory")


def test_empty_bytes_and_empty_file(tmp_path):
    assert_decode_error(b"", "<upload>", "empty")
    assert_decode_error(write(tmp_path / "empty.png", b""), str(tmp_path / "empty.png"), "empty")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images(tmp_path, fmt):
    data = encode(Image.fromarray(phantom(200, 200)), fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    assert_decode_error(path, str(path), "truncated")
    assert_decode_error(data[: len(data) // 2], "<upload>", "truncated")


def test_truncated_dicom_pixel_data(tmp_path):
    data = make_dicom(ramp16(), bits_stored=12)
    path = write(tmp_path / "cut.dcm", data[:-500])
    assert_decode_error(path, str(path), "dicom")


def test_random_garbage_and_text(tmp_path):
    garbage = b"\x13\x37" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_decode_error(write(tmp_path / "g.jpg", garbage), str(tmp_path / "g.jpg"), "unsupported")
    text = write(tmp_path / "notes.png", b"this is a text file, not an image\n" * 10)
    assert_decode_error(text, str(text), "unsupported")


def test_dicom_without_pixel_data_is_unsupported():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(ramp16(), bits_stored=12)))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert_decode_error(buf.getvalue(), "<upload>", "no dicom pixel data")


def test_png_decompression_bomb_is_refused_from_header(tmp_path):
    path = write(tmp_path / "bomb.png", png_with_header(100_000, 100_000))
    assert_decode_error(path, str(path), "too large")
    small = write(tmp_path / "small_claim.png", png_with_header(5_000, 5_000))
    assert_decode_error(small, str(small), "too large", max_pixels=1_000_000)


def test_max_pixels_is_checked_for_every_format():
    img = phantom(100, 100)
    for data in (encode(Image.fromarray(img), "JPEG"), make_dicom(img.astype(np.uint16), bits_stored=8)):
        assert_decode_error(data, "<upload>", "too large", max_pixels=9_999)
        assert read_image(data, max_pixels=10_000).shape == (100, 100)


def test_dicom_bomb_header_is_refused_before_decoding():
    # The header claims 60000 x 60000 but carries a few bytes: the size check must come first.
    data = make_dicom(np.zeros((4, 4), np.uint16), bits_stored=12)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = 60_000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert_decode_error(buf.getvalue(), "<upload>", "too large")


def test_zero_size_png():
    assert_decode_error(png_with_header(0, 10), "<upload>", "header")


# -- real data -------------------------------------------------------------------------------------------
def region(image: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    """Median grey level of a box given as fractions of the height and width."""
    h, w = image.shape
    return float(np.median(image[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)]))


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["RG1", "RG3"])
def test_real_dicom_uncompressed_and_jpeg2000_agree(shared_data, name):
    folder = shared_data / "dicom-radiographs"
    uncompressed = read_image(folder / f"{name}_UNCR.dcm")
    j2k = read_image(folder / f"{name}_J2KI.dcm")
    assert uncompressed.shape == j2k.shape and uncompressed.dtype == np.uint8
    assert uncompressed.std() > 20  # a real picture, not a flat field
    # J2KI is lossy JPEG 2000 (PROVENANCE.md; about 10:1 for RG1, 30:1 for RG3): the errors it adds are a
    # small fraction of the window, so after 8-bit display mapping the two must agree to about a grey level
    # on average, and almost no pixel may be off by more than a few levels.
    diff = np.abs(uncompressed.astype(int) - j2k)
    assert diff.mean() < 1.0
    assert (diff > 4).mean() < 0.001


@pytest.mark.real_data
def test_real_chest_dicom_is_not_inverted(shared_data):
    # RG1 is a PA chest (MONOCHROME1): the air-filled lungs must come out darker than the
    # spine/mediastinum column between them.
    img = read_image(shared_data / "dicom-radiographs" / "RG1_UNCR.dcm")
    mediastinum = region(img, (0.2, 0.5), (0.44, 0.54))
    right_lung, left_lung = region(img, (0.2, 0.5), (0.12, 0.35)), region(img, (0.2, 0.5), (0.63, 0.85))
    assert mediastinum > right_lung + 30 and mediastinum > left_lung + 30


@pytest.mark.real_data
def test_real_tibia_dicom_is_not_inverted(shared_data):
    # RG3 is a lower leg (MONOCHROME1): the tibia shaft must be much brighter than the open-field air
    # strip beside the leg, and the soft tissue between them in between.
    img = read_image(shared_data / "dicom-radiographs" / "RG3_UNCR.dcm")
    air, soft, bone = (region(img, (0.1, 0.6), cols) for cols in ((0.29, 0.34), (0.40, 0.42), (0.46, 0.50)))
    assert bone > air + 100
    assert air < soft < bone


@pytest.mark.real_data
def test_real_chexpert_jpeg(shared_data):
    path = next((shared_data / "chexpert-small-valid" / "CheXpert-v1.0-small" / "valid").glob("*/*/*.jpg"))
    img = read_image(path)
    assert img.ndim == 2 and img.dtype == np.uint8 and min(img.shape) == 320
    np.testing.assert_array_equal(img, np.asarray(Image.open(path)))  # 8-bit grey JPEG: values untouched
    assert read_image_resized(path, 224).shape == (224, 224)


@pytest.mark.real_data
def test_real_mura_rgb_jpeg(shared_data):
    path = next((shared_data / "mura-humerus-64" / "MURA-v1.1" / "valid").glob("XR_HUMERUS/*/*/*.jpg"))
    assert image_info(path)["channels"] == 3  # stored as RGB-encoded grey
    img = read_image(path)
    assert img.shape == (64, 64) and img.dtype == np.uint8 and img.std() > 5
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    for channel in range(3):  # grey picture: the luminance is within a couple of levels of every channel
        assert np.abs(img - rgb[:, :, channel]).mean() < 2.0
