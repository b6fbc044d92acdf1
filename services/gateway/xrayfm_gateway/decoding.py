"""Uploads are decoded in child processes, never in the gateway's own.

A decoder holds the process it runs in: Pillow's and the DICOM codecs' C code keeps the GIL for long
stretches, and a hostile or merely huge file may take seconds and gigabytes. So the gateway hands every
upload to a small pool of decoder processes (``XRAYFM_DECODE_CONCURRENCY`` of them, started when first
needed) and only waits on a pipe meanwhile: the event loop, ``/health`` and other requests go on.

Each child
- has a hard memory cap (``RLIMIT_AS``, ``XRAYFM_DECODE_MEMORY_MB``): a decode that needs more fails there,
  not in the gateway;
- has a time limit (``XRAYFM_DECODE_TIMEOUT``): past it the child is killed and replaced, and the upload is
  answered 422 ``decode_timeout``;
- runs niced (``DECODER_NICE``): a flood of heavy uploads slows other uploads' decoding first, not the
  event loop nor, on a shared host, the inference worker;
- is replaced when it dies (answered 400 ``corrupt_image``) or when it has grown large after a decode (the
  memory a huge image took is given back to the system with the process).

The pipe carries length-prefixed frames: a small JSON header, then raw bytes (the upload one way; the grey
pixels the other way). Nothing is pickled: a child that a hostile file took
over could send a pickle that runs code in the gateway; here it can send only bytes that are checked.
No library does this without pickling (multiprocessing, concurrent.futures, pebble and loky all pickle
results), hence these ~200 lines.

Run as ``python -m xrayfm_gateway.decoding``: a child (stdin/stdout are the protocol's pipes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import PurePath
from typing import Any, BinaryIO

import numpy as np

from xrayfm_gateway.errors import APIError
from xrayfm_gateway.uploads import DecodedImage, Upload, decode_upload, out_of_memory, reject
from xrayfm_stack.settings import GatewaySettings

log = logging.getLogger("xrayfm.gateway")
_LENGTH = struct.Struct(">I")  # a frame's JSON header length
MAX_HEADER = 64 * 1024  # a child's reply header is a few hundred bytes; more is a broken child
RETIRE_RSS_BYTES = 384 * 2**20  # a child this large after a decode is replaced (its memory goes back)
DECODER_NICE = 10  # decoders yield the CPU to the event loop and the inference worker


@dataclass(frozen=True)
class DecodeLimits:
    """What a child needs of the gateway's settings to check and decode an upload."""

    max_pixels: int
    max_image_side: int
    min_image_side: int
    transport_side: int
    domain_policy: str

    @classmethod
    def of(cls, settings: GatewaySettings) -> DecodeLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    def settings(self) -> GatewaySettings:
        return GatewaySettings(**asdict(self))


# -- the frames ------------------------------------------------------------------------------------------


