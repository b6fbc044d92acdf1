"""API errors: every error answers as JSON ``{"error": code, "detail": message}``, one handler per exception
type (registered in :func:`xrayfm_gateway.app.create_app`): :class:`APIError`, FastAPI's validation errors,
Starlette's HTTP errors and a lost Redis (``QueueUnavailable``: 503 ``queue_unavailable``)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

SHOWN_ERRORS = 3  # validation errors named in a bad_request's detail
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


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


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render an APIError; an admin action's refusal also goes to the audit log (xrayfm_gateway.audit)."""
    assert isinstance(exc, APIError)
    auditor = getattr(request.app.state, "audit", None)
    if auditor is not None:
        await auditor.admin_outcome(request, exc.status, exc.code)
    return JSONResponse(
        status_code=exc.status,
        content={"error": exc.code, "detail": exc.detail, **exc.extra},
        headers=exc.headers,
    )


def _where_and_why(error: dict[str, Any]) -> str:
    """One validation error as ``body.threshold: Input should be ...`` (its location and pydantic's message)."""
    where = ".".join(str(part)[:40] for part in error.get("loc", ()))
    return f"{where}: {str(error.get('msg', 'invalid'))[:200]}"


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render FastAPI's request-validation errors as ``bad_request`` (422). Where and why, never the input:
    an echo could fail to serialise (NaN, Infinity, deep nesting) and repeat what the caller sent."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    said = "; ".join(_where_and_why(error) for error in errors[:SHOWN_ERRORS])
    more = f" (and {len(errors) - SHOWN_ERRORS} more)" if len(errors) > SHOWN_ERRORS else ""
    return await api_error_handler(request, APIError(422, "bad_request", f"{said}{more}"))


def unavailable(exc: Exception) -> APIError:
    """A lost Redis (``xrayfm_gateway.queue.QueueUnavailable``, whose message says what failed) as the 503
    every route answers: the caller may send the request again in a few seconds."""
    return APIError(503, "queue_unavailable", str(exc), {"Retry-After": "5"})


async def queue_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render a ``QueueUnavailable`` raised by any route or dependency (no route translates it by hand)."""
    return await api_error_handler(request, unavailable(exc))


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render Starlette's HTTP errors (unknown route, wrong method, an unparsable body) in the same shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    error = APIError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
    return await api_error_handler(request, error)
