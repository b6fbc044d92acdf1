"""Fuzzing the gateway's upload path and its job specs: multipart parsing -> format detection -> decoding
(PNG, JPEG, DICOM) -> checks, in the real gateway app with in-memory queues (no Redis, no worker).

Every input must end in 200 or a 4xx with the JSON error body: never a 5xx, never an exception, with the
process's memory bounded (decompression bombs included). The seed corpus is real files from
``../shared/data`` when present (CheXpert, MURA, Kermany, NIH, PneumoniaMNIST, DICOMs), plus images made
here, among them encapsulated DICOMs (JPEG, JPEG 2000, JP2, RLE, JPEG-LS) whose frame claims more or fewer
pixels than Rows x Columns, up to 15000 x 15000 in a 64 x 96 header. test_fuzz.py runs a bounded hypothesis
search in CI; run this file for a longer, coverage-guided search with atheris, which prints the figure
(inputs tried, outcomes by code):

    nice .venv/bin/python -m tests.services.upload_fuzz --seconds 600 \
        [--target upload|body|dicom|encapsulated|spec]

`--target encapsulated` mutates the structure of encapsulated DICOMs (`mutate_encapsulated`: the frame's
SOF/SIZ size, segment lengths, offset tables, item lengths, Rows/Columns, pixel tags, transfer syntax),
sends each through the gateway, and calls the library directly on it (`library_outcome`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from openjpeg.utils import encode_array
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.services.gateway_fakes import FakeQueue, FakeTraining, gateway_client
from tests.services.svc_helpers import dicom_bytes, jpeg_bytes, phantom, png_bytes, png_with_header_size
from xrayfm.data.images import image_info, read_image
from xrayfm.errors import ImageDecodeError
from xrayfm_stack.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))
SEED_FILES = (  # a few of each kind and format of the real data (paths relative to ../shared/data)
    "chexpert-small-valid/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
    "mura-humerus-64/MURA-v1.1/valid/XR_HUMERUS/patient11186/study1_positive/image1.jpg",
    "dicom-radiographs/RG1_UNCR.dcm",
    "dicom-radiographs/RG3_J2KI.dcm",
)
SEED_GLOBS = (
    "kermany-pneumonia/chest_xray/train/NORMAL/*.jpeg",
    "nih-cxr14-1000-64/images/*.png",
    "pneumoniamnist/png/test/pneumonia/*.png",
    "dicom-radiographs/*.dcm",
)
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}


# -- encapsulated DICOM: a frame's own header may say another size than Rows x Columns ---------
MAX_PIXELS = GatewaySettings().max_pixels  # the gateway's pixel limit (XRAYFM_MAX_PIXELS), Target's too
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
INSTANCE = "1.2.826.0.1.3680043.8.498.31"  # fixed, so that an input always writes the same bytes
ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item
SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) Sequence Delimitation Item, length 0
PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00"  # (7FE0,0010) OB, explicit VR little endian
SYNTAX = {
    "jpeg": JPEGBaseline8Bit,
    "j2k": JPEG2000Lossless,
    "jp2": JPEG2000,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
}
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG SOF0..15, JPEG-LS SOF55
RLE_MOST = 2**24  # bytes an RLE frame made here decodes to, at most (256 KB of runs)


@dataclass(frozen=True)
class Encapsulated:
    """An encapsulated DICOM in parts (one frame, its items, a few header tags), so that mutations act on
    its structure; `dicom()` writes the file."""

    kind: str  # the frame's codec: jpeg, j2k, jp2, rle, jpeg-ls
    frame: bytes
    rows: int
    cols: int
    syntax: str = ""  # the transfer syntax; "" for the kind's own
    fragments: int = 1  # the frame split over this many items
    offsets: tuple[int, ...] = ()  # the Basic Offset Table
    extended: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # Extended Offset Table, lengths
    lengths: tuple[tuple[int, int], ...] = ()  # (item, declared length); item 0 is the offset table
    trailer: bytes = SEQ_END
    tags: tuple[tuple[str, Any], ...] = ()  # other values of header tags, set in this order

    def __repr__(self) -> str:  # short: hypothesis prints it for a failing example
        claims = frame_claims(self.kind, self.frame)
        claim = f"{claims[0]}x{claims[1]}" if claims else "no size"
        other = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in ("kind", "frame", "rows", "cols") and getattr(self, f.name) != f.default
        ]
        return (
            f"Encapsulated({self.kind}, a {len(self.frame):,}-byte frame claiming {claim}, "
            f"rows={self.rows}, cols={self.cols}{''.join(', ' + o for o in other)})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer: the short form too
        printer.text(repr(self))

    def items(self) -> list[bytes]:
        """The values of the pixel data's items: the offset table, then the frame's fragments."""
        frame = self.frame + b"\x00" * (len(self.frame) % 2)  # items have even lengths
        step = max(2, -(-len(frame) // max(1, self.fragments)))
        step += step % 2
        return [struct.pack(f"<{len(self.offsets)}I", *self.offsets)] + [
            frame[at : at + step] for at in range(0, len(frame), step)
        ]

    def dicom(self) -> bytes:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR_IMAGE, INSTANCE, "CR"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = (
            self.rows, self.cols, 1, "MONOCHROME2"
        )  # fmt: skip
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        for keyword, value in self.tags:
            setattr(ds, keyword, value)
        if self.extended is not None:
            offsets, lengths = self.extended
            ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
            ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(lengths)}Q", *lengths)
        ds.PixelData = ITEM + bytes(4)  # a placeholder, replaced below
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        syntax = UID(self.syntax or SYNTAX[self.kind])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax if syntax.is_transfer_syntax else ExplicitVRLittleEndian
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        head = buf.getvalue()
        head = head[: head.rindex(PIXEL_DATA) + len(PIXEL_DATA)]  # the last element: written here instead
        if not syntax.is_transfer_syntax:  # pydicom writes none but a transfer syntax: put it in by hand
            head = with_transfer_syntax(head, syntax)
        declared = dict(self.lengths)
        pixels = b"".join(
            ITEM + struct.pack("<I", declared.get(i, len(value)) & 0xFFFFFFFF) + value
            for i, value in enumerate(self.items())
        )
        return head + b"\xff\xff\xff\xff" + pixels + self.trailer


def with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """`data` (a DICOM file) with another Transfer Syntax UID (0002,0010), its meta group length adjusted."""
    at = data.index(b"\x02\x00\x10\x00UI", 132)
    (old,) = struct.unpack_from("<H", data, at + 6)
    value = uid.encode() + b"\x00" * (len(uid) % 2)
    data = data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old :]
    group = data.index(b"\x02\x00\x00\x00UL\x04\x00", 132) + 8  # (0002,0000) File Meta group length
    (length,) = struct.unpack_from("<I", data, group)
    return data[:group] + struct.pack("<I", length + len(value) - old) + data[group + 4 :]


# Frame builders, one per kind, and `with_frame_size` to make a frame claim another size.
def jpeg_frame(pixels: np.ndarray) -> bytes:
    """Baseline JPEG (Pillow)."""
    return jpeg_bytes(pixels)


def j2k_frame(pixels: np.ndarray) -> bytes:
    """A JPEG 2000 codestream (OpenJPEG, lossless)."""
    return bytes(encode_array(pixels))


def jp2_frame(pixels: np.ndarray) -> bytes:
    """A JP2 file (boxes around a JPEG 2000 codestream; Pillow)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG2000")
    return buf.getvalue()


