"""API-key auth on a second real gateway (same Redis and worker): 401 without or with a wrong key,
200 with a right one, health endpoints open, and keys never in the logs."""

from __future__ import annotations

import httpx
import pytest

from tests.services.svc_helpers import logs_text, phantom, png_bytes
from xrayfm_local import launcher as stack_lib

pytestmark = pytest.mark.slow

KEYS = ("key-alpha-51f0c3", "key-beta-9ad2e7")


@pytest.fixture(scope="module")
def auth_gateway(live_stack):
    port = stack_lib.free_port()
    proc = live_stack.stack.start_gateway(
        port, name="gateway-auth", extra_env={"XRAYFM_API_KEYS": ",".join(KEYS)}
    )
    yield f"http://127.0.0.1:{port}"
    live_stack.stack.stop(proc)


def predict(url: str, key: str | None):
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.post(
        f"{url}/predict", files={"file": ("x.png", png_bytes(phantom()))}, headers=headers, timeout=60
    )


def test_missing_and_wrong_keys_are_401(auth_gateway):
    for key in (None, "", "key-alpha", "wrong-key-6c1d88", KEYS[0] + "x"):
        resp = predict(auth_gateway, key)
        assert resp.status_code == 401, (key, resp.text)
        assert resp.json()["error"] == "unauthorized"
    jobs = httpx.post(f"{auth_gateway}/jobs", files={"file": ("x.png", png_bytes(phantom()))}, timeout=30)
    assert jobs.status_code == 401
    assert (
        httpx.get(f"{auth_gateway}/jobs/9b2f7a1e-0000-4000-8000-000000000000", timeout=10).status_code == 401
    )


def test_each_configured_key_works(auth_gateway):
    for key in KEYS:
        resp = predict(auth_gateway, key)
        assert resp.status_code == 200, resp.text
        assert resp.json()["prediction"] in ("Abnormal", "Normal")


def test_health_ready_metrics_need_no_key(auth_gateway):
    assert httpx.get(f"{auth_gateway}/health", timeout=10).status_code == 200
    assert httpx.get(f"{auth_gateway}/ready", timeout=10).status_code == 200
    assert httpx.get(f"{auth_gateway}/metrics", timeout=10).status_code == 200


def test_auth_off_by_default(live_stack):
    assert predict(live_stack.gateway_url, None).status_code == 200


def test_keys_never_logged(auth_gateway, live_stack):
    predict(auth_gateway, "wrong-key-6c1d88")
    predict(auth_gateway, KEYS[1])
    logs = logs_text(live_stack)
    assert "gateway-auth" in " ".join(p.name for p in live_stack.stack.procs)
    for secret in (*KEYS, "wrong-key-6c1d88"):
        assert secret not in logs
