"""Decode radiographs (JPEG, PNG, DICOM) from a path or uploaded bytes to ONE grey uint8 channel.

One path serves training, the preprocessing cache and the REST API, so that a model sees the same
pixels everywhere. The format is detected from the content (magic bytes), never from the file name.

Grey-level choices (documented here once):

* 8-bit grey is kept as is; colour (RGB, YCbCr, CMYK, palette) becomes luminance (ITU-R 601-2, PIL's
  ``convert("L")``), so an RGB-encoded grey picture gives exactly its grey values.
* Alpha is composited over black (transparent = background = dark, like air on a radiograph).
* 16-bit PNG (and any other high-bit-depth data without a display transform) is scaled linearly from the
  image's own min..max to 0..255: files rarely use the full 0..65535 range, so dividing by 256 would throw
  most of the contrast away. A constant image becomes all zeros.
* DICOM: modality LUT (rescale slope/intercept), then the VOI LUT or window centre/width when present
  (pydicom), whose output range is mapped to 0..255; without a VOI transform the own-range rule above is
  used. MONOCHROME1 is inverted so that bone is bright, like MONOCHROME2. Only the first frame is read,
  and only the image-pixel and LUT tags are parsed: patient fields are never read.
* EXIF orientation (phone photos of films sent to the API) is applied to JPEG/PNG.

Hostile files are refused before their pixels are decoded: a size over `max_pixels` (a DICOM's from its
encapsulated frame's own header too, which must match Rows x Columns), a JPEG that declares more pixels
than its data can hold; and a JPEG whose scan does not fill the image exactly fails to load, where libjpeg
would paint the rest grey (see `_JpegScan`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.encaps import get_frame
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, pixel_array
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from xrayfm.errors import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError, XrayfmError

try:  # ISA-L's deflate (the gateway installs it: it draws every answer's heatmap); the same format as zlib's
    from isal import isal_zlib as deflate
except ImportError:  # elsewhere (the web UI, the workers) zlib writes the same PNGs, more slowly
    import zlib as deflate

# pydicom reports a malformed value by quoting it, as a warning and on its logger. Values of an uploaded
# file (UIDs, names, dates) may identify a patient and must never reach a log, so both are silenced for
# every pydicom module, process-wide (only pixel and LUT tags are parsed here in the first place).
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
logging.getLogger("pydicom").propagate = False

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
RESIZE_MODES: tuple[str, ...] = ("pad", "crop", "stretch")
DEFAULT_MAX_PIXELS = 100_000_000

Source = str | os.PathLike[str] | bytes | bytearray | memoryview

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A DICOM file without the 128-byte preamble starts with its first element; a minimal dataset's first
# group is one of these (file meta, identification, patient, acquisition, relationship, image pixel).
# The gate keeps arbitrary bytes away from pydicom's permissive `force=True` parser.
_RAW_DICOM_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
# Only these tags are parsed from a DICOM: pixel module, LUTs, and a few technical header fields.
_DICOM_TAGS = [
    "Modality", "BodyPartExamined", "ViewPosition", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence", "PresentationLUTShape",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelData",
]  # fmt: skip
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# -- public API -------------------------------------------------------------------------------------------
def to_png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an HxWx3 (or HxW) uint8 array as PNG bytes: every row with PNG's "Up" filter, deflated at
    level 1 by ISA-L (``isal``) when installed, else zlib.

    A heatmap is encoded on every answer, so this is on the request path. Pillow chooses a filter for each
    row by trying all five, and offers no way to fix one; one filter (Up: each byte minus the byte above,
    which suits smooth maps) is cheaper and gives smaller files on drawn maps. ISA-L's deflate (the same
    format, any inflater reads it), used where ``isal`` is installed (the gateway), is faster than zlib at
    the same level and writes files of about the same size. Any PNG reader decodes it
    (tests/explain/test_explain_overlay.py reads it back with Pillow)."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise XrayfmError(f"expected a uint8 HxW or HxWx3 array, got {arr.dtype} {arr.shape}")
    height, width = arr.shape[:2]
    if height == 0 or width == 0:
        raise XrayfmError(f"cannot encode an empty image of shape {arr.shape} as PNG")
    rows = arr.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # the filter type of each row: 2, Up
    filtered[0, 1:] = rows[0]  # the first row's "above" is zero
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps around, modulo 256 as PNG wants
    colour = 0 if arr.ndim == 2 else 2  # grey, or RGB; 8 bits; no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", deflate.compress(filtered.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", deflate.crc32(kind + data))


def without_metadata(data: bytes) -> bytes | None:
    """The PNG or JPEG file `data` with its metadata cut out, or None (another format, or malformed).

    PNG keeps its critical chunks and tRNS (text, EXIF, time and the other ancillary chunks go); JPEG keeps
    its JFIF and Adobe segments, tables and scans (EXIF, XMP, ICC, IPTC and comments go). Hand-written:
    Pillow re-encodes to drop metadata, which costs more than the bytes saved. Pixels may still differ
    where the dropped metadata mattered to decoding (EXIF orientation): a caller that needs the same
    pixels checks by decoding the result.
    """
    try:
        if data.startswith(_PNG_MAGIC):
            return _png_without_metadata(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_without_metadata(data)
    except (IndexError, struct.error):
        return None
    return None


def _png_without_metadata(data: bytes) -> bytes | None:
    out, pos = [_PNG_MAGIC], len(_PNG_MAGIC)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind[:1].isupper() or kind == b"tRNS":  # critical chunks (IHDR, PLTE, IDAT, IEND) and alpha
            out.append(data[pos:end])
        if kind == b"IEND":
            return b"".join(out)
        pos = end
    return None


_JPEG_KEEP_APP = {0xE0, 0xEE}  # JFIF; Adobe (its transform flag changes how colours decode)


def _jpeg_without_metadata(data: bytes) -> bytes | None:
    out, pos = [data[:2]], 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the rest is image data (later segments are rare)
            out.append(data[pos:])
            return b"".join(out)
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        if not ((0xE0 <= marker <= 0xEF and marker not in _JPEG_KEEP_APP) or marker == 0xFE):
            out.append(data[pos:end])
        pos = end
    return None


def read_image(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a JPEG, PNG or DICOM (path or bytes) to a 2-D uint8 grey array.

    The format comes from the content (JPEG/PNG magic, 'DICM' at offset 128, or a preamble-less DICOM).
    Images with more than `max_pixels` pixels are refused from the header, before any pixel is decoded.
    Any failure raises `ImageDecodeError` naming the file (or "<upload>" for bytes).
    """
    return _decode(source, max_pixels=max_pixels, draft_size=None)


