"""Optional API-key auth, as a FastAPI dependency. Keys are compared in constant time, never logged."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from xrayfm_gateway.errors import APIError
from xrayfm_gateway.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"
_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="needed when XRAYFM_API_KEYS is set"
)


def get_settings(request: Request) -> GatewaySettings:
    """The app's settings (dependency)."""
    return request.app.state.settings


def require_api_key(
    key: str | None = Depends(_header), settings: GatewaySettings = Depends(get_settings)
) -> None:
    """401 unless auth is off or the ``X-API-Key`` header holds one of the configured keys."""
    if not settings.auth_enabled:
        return
    given = (key or "").encode()
    # Compare against every key (no early exit), so timing does not tell which key nearly matched.
    matched = [secrets.compare_digest(given, k.encode()) for k in settings.api_keys]
    if not any(matched):
        raise APIError(
            401,
            "unauthorized",
            f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