def rle_frame(pixels: np.ndarray) -> bytes:
    """DICOM RLE Lossless (pydicom's encoder): a 64-byte header of segment offsets, then PackBits runs."""
    rows, cols = pixels.shape
    return RLELosslessEncoder.encode(
        pixels, rows=rows, columns=cols, number_of_frames=1, samples_per_pixel=1, bits_allocated=8,
        bits_stored=8, pixel_representation=0, photometric_interpretation="MONOCHROME2",
    )  # fmt: skip


# T.87's J table: a run segment of 2 ** J[index] samples, one more index each full segment
JLS_RUN_ORDER = (0,) * 4 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4, 4, 5, 5, 6, 6, 7, 7) + tuple(range(8, 16))


def jpeg_ls_frame(height: int, width: int) -> bytes:
    """A blank (all-zero) lossless JPEG-LS image, coded here (no encoder is installed): an all-zero image is
    coded in run mode only, one bit a run segment (ITU-T T.87, A.7.1), so its scan is a few bytes of ones."""
    bits, index = [], 0
    for _ in range(height):
        left = width
        while left >= 1 << JLS_RUN_ORDER[index]:
            bits.append(1)
            left -= 1 << JLS_RUN_ORDER[index]
            index = min(index + 1, 31)
        if left:  # a shorter run ended by the end of the line
            bits.append(1)
    scan, byte, used, room = bytearray(), 0, 0, 8
    for bit in bits:
        byte, used = byte << 1 | bit, used + 1
        if used == room:  # after an FF byte the next one carries 7 bits (its top bit is a stuffed 0)
            scan.append(byte)
            byte, used, room = 0, 0, 7 if byte == 0xFF else 8
    if used:
        scan.append(byte << (room - used))
    if scan.endswith(b"\xff"):
        scan.append(0)
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x00\x00"  # NEAR 0, no interleave
    return b"\xff\xd8" + sof55 + sos + bytes(scan) + b"\xff\xd9"


