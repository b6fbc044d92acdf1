"""A limit on request bodies: every body but an upload's is at most ``XRAYFM_MAX_JSON_KB`` (413 above).

JSON bodies (job specs, operating points, feedback) are a few kilobytes; nothing reads a larger one. The
upload routes (:data:`UPLOAD_PATHS`) keep their own, larger limits (:mod:`xrayfm_gateway.uploads`: multipart
only, anything else is refused with 415 unread); a multipart body sent anywhere else is held to this one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xrayfm_gateway.errors import APIError, api_error_handler

UPLOAD_PATHS = frozenset({"/predict", "/predict/study", "/jobs"})  # the routes that read uploads
STOW_PATH = "/dicomweb/studies"  # STOW-RS reads uploads too: here and at /dicomweb/studies/{study}


def is_upload(path: str) -> bool:
    """True for the routes that read uploads (and set their own limits), the Open Inference Protocol's
    ``/v2/models/.../infer`` included (routers/inference_v2.py)."""
    path = path.rstrip("/")
    infer = path.startswith("/v2/models/") and path.endswith("/infer")
    return path in UPLOAD_PATHS or path == STOW_PATH or path.startswith(f"{STOW_PATH}/") or infer


class BodyLimit:
    """Refuse, with 413 ``body_too_large``, a request body over `max_bytes`: by its Content-Length before
    reading anything, else by counting what arrives (a chunked body). The body is read here, at most
    `max_bytes` of it, and handed to the app whole; requests to the upload routes (:func:`is_upload`) pass
    untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        kib = self.max_bytes // 1024
        error = APIError(413, "body_too_large", f"the request body is over {kib} KiB (XRAYFM_MAX_JSON_KB)")
        response = await api_error_handler(Request(scope), error)
        await response(scope, receive, send)  # the server discards the rest of the body
