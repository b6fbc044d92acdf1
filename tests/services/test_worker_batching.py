"""XRAYFM_BATCH_MAX=auto (the default) in a real worker process: it measures its model at each load (start
and hot swap), serves with the size it chose, and says which in its log, its heartbeat (/ready) and its
metrics."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.services.svc_helpers import logs_text, phantom, png_bytes, start_stack
from xrayfm_stack import store as model_store

pytestmark = pytest.mark.slow

CHOSEN = re.compile(
    r"batch max (\d+) \(XRAYFM_BATCH_MAX=auto; images/s by batch size, rollout maps: (1: [\d.]+[^)]*)\)"
)


def choices(running) -> list[tuple[int, list[int]]]:
    """Each measurement the worker logged: (size chosen, sizes measured)."""
    return [
        (int(chosen), [int(size) for size in re.findall(r"(\d+): [\d.]+", measured)])
        for chosen, measured in CHOSEN.findall(running.worker.log.read_text())
    ]


def test_auto_batch_max_is_measured_at_each_load_shown_and_used(tmp_path: Path, tiny_model: Path):
    store = tmp_path / "store"
    for version in ("1", "2"):
        assert model_store.add_version(store, "tiny", tiny_model) == version
    model_store.promote(store, "tiny", "1")
    running = start_stack(
        tmp_path, tiny_model, XRAYFM_MODEL_PATH="", XRAYFM_MODEL_STORE=str(store), XRAYFM_MODEL_POLL_S="0.3",
        XRAYFM_BATCH_MAX="auto", XRAYFM_BATCH_TUNE_S="3",
    )  # fmt: skip
    try:
        assert len(choices(running)) == 1, running.worker.log.read_text()[-2000:]
        with running.client() as http:
            model_store.promote(store, "tiny", "2")  # a hot swap measures the new model too
            deadline = time.monotonic() + 60
            while http.get("/ready").json()["workers"][0]["model"]["version"] != "2":
                assert time.monotonic() < deadline, "version 2 was never served"
                time.sleep(0.2)
            measured = choices(running)
            assert len(measured) == 2
            for chosen, sizes in measured:
                assert chosen in sizes and sizes[0] == 1 and max(sizes) <= 8  # the worker has 8 threads
            chosen = measured[-1][0]
            assert [w["batch_max"] for w in http.get("/ready").json()["workers"]] == [chosen]
            resp = http.post("/predict", files={"file": ("x.png", png_bytes(phantom()), "image/png")})
            assert resp.status_code == 200, resp.text
            assert 1 <= resp.json()["batch_size"] <= chosen
        metrics = httpx.get(running.worker_metrics_url, timeout=5).text
        assert f"xrayfm_worker_batch_max {float(chosen)}" in metrics
        assert "succeeded in" not in logs_text(running)
    finally:
        running.stack.stop_all()
