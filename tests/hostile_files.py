"""Builders of hostile image files for the tests (never data files in the repository): JPEGs whose frame
header or scan lie, JPEG 2000 codestreams that claim another size, DICOMs around one encapsulated frame."""

from __future__ import annotations

import io
import struct

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid


def sof_offset(data: bytes) -> int:
    """Offset of the SOF0/SOF2 marker of a JPEG written by Pillow."""
    return max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))


def with_sof_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming width x height; the scan data is unchanged."""
    pos, out = sof_offset(data), bytearray(data)
    out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def scan_zeroed(data: bytes) -> bytes:
    """The JPEG with its entropy-coded scan overwritten by zeros, EOI kept."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return data[:start] + bytes(len(data) - start - 2) + b"\xff\xd9"


def cut_with_eoi(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def j2k_with_siz_size(codestream: bytes, width: int, height: int) -> bytes:
    """A J2K codestream whose SIZ claims width x height (image and tile size), the rest unchanged."""
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    out = bytearray(codestream)
    out[8:16] = struct.pack(">II", width, height)  # Xsiz, Ysiz (offsets stay 0)
    out[24:32] = struct.pack(">II", width, height)  # XTsiz, YTsiz: one tile
    return bytes(out)


def dicom(frame: bytes, syntax: str, rows: int, cols: int, bits: int = 8) -> bytes:
    """A CR DICOM with (Rows, Columns) = (`rows`, `cols`) around one encapsulated `frame`."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