def read_image_resized(
    source: Source, size: int, mode: str = "pad", *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and fit to a `size` x `size` uint8 square (see `fit_square` for `mode`).

    A JPEG is decoded at reduced scale by libjpeg (PIL draft mode: the largest 1/2, 1/4, 1/8 reduction
    that keeps both sides >= `size`), which is much faster for large files; the rest is resized with PIL.
    """
    _check_fit_args(size, mode)
    return fit_square(_decode(source, max_pixels=max_pixels, draft_size=size), size, mode)


def colour_thumbnail(
    source: Source, side: int = 128, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray | None:
    """A small RGB uint8 copy (long side <= `side`) of a colour JPEG or PNG, for colour checks; None for a
    grey image or a DICOM (whose colour the header says). A JPEG is decoded at reduced scale (draft)."""
    with _opened(source) as (name, fp):
        kind = _sniff(fp, name)
        if kind == "DICOM":
            return None
        with _pil_open(fp, name, kind) as (im, scan):
            _check_size(name, *im.size, max_pixels)
            if scan is not None:
                _check_scan_density(name, scan.header)
            if im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16"):
                return None
            if kind == "JPEG":
                im.draft("RGB", (side, side))
            try:
                _load(im, scan, name)
                rgb = im.convert("RGB")
                rgb.thumbnail((side, side))
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
                raise ImageDecodeError(
                    f"{name}: cannot decode {kind} pixels (truncated or corrupt?): {exc}"
                ) from None
            return np.asarray(rgb)


def shape_within(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """(height, width) scaled, aspect kept, so that the long side is at most `side`; a shape that already
    fits, or `side` <= 0, is unchanged. The gateway's transport size and the worker's heatmap size."""
    height, width = int(shape[0]), int(shape[1])
    if side <= 0 or max(height, width) <= side:
        return height, width
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_square(image: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Resize a 2-D uint8 image to `size` x `size`.

    mode='pad' keeps the aspect ratio and letterboxes with black (never cuts anything: MURA has tall
    images); 'crop' keeps the aspect ratio and centre-crops the long side; 'stretch' ignores the aspect.
    """
    _check_fit_args(size, mode)
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"fit_square expects a 2-D uint8 array, got {getattr(image, 'dtype', type(image))} "
            f"with shape {getattr(image, 'shape', None)}"
        )
    height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"fit_square got an empty image of shape {image.shape}")
    pil = Image.fromarray(image)
    if mode == "stretch":
        return np.asarray(_resize(pil, (size, size)))
    if mode == "crop":
        side = min(height, width)
        left, top = (width - side) / 2, (height - side) / 2
        return np.asarray(_resize(pil, (size, size), box=(left, top, left + side, top + side)))
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(_resize(pil, (new_w, new_h)), ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


def image_info(source: Source, *, max_pixels: int | None = None) -> dict[str, Any]:
    """Technical header facts without decoding pixels: format, width, height, bit depth, channels...

    DICOM adds photometric interpretation, frames, transfer syntax and modality; no patient fields.
    Width and height are as `read_image` returns them (after EXIF orientation); PNG and JPEG say their EXIF
    `orientation` (1 when absent).
    """
    with _opened(source) as (name, fp):
        kind = _sniff(fp, name)
        if kind == "DICOM":
            ds = _read_dicom_header(fp, name)
            limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
            _check_dicom_frame(name, ds, limit, decoding=False)
            rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            info = {
                "format": "DICOM",
                "width": cols,
                "height": rows,
                "bit_depth": int(ds.get("BitsStored") or 0),
                "bits_allocated": int(ds.get("BitsAllocated") or 0),
                "channels": int(ds.get("SamplesPerPixel") or 1),
                "photometric": str(ds.get("PhotometricInterpretation", "")),
                "frames": int(ds.get("NumberOfFrames") or 1),
                "transfer_syntax": _transfer_syntax(ds).name,
                "modality": str(ds.get("Modality", "")),
                # what was imaged and from where (the domain gate compares them with the model's domain)
                "body_part": str(ds.get("BodyPartExamined", "")),
                "view_position": str(ds.get("ViewPosition", "")),
            }
        else:
            with _pil_open(fp, name, kind) as (im, _scan):
                width, height = im.size
                try:
                    orientation = im.getexif().get(0x0112, 1)
                except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
                    raise ImageDecodeError(f"{name}: corrupt {kind} metadata ({exc})") from None
                if orientation in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                    width, height = height, width
                info = {
                    "format": kind,
                    "width": width,
                    "height": height,
                    "bit_depth": 16 if im.mode.startswith("I;16") else 32 if im.mode in ("I", "F") else 8,
                    "channels": len(im.getbands()),
                    "mode": im.mode,
                    "orientation": int(orientation),  # EXIF (1: as stored)
                }
        if max_pixels is not None:
            _check_size(name, info["width"], info["height"], max_pixels)
        return info


# -- reading and sniffing ----------------------------------------------------------------------------------
@contextmanager
def _opened(source: Source) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield (name for messages, binary file object) for a path or bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield "<upload>", io.BytesIO(bytes(source))
        return
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"image source must be a path or bytes, got {type(source).__name__}")
    name = str(source)
    try:
        fp = open(Path(source), "rb")  # closed by the `with fp` below
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{name}: is a directory, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot open ({exc.strerror or exc})") from None
    with fp:
        yield name, fp


