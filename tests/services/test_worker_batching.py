"""XRAYFM_BATCH_MAX=auto (the default) in a real worker process: it measures its model at load, serves
with the size it chose, and says which in its log, its heartbeat (/ready) and its metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from svc_helpers import logs_text, phantom, png_bytes, start_stack

pytestmark = pytest.mark.slow


def test_auto_batch_max_is_measured_shown_and_used(tmp_path: Path, tiny_model: Path):
    running = start_stack(tmp_path, tiny_model, XRAYFM_BATCH_MAX="auto", XRAYFM_BATCH_TUNE_S="3")
    try:
        worker_log = running.worker.log.read_text()
        found = re.search(r"batch max (\d+) \(XRAYFM_BATCH_MAX=auto; images/s by batch size, rollout maps: "
                          r"(1: [\d.]+.*)\)", worker_log)  # fmt: skip
        assert found, worker_log[-2000:]
        chosen = int(found.group(1))
        measured = [int(size) for size in re.findall(r"(\d+): [\d.]+", found.group(2))]
        assert chosen in measured and max(measured) <= 8  # the local stack's worker has 8 threads
        with running.client() as http:
            workers = http.get("/ready").json()["workers"]
            assert [w["batch_max"] for w in workers] == [chosen]
            resp = http.post("/predict", files={"file": ("x.png", png_bytes(phantom()), "image/png")})
            assert resp.status_code == 200, resp.text
            assert 1 <= resp.json()["batch_size"] <= chosen
        metrics = httpx.get(running.worker_metrics_url, timeout=5).text
        assert f"xrayfm_worker_batch_max {float(chosen)}" in metrics
        assert "succeeded in" not in logs_text(running)
    finally:
        running.stack.stop_all()