def _frame(header: dict[str, Any], *payloads: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
    text = json.dumps(header).encode()
    return [_LENGTH.pack(len(text)), text, *(memoryview(p) for p in payloads)]


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError
    return data


def _read_header(stream: BinaryIO) -> dict[str, Any]:
    """A frame's JSON header (the child's side)."""
    header: dict[str, Any] = json.loads(_read_exactly(stream, _LENGTH.unpack(_read_exactly(stream, 4))[0]))
    return header


# -- the child -------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _decode_one(header: dict[str, Any], data: bytes, settings: GatewaySettings) -> list[bytes | memoryview]:
    """One request: the reply frame (an answer, or the refusal the gateway passes on)."""
    upload = Upload(data, f"upload{header['suffix']}" if header.get("suffix") else None, header.get("type"))
    try:
        try:
            decoded = decode_upload(upload, settings, pixel_budget=header.get("budget"))
        except MemoryError:  # outside the decoders (e.g. while resizing)
            raise out_of_memory() from None
    except APIError as exc:
        return _frame({"ok": False, "status": exc.status, "code": exc.code, "detail": exc.detail})
    pixels = np.ascontiguousarray(decoded.pixels, dtype=np.uint8)
    reply = {
        "ok": True,
        "format": decoded.format,
        "width": decoded.width,
        "height": decoded.height,
        "shape": list(pixels.shape),
        "facts": decoded.facts,
        "rss": _rss_bytes(),
    }
    return _frame(reply, pixels.data)


def child_main() -> None:
    """Serve decode requests on stdin/stdout until stdin closes."""
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    proto_in = sys.stdin.buffer
    limits = _read_header(proto_in)
    memory = limits.pop("memory_bytes")
    settings = DecodeLimits(**limits).settings()
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    os.nice(DECODER_NICE)
    while True:
        try:
            header = _read_header(proto_in)
            data = _read_exactly(proto_in, int(header["size"]))
        except EOFError:
            return
        for part in _decode_one(header, data, settings):
            proto_out.write(part)
        proto_out.flush()
        del data


# -- the pool (in the gateway) ---------------------------------------------------------------------------


class _Child:
    """One decoder process and its pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, hello: dict[str, Any]) -> _Child:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xrayfm_gateway.decoding",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        child = cls(process)
        await child._send(_frame(hello))
        return child

    async def _send(self, parts: list[bytes | memoryview]) -> None:
        assert self.process.stdin is not None
        for part in parts:
            self.process.stdin.write(part)
        await self.process.stdin.drain()

    async def call(self, header: dict[str, Any], data: bytes | bytearray) -> tuple[dict[str, Any], bytes]:
        """Send one upload; the reply's header and its payload bytes."""
        assert self.process.stdout is not None
        await self._send(_frame({**header, "size": len(data)}, data))
        size = _LENGTH.unpack(await self.process.stdout.readexactly(4))[0]
        if size > MAX_HEADER:
            raise EOFError("reply header too long")
        reply = json.loads(await self.process.stdout.readexactly(size))
        if not reply.get("ok"):
            return reply, b""
        height, width = (int(v) for v in reply["shape"])
        if not (0 < height <= header["side"] and 0 < width <= header["side"]):
            raise EOFError("reply out of bounds")
        return reply, await self.process.stdout.readexactly(height * width)

    def kill(self) -> None:
        """Stop the child now (asyncio reaps it)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class DecodePool:
    """Decode uploads in at most ``decode_concurrency`` child processes (see the module's docstring)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.limits = DecodeLimits.of(settings)
        self.size = settings.decode_concurrency
        self.timeout_s = settings.decode_timeout_s
        self.memory_bytes = settings.decode_memory_mb * 2**20
        self._idle: list[_Child] = []
        self._slots = asyncio.Semaphore(self.size)
        self._all: set[_Child] = set()

    async def decode(self, upload: Upload, pixel_budget: int | None = None) -> DecodedImage:
        """The upload checked and decoded by a child; an :class:`APIError` saying why it cannot be."""
        header = {
            "suffix": PurePath(upload.filename or "").suffix.lower()[:16] or None,
            "type": upload.content_type,
            "budget": pixel_budget,
            "side": self.limits.transport_side,
        }
        async with self._slots:
            child = await self._child()
            kept = False
            try:
                reply, payload = await asyncio.wait_for(child.call(header, upload.data), self.timeout_s)
                kept = reply.get("rss", 0) <= RETIRE_RSS_BYTES
            except TimeoutError:
                raise reject(
                    422, "decode_timeout",
                    f"decoding took longer than {self.timeout_s:g} s (XRAYFM_DECODE_TIMEOUT): refused",
                ) from None  # fmt: skip
            except (EOFError, asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError):
                raise reject(
                    400, "corrupt_image",
                    "the decoder gave up on this file (corrupt, or beyond the decoder's memory limit)",
                ) from None  # fmt: skip
            finally:  # a child that failed, timed out, was cancelled mid-reply or grew large is replaced
                if kept:
                    self._idle.append(child)
                else:
                    self._retire(child)
        if not reply["ok"]:
            raise reject(int(reply["status"]), str(reply["code"]), str(reply["detail"]))
        height, width = reply["shape"]
        pixels = np.frombuffer(payload, np.uint8, height * width).reshape(height, width)
        return DecodedImage(
            pixels=pixels,
            format=str(reply["format"]),
            width=int(reply["width"]),
            height=int(reply["height"]),
            facts=reply.get("facts"),
        )

    async def _child(self) -> _Child:
        """An idle child that is still alive, else a new one."""
        while self._idle:
            child = self._idle.pop()
            if child.process.returncode is None:
                return child
            self._all.discard(child)  # it died while idle (killed from outside)
        return await self._start()

    async def _start(self) -> _Child:
        hello = {**asdict(self.limits), "memory_bytes": self.memory_bytes}
        child = await _Child.start(hello)
        self._all.add(child)
        return child

    def _retire(self, child: _Child) -> None:
        self._all.discard(child)
        child.kill()

    @property
    def pids(self) -> list[int]:
        """The live children's process ids (for metrics and tests)."""
        return [c.process.pid for c in self._all]

    async def close(self) -> None:
        """Stop every child."""
        children, self._all, self._idle = list(self._all), set(), []
        for child in children:
            child.kill()
        await asyncio.gather(*(c.process.wait() for c in children))


if __name__ == "__main__":
    child_main()
