"""Receive and check an upload at the gateway: multipart parsed in memory (nothing is written to disk),
size limits enforced while streaming, the image decoded to grey pixels, bad input refused clearly.

Status codes: 415 = not a JPEG/PNG/DICOM (by its name, its content type or its content), or not a
multipart upload; 413 = over ``XRAYFM_MAX_UPLOAD_MB``; 400 = empty, corrupt or truncated; 422 = absurd
dimensions or too many pixels (decompression bombs are refused from the header, before decoding).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from fastapi import Request
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from xrayfm.data.images import SUPPORTED_SUFFIXES, image_info, read_image, shape_within
from xrayfm.domain.checks import upload_facts
from xrayfm.errors import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from xrayfm_gateway.errors import APIError
from xrayfm_gateway.metrics import REJECTED
from xrayfm_stack.settings import GatewaySettings

if TYPE_CHECKING:  # python-multipart declares its callbacks' TypedDict for type checkers only
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger("xrayfm.gateway")
FILE_FIELD = "file"
STUDY_FIELD = "files"  # /predict/study: one part per image, all named so
_MULTIPART_SLACK = 64 * 1024  # headers, boundaries and small form fields around the file
_TYPES_BY_MIME = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "application/dicom": ".dcm",
    "application/dicom+dcm": ".dcm",
}
_NEUTRAL_MIMES = {"", "application/octet-stream", "binary/octet-stream"}


@dataclass
class Upload:
    """An uploaded file's bytes and what the client said about it (the name is never logged)."""

    data: bytes | bytearray
    filename: str | None
    content_type: str | None


class UploadBuffer:
    """The bytes of uploads this gateway process holds now, bounded (``XRAYFM_UPLOAD_BUFFER_MB``): when
    full, another upload is answered 503 ``busy`` while it streams in, and the memory stays bounded
    whatever the number of clients. Counted on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    @contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """A `take(n)` that reserves n more bytes for this request until the block ends."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.used + n > self.limit:
                raise reject(
                    503, "busy", "the gateway holds as many uploads as it may now: send it again shortly",
                    {"Retry-After": "2"},
                )  # fmt: skip
            self.used += n
            taken += n

        try:
            yield take
        finally:
            self.used -= taken


@dataclass
class DecodedImage:
    """Grey uint8 pixels, at most ``transport_side`` on the long side, plus technical header facts."""

    pixels: np.ndarray
    format: str
    width: int  # of the original image
    height: int
    # for the domain gate: colourfulness, DICOM Modality/BodyPart/View (no PHI)
    facts: dict[str, Any] | None = None


