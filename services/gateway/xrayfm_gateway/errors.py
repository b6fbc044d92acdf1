"""API errors: one exception type, answered as JSON ``{"error": code, "detail": message}``."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error meant for the caller, with its HTTP status and a stable machine-readable code."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.extra = extra or {}  # more fields of the body (out_of_domain: the gate's "domain" verdict)


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Render an APIError."""
    assert isinstance(exc, APIError)
    return JSONResponse(
        status_code=exc.status,
        content={"error": exc.code, "detail": exc.detail, **exc.extra},
        headers=exc.headers,
    )
