"""The UI's client of the gateway (httpx): readiness and predictions, errors as readable messages."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx


class GatewayError(Exception):
    """The gateway refused or failed a request, or could not be reached; the message is for people."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FrontendSettings:
    """Where the gateway is and how to call it (XRAYFM_GATEWAY_URL, XRAYFM_FRONTEND_API_KEY...)."""

    gateway_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    timeout_s: float = 90.0

    @classmethod
    def from_env(cls) -> FrontendSettings:
        """Read the frontend's variables."""
        return cls(
            gateway_url=os.environ.get("XRAYFM_GATEWAY_URL", cls.gateway_url).rstrip("/"),
            api_key=os.environ.get("XRAYFM_FRONTEND_API_KEY") or None,
            timeout_s=float(os.environ.get("XRAYFM_FRONTEND_TIMEOUT", cls.timeout_s)),
        )


class GatewayClient:
    """Calls the gateway's /ready and /predict."""

    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        self._client = httpx.Client(
            base_url=settings.gateway_url, headers=headers, timeout=settings.timeout_s
        )

    def ready(self) -> tuple[bool, str]:
        """(ready?, explanation)."""
        try:
            resp = self._client.get("/ready", timeout=5.0)
        except httpx.HTTPError as exc:
            return False, f"the gateway at {self.settings.gateway_url} does not answer ({type(exc).__name__})"
        body = _json(resp)
        return resp.status_code == 200 and bool(body.get("ready")), str(body.get("detail", resp.text[:200]))

    def predict(
        self, data: bytes, filename: str, explain: bool = True, method: str | None = None
    ) -> dict[str, Any]:
        """POST the file to /predict; returns the answer or raises GatewayError with the gateway's message."""
        params: dict[str, Any] = {"explain": str(explain).lower()}
        if method:
            params["method"] = method
        try:
            resp = self._client.post("/predict", params=params, files={"file": (filename, data)})
        except httpx.TimeoutException:
            raise GatewayError(f"no answer within {self.settings.timeout_s:g} s; try again later") from None
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.settings.gateway_url}: {exc}") from None
        body = _json(resp)
        if resp.status_code != 200:
            detail = body.get("detail") or resp.text[:300]
            raise GatewayError(f"{detail} (HTTP {resp.status_code})", resp.status_code)
        return body

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
