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
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, pixel_array

from xrayfm.errors import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError, XrayfmError

try:  # ISA-L's deflate (the gateway installs it: it draws every answer's heatmap); the same format as zlib's
    from isal import isal_zlib as deflate
except ImportError:  # elsewhere (the web UI, the workers) zlib writes the same PNGs, ~5x slower
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

    A heatmap is encoded on every answer. Pillow (level 1 already: 8.6 ms against 13.5 ms at its default 6
    for a 390x320 map) chooses a filter for each row by trying all five, and offers no way to fix one. On
    a drawn 256x210 map here that took 0.95 ms and 14.1 KB; one filter (Up: each byte minus the byte
    above, which suits smooth maps) took 0.44 ms for 10.9 KB with zlib; ISA-L's deflate (the same format,
    any inflater reads it), used where ``isal`` is installed (the gateway), takes 0.14 ms against zlib's
    0.70 at level 1 for a 54 KB filtered map, and writes 17.7 KB against 18.5. Any PNG reader decodes it
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
        with _pil_open(fp, name, kind) as im:
            _check_size(name, *im.size, max_pixels)
            if im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16"):
                return None
            if kind == "JPEG":
                im.draft("RGB", (side, side))
            try:
                im.load()
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
            with _pil_open(fp, name, kind) as im:
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
def _pil_open(fp: IO[bytes], name: str, kind: str) -> Iterator[Image.Image]:
    """Open the header with Pillow (restricted to the sniffed format); Pillow errors -> ImageDecodeError."""
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
        yield im


def _decode_pil(fp: IO[bytes], name: str, kind: str, max_pixels: int, draft_size: int | None) -> np.ndarray:
    with _pil_open(fp, name, kind) as im:
        _check_size(name, *im.size, max_pixels)
        if draft_size is not None and kind == "JPEG":
            im.draft("L", (draft_size, draft_size))  # libjpeg DCT scaling; both sides stay >= draft_size
        try:
            # A full load: with ImageFile.LOAD_TRUNCATED_IMAGES False (Pillow's default, never changed
            # here) a truncated file raises instead of returning a partly grey picture.
            im.load()
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
    """The dataset's transfer syntax; for a preamble-less file without one, the encoding it was read in."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        return tsyntax
    implicit, little = ds.original_encoding
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _decode_dicom(fp: IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    ds = _read_dicom_header(fp, name)
    _check_size(name, int(ds.Columns or 0), int(ds.Rows or 0), max_pixels)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = _transfer_syntax(ds)
    try:
        arr = pixel_array(ds, index=0)  # first frame only; compressed syntaxes through pydicom's plugins
        return _dicom_to_grey(arr, ds)
    except ImageDecodeError:
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