def rle_runs(size: int) -> bytes:
    """An RLE frame of one segment whose runs decode to `size` zero bytes (at most RLE_MOST)."""
    runs, rest = divmod(min(size, RLE_MOST), 128)
    tail = bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" * rest  # replicate; or a 1-byte literal
    return struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * runs + tail


def jpeg_segments(frame: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of a JPEG or JPEG-LS stream's marker segments, up to its first scan header."""
    found, pos = [], 2
    while pos + 4 <= len(frame) and frame[pos] == 0xFF:
        found.append((pos, frame[pos + 1]))
        if frame[pos + 1] == 0xDA:
            break
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return found


def codestream(frame: bytes) -> int | None:
    """Where a JPEG 2000 codestream starts in `frame` (a codestream, or a JP2 file's jp2c box)."""
    if frame[4:8] == b"jP  ":
        box = frame.find(b"jp2c")
        return box + 4 if box >= 0 else None
    return 0 if frame.startswith(b"\xff\x4f\xff\x51") else None


def frame_claims(kind: str, frame: bytes) -> tuple[int, int] | None:
    """(width, height) that the frame's own header declares (SOF, SOF55 or SIZ); None for RLE or none."""
    if kind in ("jpeg", "jpeg-ls"):
        sof = [pos for pos, marker in jpeg_segments(frame) if marker in SOF_MARKERS]
        if sof and sof[0] + 9 <= len(frame):
            height, width = struct.unpack_from(">HH", frame, sof[0] + 5)
            return width, height
    elif kind != "rle":
        start = codestream(frame)
        if start is not None and start + 16 <= len(frame):
            return struct.unpack_from(">II", frame, start + 8)
    return None


def with_frame_size(kind: str, frame: bytes, width: int, height: int, tile: bool = True) -> bytes:
    """`frame` with its own header claiming `width` x `height` (SOF, SOF55, SIZ and, with `tile`, the tile
    size), the coded data unchanged; for RLE, which declares no size, runs that decode to that many bytes."""
    out = bytearray(frame)
    if kind == "rle":
        return rle_runs(width * height)
    if kind in ("jpeg", "jpeg-ls"):
        sof = [pos for pos, marker in jpeg_segments(frame) if marker in SOF_MARKERS]
        if sof and sof[0] + 9 <= len(frame):
            out[sof[0] + 5 : sof[0] + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
        return bytes(out)
    start = codestream(frame)
    if start is not None and start + 32 <= len(frame):
        out[start + 8 : start + 16] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        if tile:
            out[start + 24 : start + 32] = out[start + 8 : start + 16]
    return bytes(out)


def encapsulated_seeds() -> list[tuple[str, Encapsulated, int]]:
    """(name, DICOM in parts, the code the gateway must answer): a valid frame of each kind, and the same
    frame claiming more (up to 15000 x 15000, a decode bomb in a few KB) and fewer pixels than its header."""
    pixels = phantom(64, 96)
    frames = {
        "jpeg": jpeg_frame(pixels),
        "j2k": j2k_frame(pixels),
        "jp2": jp2_frame(pixels),
        "rle": rle_frame(pixels),
        "jpeg-ls": jpeg_ls_frame(64, 96),
    }
    seeds = []
    for kind, frame in frames.items():
        seeds.append((f"{kind}-valid.dcm", Encapsulated(kind, frame, 64, 96), 200))
        sizes = ((15000, 15000), (8000, 8000), (1000, 1000), (48, 32))  # 8000 x 8000: over 60 M, under 100 M
        if kind == "rle":  # no declared size: runs that decode to that many bytes, refused as corrupt (400)
            sizes = ((4096, 4096), (1000, 1000), (48, 32))  # 4096 x 4096: RLE_MOST
        for width, height in sizes:
            hostile = Encapsulated(kind, with_frame_size(kind, frame, width, height), 64, 96)
            code = 422 if width * height > MAX_PIXELS else 400
            seeds.append((f"{kind}-{width}x{height}-in-96x64.dcm", hostile, code))
    return seeds


ENCAPSULATED = encapsulated_seeds()


class Choices(Protocol):
    """Where a mutation's choices come from: hypothesis draws in CI, the fuzzer's input bytes by hand."""

    def integer(self, lo: int, hi: int) -> int: ...

    def binary(self, most: int) -> bytes: ...


class FuzzedChoices:
    """Choices read from an atheris input (a FuzzedDataProvider): the fuzzer mutates the choices."""

    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def integer(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)

    def binary(self, most: int) -> bytes:
        return self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, most))


