"""Hostile images: encapsulated DICOM frames larger than their header, and corrupt JPEGs that
libjpeg would fill with grey. Each file is built here from a generated picture (or a real one where said);
nothing is committed."""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from openjpeg.utils import encode_array
from PIL import Image
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from tests.hostile_files import cut_with_eoi, dicom, j2k_with_siz_size, scan_zeroed, with_sof_size
from xrayfm.data.images import colour_thumbnail, image_info, read_image, read_image_resized
from xrayfm.errors import ImageDecodeError, ImageTooLargeError

GATEWAY_MAX_PIXELS = 60_000_000  # the gateway's default limit (XRAYFM_MAX_PIXELS)
FAST = 0.5  # seconds: a generous bound for a refusal that reads headers only


# -- builders ---------------------------------------------------------------------------------------------
def picture(height: int = 224, width: int = 224, seed: int = 0, noise: float = 4) -> np.ndarray:
    """A grey radiograph-like picture: gradient, a bright ellipse, noise (so that JPEG has data to code)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ellipse = ((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2 < 1
    img = 30 + 80 * yy / height + 110 * ellipse + rng.normal(0, noise, (height, width))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def refused_fast(reader: Callable[[bytes], object], data: bytes, error: type[Exception]) -> str:
    """Call `reader(data)`, expect `error` (exactly that class) within FAST seconds; its message."""
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        reader(data)
    elapsed = time.perf_counter() - start
    assert type(info.value) is error, info.value
    assert elapsed < FAST, f"refusal took {elapsed:.2f} s"
    return str(info.value)


READERS = {
    "read_image": lambda data: read_image(data, max_pixels=GATEWAY_MAX_PIXELS),
    "image_info": image_info,  # without a limit, as the gateway calls it (the library default applies)
    "read_image_resized": lambda data: read_image_resized(data, 224, max_pixels=GATEWAY_MAX_PIXELS),
}


# -- frames larger than their header ---------------------------------------------------------------------
@pytest.mark.parametrize("reader", READERS)
def test_a_15000_pixel_j2k_frame_in_a_64_pixel_header_is_too_large(reader):
    codestream = j2k_with_siz_size(encode_array(picture(64, 64)), 15000, 15000)
    data = dicom(codestream, JPEG2000Lossless, 64, 64)
    assert len(data) < 10_000  # a few KB: a small file is the attack
    message = refused_fast(READERS[reader], data, ImageTooLargeError)
    assert "15000x15000" in message and "64x64" in message


@pytest.mark.parametrize("reader", READERS)
def test_a_15000_pixel_jpeg_frame_in_a_64_pixel_header_is_too_large(reader):
    frame = with_sof_size(jpeg(picture(64, 64)), 15000, 15000)
    message = refused_fast(READERS[reader], dicom(frame, JPEGBaseline8Bit, 64, 64), ImageTooLargeError)
    assert "15000x15000" in message and "64x64" in message


def test_a_jpeg_ls_frame_is_measured_from_its_sof55():
    """No JPEG-LS encoder here: a hand-made SOF55 + SOS header stands for the frame (never decoded)."""
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, 15000, 15000, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x00\x00"
    frame = b"\xff\xd8" + sof55 + sos + bytes(64) + b"\xff\xd9"
    message = refused_fast(image_info, dicom(frame, JPEGLSLossless, 64, 64), ImageTooLargeError)
    assert "15000x15000" in message


@pytest.mark.parametrize("reader", READERS)
def test_a_frame_of_another_size_than_the_header_is_corrupt(reader):
    for frame, syntax in (
        (jpeg(picture(96, 128)), JPEGBaseline8Bit),
        (encode_array(picture(96, 128)), JPEG2000Lossless),
    ):
        message = refused_fast(READERS[reader], dicom(frame, syntax, 64, 64), ImageDecodeError)
        assert "128x96" in message and "64x64" in message


def test_a_jp2_file_frame_is_measured_from_its_codestream_box():
    buf = io.BytesIO()
    Image.fromarray(picture(96, 128)).save(buf, format="JPEG2000")  # a JP2 file (boxes), not a codestream
    assert buf.getvalue()[4:8] == b"jP  "
    message = refused_fast(image_info, dicom(buf.getvalue(), JPEG2000Lossless, 64, 64), ImageDecodeError)
    assert "128x96" in message


def test_an_rle_frame_that_decodes_to_far_more_than_its_header_is_refused():
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    segment = b"\x81\x00" * 1000  # 1,000 runs of 128 zeros: 128,000 bytes for a 64 x 64 plane
    message = refused_fast(read_image, dicom(header + segment, RLELossless, 64, 64), ImageDecodeError)
    assert "RLE" in message


# -- corrupt JPEGs ---------------------------------------------------------------------------------------
CORRUPTIONS = {
    "scan zeroed": scan_zeroed,
    "cut at 60 % with EOI": cut_with_eoi,
    "cut at 60 % without EOI": lambda data: data[: int(len(data) * 0.6)],
    "SOF enlarged to 2000 x 2000": lambda data: with_sof_size(data, 2000, 2000),
    "SOF enlarged to 7000 x 7000": lambda data: with_sof_size(data, 7000, 7000),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
def test_corrupt_jpegs_are_refused(corruption, colour):
    pixels = picture()
    if colour:
        pixels = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1)  # YCbCr 4:2:0, one scan
    data = CORRUPTIONS[corruption](jpeg(pixels))
    for reader in (READERS["read_image"], READERS["read_image_resized"]):
        with pytest.raises(ImageDecodeError) as info:
            reader(data)
        assert type(info.value) is ImageDecodeError, info.value
    if colour:
        with pytest.raises(ImageDecodeError):
            colour_thumbnail(data)


def test_zeros_that_fill_the_image_before_the_data_ends_are_refused():
    """All-zero bits decode as valid codes (about 24 bytes an 8 x 8 block with the standard tables): in a
    dense JPEG the zeros fill the image with data to spare, which libjpeg skips with a warning only."""
    data = jpeg(picture(noise=25))
    assert len(data) > 224 * 224 * 24 / 64  # more than 24 bytes a block: the zeros outlast the image
    for bad in (scan_zeroed(data), data[:-2] + bytes(4000) + b"\xff\xd9"):  # zeroed; zeros appended
        with pytest.raises(ImageDecodeError, match="before its data ends"):
            read_image(bad)
    frame = dicom(scan_zeroed(data), JPEGBaseline8Bit, 224, 224)
    with pytest.raises(ImageDecodeError, match="before its data ends"):
        read_image(frame)


def test_a_sof_enlarged_far_beyond_its_data_is_refused_before_decoding():
    data = with_sof_size(jpeg(picture()), 7000, 7000)
    assert "pixels a byte" in refused_fast(READERS["read_image"], data, ImageDecodeError)
    assert image_info(data)["width"] == 7000  # the header alone is readable; the limit is the gateway's


def test_a_cut_jpeg_frame_inside_a_dicom_is_refused():
    data = dicom(cut_with_eoi(jpeg(picture())), JPEGBaseline8Bit, 224, 224)
    assert image_info(data)["width"] == 224
    with pytest.raises(ImageDecodeError, match="ends before the image is complete"):
        read_image(data)


# -- valid images still decode ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}, {"optimize": True}])
def test_valid_jpegs_decode_exactly_as_pillow_does(options):
    for pixels in (picture(), np.stack([picture(), picture(seed=1), picture(seed=2)], axis=-1)):
        data = jpeg(pixels, **options)
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        np.testing.assert_array_equal(read_image(data), expected)


def test_valid_encapsulated_frames_decode():
    pixels = picture(96, 128)
    j2k = dicom(encode_array(pixels), JPEG2000Lossless, 96, 128)
    ds = pydicom.dcmread(io.BytesIO(j2k))
    ds.decompress()
    native = io.BytesIO()
    ds.save_as(native, enforce_file_format=True)
    expected = read_image(native.getvalue())
    np.testing.assert_array_equal(read_image(j2k), expected)
    ds.compress(RLELossless)
    rle = io.BytesIO()
    ds.save_as(rle, enforce_file_format=True)
    np.testing.assert_array_equal(read_image(rle.getvalue()), expected)
    frame = jpeg(pixels)
    by_pillow = np.asarray(Image.open(io.BytesIO(frame)), dtype=float)
    lo, hi = by_pillow.min(), by_pillow.max()  # a DICOM without a window is scaled to its own range
    from_jpeg = read_image(dicom(frame, JPEGBaseline8Bit, 96, 128)).astype(float)
    # decoded by pydicom's plugin (libjpeg), not Pillow's libjpeg-turbo: close, not equal
    assert np.abs(from_jpeg - (by_pillow - lo) * 255 / (hi - lo)).max() <= 3


@pytest.mark.real_data
def test_real_images_of_each_kind_still_decode(shared_data):
    files = [
        shared_data / "dicom-radiographs" / "RG1_J2KI.dcm",
        shared_data / "dicom-radiographs" / "RG3_UNCR.dcm",
        next((shared_data / "kermany-pneumonia" / "chest_xray" / "train" / "NORMAL").glob("*.jpeg")),
        next((shared_data / "nih-cxr14-1000-64" / "images").glob("*.png")),
        next((shared_data / "mura-humerus-64").rglob("*.jpg")),  # colour JPEG
    ]
    for path in files:
        info = image_info(path, max_pixels=GATEWAY_MAX_PIXELS)
        assert read_image(path, max_pixels=GATEWAY_MAX_PIXELS).shape == (info["height"], info["width"])