def _sniff(fp: IO[bytes], name: str) -> str:
    """'JPEG', 'PNG' or 'DICOM' from the first bytes; the file position is restored to 0."""
    head = fp.read(132)
    fp.seek(0)
    if not head:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    if head.startswith(_JPEG_MAGIC):
        return "JPEG"
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head[128:132] == b"DICM":
        return "DICOM"
    if len(head) >= 8 and (
        int.from_bytes(head[:2], "little") in _RAW_DICOM_GROUPS
        or int.from_bytes(head[:2], "big") in _RAW_DICOM_GROUPS
    ):
        return "DICOM"
    raise UnsupportedFormatError(
        f"{name}: unsupported format (not a JPEG, PNG or DICOM file; starts with {head[:8]!r})"
    )


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{name}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: image too large ({width}x{height} = {width * height:,} pixels > max_pixels "
            f"{max_pixels:,}); refusing to decode (possible decompression bomb)"
        )


def _decode(source: Source, *, max_pixels: int, draft_size: int | None) -> np.ndarray:
    with _opened(source) as (name, fp):
        kind = _sniff(fp, name)
        if kind == "DICOM":
            return _decode_dicom(fp, name, max_pixels)
        return _decode_pil(fp, name, kind, max_pixels, draft_size)


# -- JPEG / PNG (Pillow) -----------------------------------------------------------------------------------
@contextmanager
def _pil_open(fp: IO[bytes], name: str, kind: str) -> Iterator[tuple[Image.Image, _JpegScan | None]]:
    """Open the header with Pillow (restricted to the sniffed format); Pillow errors -> ImageDecodeError.

    A JPEG is read whole and handed to Pillow as a `_JpegScan` (the second item: load through it)."""
    scan = None
    if kind == "JPEG":
        try:
            fp = scan = _JpegScan(fp.read())
        except ValueError as exc:
            raise ImageDecodeError(f"{name}: cannot read JPEG header ({exc})") from None
    try:
        im = Image.open(fp, formats=[kind])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image too large, refusing to decode ({exc})") from None
    except UnidentifiedImageError:  # its message names a BytesIO object; say what it means instead
        raise ImageDecodeError(
            f"{name}: invalid {kind} header (zero-size, corrupt or unsupported variant)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageDecodeError(f"{name}: cannot read {kind} header ({exc})") from None
    with im:
        if scan is not None and im.size != (scan.header.width, scan.header.height):
            raise ImageDecodeError(
                f"{name}: corrupt JPEG: frame headers disagree ({scan.header.width}x{scan.header.height} "
                f"first, {im.size[0]}x{im.size[1]} last)"
            )
        yield im, scan


def _load(im: Image.Image, scan: _JpegScan | None, name: str) -> None:
    """Decode the pixels of an image opened by `_pil_open`: a JPEG through its `_JpegScan`."""
    if scan is None:
        im.load()
    else:
        scan.load(im, name)


def _decode_pil(fp: IO[bytes], name: str, kind: str, max_pixels: int, draft_size: int | None) -> np.ndarray:
    with _pil_open(fp, name, kind) as (im, scan):
        _check_size(name, *im.size, max_pixels)
        if scan is not None:
            _check_scan_density(name, scan.header)
        if draft_size is not None and kind == "JPEG":
            im.draft("L", (draft_size, draft_size))  # libjpeg DCT scaling; both sides stay >= draft_size
        try:
            # A full load: with ImageFile.LOAD_TRUNCATED_IMAGES False (Pillow's default, never changed
            # here) a truncated file raises instead of returning a partly grey picture, and so does a
            # single-scan JPEG whose scan does not fill the image exactly (see _JpegScan).
            _load(im, scan, name)
            im = ImageOps.exif_transpose(im)
            return _pil_to_grey(im)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ImageDecodeError(
                f"{name}: cannot decode {kind} pixels (truncated or corrupt?): {exc}"
            ) from None


def _pil_to_grey(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> 2-D uint8 grey (see the module docstring for the rules)."""
    if im.mode == "L":
        return np.asarray(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_uint8(np.asarray(im))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        alpha = np.asarray(im.getchannel("A"), dtype=np.uint16)
        grey = np.asarray(im.convert("RGBA").convert("L"), dtype=np.uint16)
        return ((grey * alpha + 127) // 255).astype(np.uint8)
    if im.mode in ("1", "P", "RGB"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB").convert("L"))  # YCbCr, CMYK, LAB, HSV...


def _scale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of [lo, hi] (default: the array's own min/max) to 0..255, clipped and rounded."""
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("pixel values are not finite")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _resize(im: Image.Image, size: tuple[int, int], box: tuple[float, ...] | None = None) -> Image.Image:
    # BILINEAR in Pillow is antialiased on downscaling; reducing_gap first shrinks by an integer factor
    # with a BOX filter (fast), and 3.0 keeps the result indistinguishable from the plain filter.
    return im.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


def _check_fit_args(size: int, mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")


# -- encoded frames: their own declared size, and scans that really end -----------------------------------
# Hand-written readers of the size an encoded frame declares (JPEG and JPEG-LS SOF, JPEG 2000 SIZ) and of
# an RLE frame's segments, run before any pixel is decoded. No library exposes this for every codec without
# decoding: pydicom's `get_j2k_parameters` returns the precision but not the size, its `_get_jpg_parameters`
# is private, and openjpeg's `get_parameters` covers JPEG 2000 only. A DICOM header (Rows, Columns) says
# nothing binding about the frame inside it: without these checks a 64 x 64 header around a 15000 x 15000
# frame is decoded in full.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG SOF0..15, JPEG-LS SOF55
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0..7 carry no length
_HUFFMAN_DCT = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended and progressive Huffman-coded DCT
_HUFFMAN_SEQUENTIAL = frozenset({0xC0, 0xC1})
# A Huffman code is at least 1 bit and every 8 x 8 block of the full-resolution component needs one (its
# DC difference), so a Huffman-coded DCT JPEG holds at most 64 pixels per bit, 512 per byte of scan data.
# Measured over the 6,839 real JPEGs of ../shared/data (CheXpert valid, Kermany train, MURA humerus): at
# most 19.1 pixels per byte of scan data (a 64 x 64 MURA image; median 6.7); the all-black 7740 x 7740 JPEG
# of 938 KB (a legitimate if odd upload) has 64.
# A declared size beyond the ceiling is a header enlarged over small data (7000 x 7000 over an 8 KB file:
# 6,000 per byte): refused before decoding. Arithmetic-coded JPEGs have no such floor and are not bounded.
_MAX_PIXELS_PER_SCAN_BYTE = 512
# Replaces a single-scan JPEG's final EOI marker (see `_JpegScan`): "FF 00" is a stuffed 0xFF, i.e. data
# bits all 1 (an invalid Huffman code), and 32 bytes outlast libjpeg's bit-buffer prefetch (57 bits).
_SCAN_PADDING = b"\xff\x00" * 16
# The last 256 bytes go to Pillow in reads of 8, so that where it stopped reading is known to 8 bytes. On
# every real JPEG here libjpeg read 0 to 14 bytes into the padding: a complete scan leaves no data unread.
_TAIL, _TAIL_STEP = 256, 8
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in entropy-coded data: not a stuffed 0xFF, RSTn, fill


class _JpegHeader(NamedTuple):
    """The first frame header (SOF) and scan header (SOS) of a JPEG or JPEG-LS stream."""

    sof: int  # the SOF marker's second byte: 0xC0 baseline, 0xC2 progressive, 0xF7 JPEG-LS...
    precision: int
    width: int
    height: int
    components: int
    scan_start: int  # offset of the first SOS marker: entropy-coded data follows its header
    scan_components: int
    length: int  # bytes in the whole stream


def _jpeg_header(data: bytes) -> _JpegHeader:
    """Walk the markers in order to the first SOS, like libjpeg (junk before a marker and fill bytes are
    skipped); the first SOF gives the frame's size. ValueError when the stream has no frame or scan."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG start-of-image marker")
    pos, frame = 2, None
    try:
        while True:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                raise ValueError("no scan found")
            while data[pos + 1] == 0xFF:
                pos += 1
            marker, pos = data[pos + 1], pos + 2
            if marker in _STANDALONE_MARKERS or marker == 0x00:
                continue
            if marker == 0xD9:
                raise ValueError("the image ends before its first scan")
            (length,) = struct.unpack_from(">H", data, pos)
            if length < 2:
                raise ValueError(f"a marker segment of length {length}")
            if marker in _SOF_MARKERS and frame is None:
                frame = (marker, *struct.unpack_from(">BHHB", data, pos + 2))
            elif marker == 0xDA:
                if frame is None:
                    raise ValueError("a scan before any frame header")
                sof, precision, height, width, components = frame
                scan = (pos - 2, data[pos + 2], len(data))
                return _JpegHeader(sof, precision, width, height, components, *scan)
            pos += length
    except (IndexError, struct.error):
        raise ValueError("the stream ends inside its headers") from None


def _check_scan_density(name: str, header: _JpegHeader) -> None:
    """Refuse a Huffman-coded DCT JPEG that declares more pixels than its scan data could hold."""
    pixels, scan_bytes = header.width * header.height, max(header.length - header.scan_start, 1)
    if header.sof in _HUFFMAN_DCT and pixels > _MAX_PIXELS_PER_SCAN_BYTE * scan_bytes:
        raise ImageDecodeError(
            f"{name}: corrupt JPEG: its header declares {header.width}x{header.height} pixels, more than "
            f"{scan_bytes:,} bytes of image data can encode (at most {_MAX_PIXELS_PER_SCAN_BYTE} pixels a byte)"
        )


class _JpegScan(io.BytesIO):
    """A JPEG as handed to Pillow, so that a scan that does not fill the image exactly fails to load.

    libjpeg ends a scan at the next marker: when the data runs out early (a cut file with FF D9 appended,
    an enlarged SOF) it fills the rest with grey and warns, and when the image is filled early (a scan
    overwritten with zeros, which decode as valid codes) it skips the rest and warns; Pillow drops both
    warnings (its decoder has no strict mode). So a single-scan Huffman JPEG's final EOI is replaced by
    padding: without a marker, Pillow's suspending reader waits for data a short scan needs, and raises
    "image file is truncated", while a complete scan has delivered every line before it needs the EOI
    (Pillow accepts the missing EOI then). And `load` reads the last bytes in small steps: where Pillow
    stopped reading shows data left unused, refused unless a marker accounts for it (a second image, a
    segment after the scan). Progressive and multi-scan files read every scan, to the EOI, before the
    first line comes out: they keep their EOI, and only the density bound applies to them.
    """

    def __init__(self, data: bytes) -> None:
        self.header = _jpeg_header(data)
        self.guarded = _single_scan(self.header) and data.endswith(b"\xff\xd9")
        self.body = data[:-2] + _SCAN_PADDING if self.guarded else data
        super().__init__(self.body)
        self.length, self.tail = len(self.body), False

    def read(self, size: int | None = -1) -> bytes:
        if self.tail:
            left = self.length - self.tell()
            step = left - _TAIL if left > _TAIL else _TAIL_STEP
            size = step if size is None or size < 0 else min(size, step)
        return super().read(size)

    def load(self, im: Image.Image, name: str) -> None:
        """Load `im`, opened from this reader; refuse a single-scan JPEG whose scan ended before its data."""
        self.tail = True
        im.load()
        if self.guarded:
            unused = self.body[self.tell() : self.length - len(_SCAN_PADDING)]
            if unused and not _MARKER.search(unused):
                raise ImageDecodeError(
                    f"{name}: corrupt JPEG: its scan fills the image {len(unused):,} bytes before its data ends"
                )


def _single_scan(header: _JpegHeader) -> bool:
    """A sequential Huffman JPEG whose first scan holds every component (libjpeg's one-pass case)."""
    return header.sof in _HUFFMAN_SEQUENTIAL and header.scan_components == header.components


def _j2k_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG 2000 codestream's SIZ segment, or a JP2 file's codestream."""
    start = 0
    if data[4:8] == b"jP  ":  # a JP2 file: boxes (length, type) up to the contiguous codestream box
        while True:
            length, kind = struct.unpack_from(">I4s", data, start)
            head = 8
            if length == 1:  # a 64-bit length follows the type
                (length,), head = struct.unpack_from(">Q", data, start + 8), 16
            if kind == b"jp2c":
                start += head
                break
            if length < head:  # 0: "to the end of the file", and no codestream was found before it
                raise ValueError("a JP2 file without a codestream box")
            start += length
    if data[start : start + 4] != b"\xff\x4f\xff\x51":
        raise ValueError("no JPEG 2000 SOC and SIZ markers")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, start + 8)
    (components,) = struct.unpack_from(">H", data, start + 40)
    if xosiz >= xsiz or yosiz >= ysiz:
        raise ValueError(f"an empty JPEG 2000 image area ({xsiz}x{ysiz} from offset {xosiz},{yosiz})")
    return xsiz - xosiz, ysiz - yosiz, components


def _check_rle(frame: bytes, plane: int, segments: int) -> None:
    """Refuse an RLE frame with other than `segments` segments, or one that decodes to more than twice its
    `plane` (Rows x Columns) bytes: pydicom decodes a whole segment before it checks the length, and one
    2-byte run makes 128 bytes. Walks the run headers only, at most 2 x `plane` runs (each makes a byte or
    more); the output is then bounded by construction (the slack allows pydicom's tolerated padding)."""
    count, *offsets = struct.unpack_from("<16I", frame)
    if count != segments or not 1 <= count <= 15:
        raise ValueError(f"{count} RLE segments where the header implies {segments}")
    ends = [*offsets[1:count], len(frame)]
    for start, end in zip(offsets[:count], ends, strict=True):
        if not 64 <= start <= end <= len(frame):
            raise ValueError(f"an RLE segment at bytes {start}..{end} of a {len(frame):,}-byte frame")
        pos, out = start, 0
        while pos < end and out <= 2 * plane:
            n = frame[pos]
            if n < 128:  # a literal run of n + 1 bytes
                out, pos = out + n + 1, pos + n + 2
            elif n > 128:  # one byte repeated 257 - n times
                out, pos = out + 257 - n, pos + 2
            else:
                pos += 1
        if out > 2 * plane:
            raise ValueError(f"an RLE segment decodes to more than twice its {plane:,} bytes")


def _first_frame(ds: pydicom.Dataset) -> bytes:
    """The first encapsulated frame's bytes, found as pydicom's decoders find it (offset tables included)."""
    opts = as_pixel_options(ds)
    offsets = opts.get("extended_offsets")
    if offsets and len(offsets[0]) != len(offsets[1]):  # pydicom ignores a mismatched table too
        offsets = None
    return get_frame(ds.PixelData, 0, number_of_frames=opts["number_of_frames"], extended_offsets=offsets)


def _check_dicom_frame(name: str, ds: pydicom.Dataset, max_pixels: int, decoding: bool) -> None:
    """Refuse an encapsulated DICOM whose first frame declares another size than Rows x Columns (corrupt,
    `ImageDecodeError`; `ImageTooLargeError` when that size exceeds `max_pixels`), more components than
    SamplesPerPixel, or an RLE frame that decodes to too much. Decodes no pixel.

    `decoding` adds the checks that read the data (RLE runs, a JPEG frame's scan), which `image_info`
    leaves to the decode: it stays quick, and a header over the limit is answered as too large first.
    """
    syntax = _transfer_syntax(ds)
    if not syntax.is_encapsulated:
        return  # native pixels: pydicom reads Rows x Columns x samples, no more
    rows, cols = int(ds.Rows or 0), int(ds.Columns or 0)
    samples = int(ds.get("SamplesPerPixel") or 1)
    header = None
    try:
        frame = _first_frame(ds)
        if syntax == RLELossless:
            if decoding:
                _check_rle(frame, rows * cols, samples * ((int(ds.get("BitsAllocated") or 8) + 7) // 8))
            return
        if syntax in JPEG2000TransferSyntaxes:
            width, height, components = _j2k_size(frame)
        elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
            header = _jpeg_header(frame)
            width, height, components = header.width, header.height, header.components
        else:
            return  # no decoder here for it (MPEG, private syntaxes): pydicom refuses it
    except Exception as exc:  # pydicom's frame parser raises many types on malformed items
        raise ImageDecodeError(
            f"{name}: corrupt DICOM pixel data ({syntax.name}): {type(exc).__name__}: {exc}"
        ) from None
    if (width, height) != (cols, rows):
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: image too large: the pixel data's first frame is {width}x{height} = "
                f"{width * height:,} pixels > max_pixels {max_pixels:,} (the header says {cols}x{rows}); "
                "refusing to decode (possible decompression bomb)"
            )
        raise ImageDecodeError(
            f"{name}: corrupt DICOM: the pixel data's first frame is {width}x{height} but the header says "
            f"{cols}x{rows} (Columns x Rows)"
        )
    if components > samples:
        raise ImageDecodeError(
            f"{name}: corrupt DICOM: the first frame has {components} components, SamplesPerPixel is {samples}"
        )
    if decoding and header is not None:
        _check_scan_density(name, header)
        _check_scan_ends(name, frame)


def _check_scan_ends(name: str, frame: bytes) -> None:
    """Refuse an 8-bit single-scan JPEG frame whose scan does not fill the image exactly (see `_JpegScan`).

    pydicom's JPEG plugins fill a short scan with grey silently as well, so the frame is first decoded
    here by Pillow at 1/8 scale (libjpeg reads every bit of the scan; the inverse DCT is cheap). Only a
    scan that ends early or late is refused: a frame Pillow cannot read otherwise is left to pydicom.
    """
    scan = _JpegScan(frame.rstrip(b"\x00"))  # a DICOM item is padded to an even length
    if scan.header.precision != 8 or not scan.guarded:
        return
    try:
        with Image.open(scan, formats=["JPEG"]) as im:
            im.draft(im.mode, (max(1, scan.header.width // 8), max(1, scan.header.height // 8)))
            scan.load(im, name)
    except ImageDecodeError:
        raise
    except OSError as exc:  # another failure than a starved scan is pydicom's to report
        if "truncated" in str(exc):
            raise ImageDecodeError(
                f"{name}: corrupt DICOM: the first frame's JPEG data ends before the image is complete"
            ) from None
    except (SyntaxError, ValueError, EOFError, struct.error):
        pass


# -- DICOM (pydicom) ---------------------------------------------------------------------------------------
def _read_dicom_header(fp: IO[bytes], name: str) -> pydicom.Dataset:
    """Parse only the pixel/LUT tags (no patient fields); preamble-less files are read with force."""
    try:
        ds = pydicom.dcmread(fp, force=True, specific_tags=_DICOM_TAGS)
    except Exception as exc:  # pydicom raises many types on bad input (InvalidDicomError, struct, EOF...)
        raise ImageDecodeError(f"{name}: cannot read DICOM header ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
        raise UnsupportedFormatError(f"{name}: unsupported format (not an image: no DICOM pixel data found)")
    return ds


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    """The dataset's transfer syntax; for a preamble-less file without one, the encoding it was read in.
    A UID there that names no transfer syntax is an ImageDecodeError (pydicom raises a bare ValueError)."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        if not pydicom.uid.UID(tsyntax).is_transfer_syntax:
            raise ImageDecodeError(
                f"corrupt DICOM: its TransferSyntaxUID {str(tsyntax)[:64]!r} names no transfer syntax"
            )
        return tsyntax
    implicit, little = ds.original_encoding
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _decode_dicom(fp: IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    ds = _read_dicom_header(fp, name)
    _check_size(name, int(ds.Columns or 0), int(ds.Rows or 0), max_pixels)
    _check_dicom_frame(name, ds, max_pixels, decoding=True)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = _transfer_syntax(ds)
    try:
        arr = pixel_array(ds, index=0)  # first frame only; compressed syntaxes through pydicom's plugins
        return _dicom_to_grey(arr, ds)
    except (ImageDecodeError, MemoryError):  # not enough memory says nothing about the file
        raise
    except Exception as exc:  # decoder plugins and LUT code raise many types (RuntimeError, ValueError...)
        syntax = _transfer_syntax(ds).name
        raise ImageDecodeError(
            f"{name}: cannot decode DICOM pixel data ({syntax}): {type(exc).__name__}: {exc}"
        ) from None


def _dicom_to_grey(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour (RGB, YBR already converted to RGB by pixel_array): take luminance
        luma = arr.astype(np.float32) @ _LUMA
        return np.rint(luma).astype(np.uint8) if arr.dtype == np.uint8 else _scale_to_uint8(luma)
    arr = apply_modality_lut(arr, ds)
    lo: float | None = None
    hi: float | None = None
    if ds.get("VOILUTSequence"):
        arr = apply_voi(arr, ds, index=0)
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        arr = apply_windowing(arr, ds, index=0)
        lo, hi = _windowing_output_range(ds)
    grey = _scale_to_uint8(arr, lo, hi)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _windowing_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The [y_min, y_max] that pydicom's apply_windowing maps the window onto.

    Hand-written because pydicom does not return it; mirrors pydicom 3 `apply_windowing` so that the
    window's full width becomes 0..255 (the window defines the display range, not the data's min/max).
    """
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return (y_min, y_max) if y_min <= y_max else (y_max, y_min)