SIDES = (0, 1, 7, 8, 16, 32, 48, 63, 64, 65, 96, 128, 1000, 4096, 7745, 7746, 8000, 15000, 20000, 20001,
         65535, 2**31 - 1, 2**32 - 1)  # fmt: skip
TAG_VALUES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("NumberOfFrames", (0, 1, 2, 3, 2**31 - 1)),
    ("SamplesPerPixel", (0, 1, 3, 4)),
    ("BitsAllocated", (1, 8, 12, 16, 32)),
    ("BitsStored", (1, 7, 8, 12, 16)),
    ("HighBit", (0, 7, 15, 31)),
    ("PixelRepresentation", (0, 1)),
    ("PlanarConfiguration", (0, 1)),
    ("PhotometricInterpretation", ("MONOCHROME1", "RGB", "YBR_FULL_422", "YBR_ICT", "PALETTE COLOR")),
    ("RescaleSlope", ("0", "-1", "1e308")),
    ("WindowWidth", ("0", "1", "1e308")),
)
# UIDs in the Transfer Syntax's place that name no transfer syntax: a digit changed (the dicom target's find),
# an SOP class, an unknown UID (ImageDecodeError: a 400)
NOT_SYNTAXES = ("2.2.840.10008.1.2.4.80", CR_IMAGE, "1.2.3.4")
SYNTAXES = (*SYNTAX.values(), JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSNearLossless, HTJ2KLossless,
            ExplicitVRLittleEndian, *NOT_SYNTAXES)  # fmt: skip
TRAILERS = (SEQ_END, b"", SEQ_END[:4], ITEM + bytes(4) + SEQ_END, ITEM + b"\xff" * 4, bytes(8))


def pick(choices: Choices, values: Sequence[Any]) -> Any:
    return values[choices.integer(0, len(values) - 1)]


def side(choices: Choices, top: int) -> int:
    """An interesting size (0, 1, the seeds' own, the limit's edges, field maxima) or, at times, any."""
    i = choices.integer(0, len(SIDES))
    return min(SIDES[i], top) if i < len(SIDES) else choices.integer(0, top)


def size_top(kind: str) -> int:
    return 0xFFFFFFFF if kind in ("j2k", "jp2") else 0xFFFF