def reject(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> APIError:
    """An APIError for a refused upload, counted by reason."""
    REJECTED.labels(code).inc()
    return APIError(status, code, detail, headers)


class _FileParts:
    """python-multipart callbacks that keep the parts named `field` in memory, each within a size limit,
    at most `max_files` of them (one more is counted, not kept, so the refusal can say so). Each kept byte
    is reserved with `take` first (see :class:`UploadBuffer`)."""

    def __init__(self, field: str, max_bytes: int, max_files: int, take: Callable[[int], None]) -> None:
        self.field, self.max_bytes, self.max_files, self.take = field, max_bytes, max_files, take
        self.files: list[Upload] = []
        self.found = 0
        self._data: bytearray | None = None  # the part being kept, if any
        self._size = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._extend("_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._extend("_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _extend(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._data, self._size = {}, None, 0

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if params.get(b"name", b"").decode("latin-1") != self.field:
            return
        self.found += 1
        if self.found > self.max_files:
            return
        filename = params.get(b"filename")
        mime = self._headers.get(b"content-type")
        self._data = bytearray()
        self.files.append(
            Upload(
                data=self._data,
                filename=filename.decode("utf-8", "replace") if filename is not None else None,
                content_type=mime.decode("latin-1").split(";")[0].strip().lower() if mime else None,
            )
        )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is None:
            return
        self._size += end - start
        if self._size > self.max_bytes:
            raise reject(
                413, "file_too_large", f"the file exceeds the upload limit of {self.max_bytes:,} bytes"
            )
        self.take(end - start)
        self._data += data[start:end]

    def _part_end(self) -> None:
        self._data = None


async def receive_upload(request: Request, max_bytes: int, take: Callable[[int], None]) -> Upload:
    """Read the multipart body's one ``file`` field into memory, refusing oversize bodies while streaming."""
    [upload] = await receive_uploads(request, max_bytes, FILE_FIELD, 1, max_bytes, take)
    return upload


async def receive_uploads(
    request: Request, max_bytes: int, field: str, max_files: int, max_total: int, take: Callable[[int], None],
    media_type: bytes = b"multipart/form-data",
) -> list[Upload]:  # fmt: skip
    """Read the multipart body's parts named `field` (1 to `max_files`, each at most `max_bytes`, all at most
    `max_total`) into memory, each byte reserved with `take`, refusing oversize bodies while streaming.
    `media_type` ``multipart/related`` with `field` ``""``: every part (they carry no name; STOW-RS)."""
    example = f'curl -F "{field}=@image.png"'
    mime, params = parse_options_header(request.headers.get("content-type", ""))
    if mime != media_type:
        raise reject(
            415,
            "not_multipart",
            f"send the image as multipart/form-data in a field named '{field}' ({example})",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise reject(400, "bad_multipart", "multipart/form-data without a boundary")
    allowed = min(max_bytes * max_files, max_total)
    parts = _FileParts(field, max_bytes, max_files, take)
    try:
        parser = MultipartParser(boundary, parts.callbacks())  # refuses a boundary over 256 characters
        async for chunk in body_within(request, allowed + _MULTIPART_SLACK, allowed):
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:  # MultipartParseError included
        raise reject(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    if parser.state != MultipartState.END:  # finalize() accepts a body cut short: its last part may be too
        raise reject(400, "bad_multipart", "the multipart body ends before its closing boundary (truncated?)")
    if parts.found == 0:
        raise reject(422, "missing_file", f"no field named '{field}' in the form ({example})")
    if parts.found > max_files:
        raise reject(
            422,
            "several_files",
            "send exactly one field named 'file'" if max_files == 1
            else f"at most {max_files} files named '{field}' per request (XRAYFM_MAX_STUDY_IMAGES)",
        )  # fmt: skip
    return parts.files


async def body_within(request: Request, limit: int, shown: int | None = None) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive; 413 ``file_too_large`` as soon as it is declared
    (``Content-Length``) or found to be over `limit` bytes (the detail names `shown`, default `limit`)."""
    shown = limit if shown is None else shown
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise reject(
            413, "file_too_large", f"the upload ({int(declared):,} bytes) exceeds the limit of {shown:,}"
        )
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise reject(413, "file_too_large", f"the upload exceeds the limit of {shown:,} bytes")
        yield chunk


def _declared_suffix(upload: Upload) -> str | None:
    """The type the client claims: the file name's suffix, else a known content type, else None."""
    suffix = PurePath(upload.filename or "").suffix.lower()
    if suffix:
        return suffix
    mime = upload.content_type or ""
    if mime in _NEUTRAL_MIMES:
        return None
    return _TYPES_BY_MIME.get(mime, mime)


def decode_upload(upload: Upload, settings: GatewaySettings, pixel_budget: int | None = None) -> DecodedImage:
    """Check and decode an upload to grey pixels sized for transport (in a decoder process:
    :mod:`xrayfm_gateway.decoding`). `pixel_budget`: what is left of the study's ``XRAYFM_MAX_STUDY_PIXELS``."""
    if not upload.data:
        raise reject(400, "empty_file", "the uploaded file is empty (0 bytes)")
    declared = _declared_suffix(upload)
    if declared is not None and declared not in SUPPORTED_SUFFIXES:
        raise reject(415, "unsupported_type", f"unsupported file type {declared!r}: send PNG, JPEG or DICOM")
    try:  # the header only: dimensions are checked before a single pixel is decoded
        info = image_info(upload.data, max_pixels=settings.max_pixels)
    except ImageDecodeError as exc:
        raise _header_error(exc) from None
    except MemoryError:
        raise out_of_memory() from None
    except Exception as exc:  # decoders raise more than the library maps (e.g. struct.error from Pillow)
        log.warning("header reader raised %s", type(exc).__name__)
        raise reject(400, "corrupt_image", "cannot read the image header (truncated or corrupt?)") from None
    width, height = int(info["width"]), int(info["height"])
    check_dimensions(width, height, settings)
    if pixel_budget is not None and width * height > pixel_budget:
        raise reject(
            422,
            "study_too_large",
            f"image of {width}x{height} takes the study over its limit of pixels in all "
            "(XRAYFM_MAX_STUDY_PIXELS; refused before decoding)",
        )
    pixels = _decode_pixels(upload.data, settings, info)
    fitted = fit_within(pixels, settings.transport_side)
    return DecodedImage(
        pixels=fitted,
        format=str(info["format"]),
        width=width,
        height=height,
        facts=_facts(upload.data, info, settings) if settings.domain_policy != "off" else None,
    )


def _facts(data: bytes | bytearray, info: dict[str, Any], settings: GatewaySettings) -> dict[str, Any] | None:
    """What the upload says beyond its grey pixels, for the worker's domain gate (a colour file is decoded
    once more, small: its colourfulness)."""
    try:
        # upload_facts reads any bytes-like data (it hands them to image_info), though it annotates bytes
        return upload_facts(cast(bytes, data), info, settings.max_pixels).to_dict() or None
    except ImageDecodeError:  # the pixels decoded already: a thumbnail that fails says nothing new
        return None


def _decode_pixels(data: bytes | bytearray, settings: GatewaySettings, info: dict[str, Any]) -> np.ndarray:
    """The grey pixels of `data`; a decoding failure is a 400."""
    try:
        return read_image(data, max_pixels=settings.max_pixels)
    except ImageDecodeError as exc:
        raise reject(400, "corrupt_image", _public_message(exc)) from None
    except MemoryError:
        raise out_of_memory() from None
    except Exception as exc:  # decoders raise more than the library maps (e.g. struct.error from Pillow)
        log.warning("decoder raised %s on a %s upload", type(exc).__name__, info["format"])
        raise reject(
            400, "corrupt_image", f"cannot decode the {info['format']} pixels (truncated or corrupt?)"
        ) from None


def out_of_memory() -> APIError:
    """The refusal of an image whose decoding needs more memory than a decoder process may use."""
    return reject(
        422,
        "image_too_large",
        "decoding this image needs more memory than a decoder may use (XRAYFM_DECODE_MEMORY_MB)",
    )


def _public_message(exc: ImageDecodeError) -> str:
    return str(exc).replace("<upload>: ", "")


def _header_error(exc: ImageDecodeError) -> APIError:
    message = _public_message(exc)
    if isinstance(exc, UnsupportedFormatError):
        return reject(415, "unsupported_type", f"not a PNG, JPEG or DICOM file ({message})")
    if isinstance(exc, ImageTooLargeError):
        return reject(422, "image_too_large", message)
    return reject(400, "corrupt_image", message)


def check_dimensions(width: int, height: int, settings: GatewaySettings) -> None:
    if width * height > settings.max_pixels:
        raise reject(
            422,
            "image_too_large",
            f"image of {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{settings.max_pixels:,} (refused before decoding)",
        )
    if max(width, height) > settings.max_image_side or min(width, height) < settings.min_image_side:
        raise reject(
            422,
            "bad_dimensions",
            f"image of {width}x{height}: each side must be {settings.min_image_side}.."
            f"{settings.max_image_side} pixels",
        )


def fit_within(pixels: np.ndarray, side: int) -> np.ndarray:
    """Downscale (aspect kept) so that the long side is at most `side`; smaller images are unchanged."""
    height, width = shape_within(pixels.shape, side)
    if (height, width) == pixels.shape:
        return np.ascontiguousarray(pixels)
    return np.asarray(
        Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    )
