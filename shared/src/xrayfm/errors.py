"""Exceptions with messages meant for people: every failure names its offenders."""

from __future__ import annotations


class XrayfmError(Exception):
    """Base class of expected, user-facing errors (the CLI prints them without a traceback)."""


class DataError(XrayfmError, ValueError):
    """A dataset is malformed: bad CSV rows, unknown label values, an empty split..."""


class ImageDecodeError(XrayfmError, ValueError):
    """An image could not be read or decoded (missing, truncated, unsupported, too large)."""


class UnsupportedFormatError(ImageDecodeError):
    """The bytes are not a JPEG, PNG or DICOM image (a wrong file type, not a damaged image)."""


class ImageTooLargeError(ImageDecodeError):
    """The header announces more pixels than allowed (decompression-bomb guard), checked before decoding."""


class CacheMismatchError(XrayfmError):
    """A preprocessing cache no longer matches its source (files changed, other settings)."""


def list_offenders(items, limit: int = 10) -> str:
    """Format up to `limit` offending items plus a count of the rest, for error messages."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    more = len(items) - limit
    return shown + (f" ... and {more} more" if more > 0 else "")