def length_fields(kind: str, frame: bytes) -> tuple[list[tuple[int, int]], str]:
    """(offset, width) of the frame's length and offset fields, and their byte order: JPEG marker segment
    lengths; JP2 box lengths, J2K marker segment lengths and the tile-part length (Psot); RLE's segment
    count and offsets."""
    if kind == "rle":
        return [(at, 4) for at in range(0, 64, 4)], "little"
    if kind in ("jpeg", "jpeg-ls"):
        return [(pos + 2, 2) for pos, _ in jpeg_segments(frame)], "big"
    found, pos = [], 0
    while kind == "jp2" and pos + 8 <= len(frame):
        found.append((pos, 4))
        length = int.from_bytes(frame[pos : pos + 4], "big")
        if length < 8:
            break
        pos += length
    start = codestream(frame)
    pos = len(frame) if start is None else start + 2
    while pos + 4 <= len(frame) and frame[pos] == 0xFF:
        found.append((pos + 2, 2))
        if frame[pos + 1] == 0x90:  # SOT: the tile-part's length follows its index
            found.append((pos + 6, 4))
            break
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return found, "big"


def header_region(kind: str, frame: bytes) -> tuple[int, int, str]:
    """(start, end, byte order) of the segment that declares the frame's size: SOF, SIZ, the RLE header."""
    if kind == "rle":
        return 0, 64, "little"
    if kind in ("jpeg", "jpeg-ls"):
        sof = [pos for pos, marker in jpeg_segments(frame) if marker in SOF_MARKERS] or [2]
        return sof[0], sof[0] + 19, "big"
    start = codestream(frame) or 0
    return start + 2, start + 49, "big"  # SIZ with one component


def poke(frame: bytes, at: int, width: int, value: int, order: str) -> bytes:
    if at + width > len(frame):
        return frame
    return frame[:at] + (value % 2 ** (8 * width)).to_bytes(width, order) + frame[at + width :]


def _rows_cols(case: Encapsulated, c: Choices) -> Encapsulated:
    which = c.integer(0, 2)  # Rows, Columns or both
    rows = side(c, 0xFFFF) if which != 1 else case.rows
    return replace(case, rows=rows, cols=side(c, 0xFFFF) if which != 0 else case.cols)


def _frame_size(case: Encapsulated, c: Choices) -> Encapsulated:
    width, height = side(c, size_top(case.kind)), side(c, size_top(case.kind))
    return replace(
        case, frame=with_frame_size(case.kind, case.frame, width, height, tile=c.integer(0, 1) == 1)
    )


def _oversize(case: Encapsulated, c: Choices) -> Encapsulated:
    """The frame claims more than the pixel limit: a bomb stays a bomb."""
    top = size_top(case.kind)
    width = c.integer(MAX_PIXELS // 0xFFFF + 1, top)
    height = c.integer(MAX_PIXELS // width + 1, top)
    return replace(case, frame=with_frame_size(case.kind, case.frame, width, height))


def _consistent_size(case: Encapsulated, c: Choices) -> Encapsulated:
    """Frame and header claim the same size (the coded data unchanged)."""
    width, height = side(c, 0xFFFF), side(c, 0xFFFF)
    return replace(case, frame=with_frame_size(case.kind, case.frame, width, height), rows=height, cols=width)


def _header_field(case: Encapsulated, c: Choices) -> Encapsulated:
    start, end, order = header_region(case.kind, case.frame)
    width = pick(c, (1, 2, 4))
    at = c.integer(start, max(start, min(end, len(case.frame)) - width))
    return replace(case, frame=poke(case.frame, at, width, side(c, 2 ** (8 * width) - 1), order))


def _segment_length(case: Encapsulated, c: Choices) -> Encapsulated:
    fields, order = length_fields(case.kind, case.frame)
    if not fields:
        return case
    at, width = pick(c, fields)
    now = int.from_bytes(case.frame[at : at + width], order)
    value = pick(c, (0, 1, 2, now - 1, now + 1, now + 2, 2 * now, len(case.frame), 2 ** (8 * width) - 1))
    return replace(case, frame=poke(case.frame, at, width, value, order))


def _offset_table(case: Encapsulated, c: Choices) -> Encapsulated:
    size = len(case.frame)
    values = (0, 2, 8, size, size + 8, 2**31, 2**32 - 1)
    offsets = tuple(
        pick(c, values) if c.integer(0, 3) else c.integer(0, 2**32 - 1) for _ in range(c.integer(0, 3))
    )
    return replace(case, offsets=offsets)


def _extended_offsets(case: Encapsulated, c: Choices) -> Encapsulated:
    if not c.integer(0, 4):
        return replace(case, extended=None)
    size = len(case.frame)
    values = (0, 8, size, size + 8, 2**32, 2**63, 2**64 - 1)
    offsets = tuple(pick(c, values) for _ in range(c.integer(0, 2)))
    return replace(case, extended=(offsets, tuple(pick(c, values) for _ in range(c.integer(0, 2)))))


def _item_length(case: Encapsulated, c: Choices) -> Encapsulated:
    items = case.items()
    index = c.integer(0, len(items) - 1)
    now = len(items[index])
    value = pick(c, (0, 1, now - 2, now - 1, now + 1, now + 2, now + 8, 2 * now, 2**31, 2**32 - 1))
    return replace(case, lengths=(*case.lengths, (index, value)))


def _fragments(case: Encapsulated, c: Choices) -> Encapsulated:
    return replace(case, fragments=c.integer(1, 4))


def _trailer(case: Encapsulated, c: Choices) -> Encapsulated:
    return replace(case, trailer=pick(c, TRAILERS))


def _tag(case: Encapsulated, c: Choices) -> Encapsulated:
    keyword, values = pick(c, TAG_VALUES)
    return replace(case, tags=(*case.tags, (keyword, pick(c, values))))


def _syntax(case: Encapsulated, c: Choices) -> Encapsulated:
    return replace(case, syntax=pick(c, SYNTAXES))


def _frame_bytes(case: Encapsulated, c: Choices) -> Encapsulated:
    """Byte-level: a bit flipped, a cut, bytes inserted or overwritten; in the headers half the time."""
    data = bytearray(case.frame)
    at = c.integer(0, min(len(data), 400) if c.integer(0, 1) else len(data))
    op = c.integer(0, 3)
    if op == 0 and at < len(data):
        data[at] ^= 1 << c.integer(0, 7)
    elif op == 1:
        del data[at:]
    elif op == 2:
        data[at:at] = c.binary(64)
    else:
        chunk = c.binary(16)
        data[at : at + len(chunk)] = chunk
    return replace(case, frame=bytes(data))


MUTATIONS: dict[str, Callable[[Encapsulated, Choices], Encapsulated]] = {
    "rows_cols": _rows_cols,
    "frame_size": _frame_size,
    "consistent_size": _consistent_size,
    "header_field": _header_field,
    "segment_length": _segment_length,
    "offset_table": _offset_table,
    "extended_offsets": _extended_offsets,
    "item_length": _item_length,
    "fragments": _fragments,
    "trailer": _trailer,
    "tag": _tag,
    "syntax": _syntax,
    "frame_bytes": _frame_bytes,
}
KEEPS_THE_BOMB = {"rows_cols": _rows_cols, "oversize": _oversize, "fragments": _fragments}


def mutate_encapsulated(
    case: Encapsulated, choices: Choices, mutations: dict[str, Callable] = MUTATIONS, most: int = 4
) -> Encapsulated:
    """Up to `most` structure-aware mutations of `case`, as `choices` pick them."""
    ops = list(mutations.values())
    for _ in range(choices.integer(0, most)):
        case = pick(choices, ops)(case, choices)
    return case


def library_outcome(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """`image_info` (with and without the limit) and `read_image` on `data`, called directly: 'decoded', or
    the name of the `ImageDecodeError` subclass read_image raised. Any other exception, an array over
    `max_pixels`, or one of another size than image_info says, raises AssertionError."""
    calls = {
        "image_info": image_info,
        "image_info(max_pixels)": partial(image_info, max_pixels=max_pixels),
        "read_image(max_pixels)": partial(read_image, max_pixels=max_pixels),
    }
    results = []
    for what, call in calls.items():
        try:
            results.append(call(data))
        except ImageDecodeError as exc:
            results.append(exc)
        except Exception as exc:
            raise AssertionError(
                f"{what} raised {type(exc).__name__}, not an ImageDecodeError: {exc}"
            ) from exc
    *infos, pixels = results
    if isinstance(pixels, ImageDecodeError):
        return type(pixels).__name__
    assert isinstance(pixels, np.ndarray) and pixels.ndim == 2 and pixels.dtype == np.uint8, pixels
    assert pixels.size <= max_pixels, f"read_image returned {pixels.shape} over max_pixels {max_pixels:,}"
    for info in infos:
        assert isinstance(info, dict), f"read_image decoded {pixels.shape}, image_info raised {info!r}"
        assert (info["height"], info["width"]) == pixels.shape, (info, pixels.shape)
    return "decoded"


def seed_corpus(per_glob: int = 3) -> list[tuple[str, bytes]]:
    """(file name, bytes) of real files when the shared data is there, and of images made here."""

    found: list[Path] = [SHARED / p for p in SEED_FILES if (SHARED / p).is_file()]
    for pattern in SEED_GLOBS:
        found += sorted(SHARED.glob(pattern))[:per_glob]
    corpus = [(p.name, p.read_bytes()) for p in dict.fromkeys(found)]
    image = phantom(120, 90)
    corpus += [
        ("made.png", png_bytes(image)),
        ("made.jpg", jpeg_bytes(image)),
        ("made.dcm", dicom_bytes(image)),
    ]
    corpus += [("bomb.png", png_with_header_size(100_000, 100_000))]
    corpus += [(name, case.dicom()) for name, case, _ in ENCAPSULATED]
    return corpus


class Target:
    """The gateway app, ready to be fed inputs; counts outcomes by status code."""

    def __init__(self) -> None:

        self.queue, self.training = FakeQueue(), FakeTraining()
        self.client = gateway_client(
            self.queue,
            self.training,
            max_upload_bytes=8 * 2**20,
            max_pixels=MAX_PIXELS,
            model_store=Path("/nonexistent-store"),
            insecure_no_auth=True,  # so that specs reach their check (closed-by-default has its own test)
            data_dirs=(Path("/data"),),
        ).__enter__()
        self.outcomes: Counter[int] = Counter()

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    def _check(self, resp: Any, what: str) -> int:
        code = resp.status_code
        self.outcomes[code] += 1
        if code >= 500 or not (code == 200 or 400 <= code < 500):
            raise AssertionError(f"{what}: HTTP {code}: {resp.text[:500]}")
        if code != 200:
            body = resp.json()
            assert set(body) >= {"error", "detail"} or "detail" in body, (what, body)
        return code

    def upload(self, name: str, data: bytes) -> int:
        """POST /predict with `data` as the file (its extension and MIME type as the client says)."""
        mime = MIME.get(Path(name).suffix.lower(), "application/octet-stream")
        return self._check(self.client.post("/predict", files={"file": (name, data, mime)}), f"upload {name}")

    def body(self, data: bytes, boundary: str = "xrayfmfuzz") -> int:
        """POST /predict with `data` as the raw multipart body."""
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self._check(self.client.post("/predict", content=data, headers=headers), "raw body")

    def spec(self, spec: Any) -> int:
        """POST /training/jobs with `spec` as JSON."""
        return self._check(
            self.client.post(
                "/training/jobs",
                content=json.dumps(spec).encode(),
                headers={"Content-Type": "application/json"},
            ),  # fmt: skip
            "job spec",
        )


def multipart(name: str, data: bytes, boundary: str = "xrayfmfuzz") -> bytes:
    """A well-formed multipart body holding one file field (a starting point for body mutations)."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def rss_mb() -> float:
    """This process's resident memory, MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- the coverage-guided search (atheris), by hand ------------------------------------------------------
INSTRUMENTED = ("xrayfm", "xrayfm_gateway", "xrayfm_stack", "PIL", "pydicom", "python_multipart", "pylibjpeg",
                "openjpeg", "libjpeg")  # fmt: skip


def instrument(packages: Sequence[str] = INSTRUMENTED) -> int:
    """Coverage feedback from the code under test, already imported (by the gateway app and this module,
    so `atheris.instrument_imports` would not see it): instrument its Python functions in place."""
    import gc
    import types

    import atheris

    funcs = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, types.FunctionType)
        and str(getattr(obj, "__module__", None) or "").split(".")[0] in packages
    ]
    for func in funcs:
        try:
            atheris.instrument_func(func)
        except Exception as exc:  # a few functions (generated code) cannot be rewritten: left as they are
            print(f"not instrumented: {func.__qualname__}: {exc}", file=sys.stderr)
    return len(funcs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz")
    parser.add_argument(
        "--target",
        choices=("upload", "body", "dicom", "encapsulated", "spec"),
        default="upload",
        help="file contents, raw multipart bodies, DICOM files only, encapsulated DICOMs (structure-aware, "
        "and the library called directly), or training job specs",
    )
    parser.add_argument(
        "--rss-limit-mb", type=int, default=3072, help="fail when the process grows past this"
    )
    parser.add_argument(
        "--input-timeout", type=int, default=10, help="fail on an input that takes longer (seconds)"
    )
    parser.add_argument("--json", action="store_true", help="print the figure as JSON")
    args = parser.parse_args(argv)
    import atheris

    logging.disable(logging.INFO)  # the gateway logs every request it queues
    warnings.simplefilter("ignore")  # pydicom warns about every malformed value
    target = Target()
    corpus = seed_corpus()
    print(f"instrumented {instrument()} functions", file=sys.stderr)
    if args.target == "dicom":
        corpus = [(n, d) for n, d in corpus if n.endswith(".dcm")]
    corpus_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"xrayfm-fuzz-{args.target}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if args.target == "encapsulated":  # its inputs are choices (FuzzedChoices): one byte picks a seed as is
        for i, (name, _, _) in enumerate(ENCAPSULATED):
            (corpus_dir / f"seed-{name}").write_bytes(bytes([i]))
    else:
        for i, (name, data) in enumerate(corpus):  # atheris starts from these and mutates them
            seed = multipart(name, data) if args.target == "body" else data
            (corpus_dir / f"seed-{i}{Path(name).suffix}").write_bytes(seed)
    names = [name for name, _ in corpus]
    library: Counter[str] = Counter()  # the encapsulated target's direct library calls, by outcome
    kinds: Counter[str] = Counter()  # ... and its inputs by the seed's codec
    slowest = (0.0, "")

    def report() -> None:
        figure = {
            "target": args.target,
            "seconds": round(time.monotonic() - start, 1),
            "inputs": sum(target.outcomes.values()),
            "outcomes": {str(k): v for k, v in sorted(target.outcomes.items())},
            "5xx": sum(v for k, v in target.outcomes.items() if k >= 500),
            "slowest_s": round(slowest[0], 3),
            "slowest_input": slowest[1],
            "rss_mb_start": round(rss0),
            "rss_mb_end": round(rss_mb()),
        }
        if args.target == "encapsulated":
            figure |= {"library": dict(sorted(library.items())), "by_kind": dict(sorted(kinds.items()))}
        print(
            json.dumps(figure) if args.json else "\n".join(f"{k}: {v}" for k, v in figure.items()), flush=True
        )

    def one_input(data: bytes) -> None:
        nonlocal slowest
        if time.monotonic() - start > args.seconds:  # libFuzzer exits without Python's clean-up: report here
            report()
            os._exit(0)
        began, what = time.perf_counter(), ""
        if args.target == "spec":
            fdp = atheris.FuzzedDataProvider(data)
            text = fdp.ConsumeUnicodeNoSurrogates(len(data))
            try:
                spec = json.loads(text)
            except ValueError:
                spec = {"kind": "pretrain", "name": "x", "config": {"root": text}}
            target.spec(spec)
        elif args.target == "body":
            target.body(data)
        elif args.target == "encapsulated":
            choices = FuzzedChoices(atheris.FuzzedDataProvider(data))
            what, case, _ = pick(choices, ENCAPSULATED)
            case = mutate_encapsulated(case, choices)
            dicom = case.dicom()
            kinds[case.kind] += 1
            target.upload("x.dcm", dicom)
            library[library_outcome(dicom)] += 1
        else:
            what = names[len(data) % len(names)]
            target.upload(what, data)
        took = time.perf_counter() - began
        if took > slowest[0]:
            slowest = (took, f"{what} ({len(data)} bytes of input)")

    sys.argv = [
        sys.argv[0],
        str(corpus_dir),
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-timeout={args.input_timeout}",
    ]
    if args.target == "encapsulated":  # choices, not files: up to 4 KB of them from the start
        sys.argv += ["-max_len=4096", "-len_control=0"]
    start, rss0 = time.monotonic(), rss_mb()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()  # a failing input (5xx, exception, memory over the limit) stops here with its reproducer
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
