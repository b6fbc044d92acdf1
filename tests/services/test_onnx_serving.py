"""A real worker (XRAYFM_RUNTIME=onnxruntime, XRAYFM_QUANTIZE=auto) serving a published version: it serves
the version's stored graph without exporting it, follows the version's int8 verdict, and says which graph
and why in its log line and in /ready's worker list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.services.svc_helpers import phantom, png_bytes, start_stack
from xrayfm_stack import store as model_store
from xrayfm_training.publish import publish_run

pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_auto_serves_the_stored_fp32_graph_when_int8_was_not_judged(tmp_path: Path, tiny_model: Path) -> None:
    store, cache = tmp_path / "store", tmp_path / "onnx-cache"
    version, info = publish_run(store, "tiny", tiny_model, job_id="job-1", kind="adapt")
    assert info["onnx"]["int8"]["serve_int8"] is False  # a folder with no run behind it: not measured
    model_store.promote(store, "tiny", version)
    running = start_stack(
        tmp_path,
        tiny_model,
        XRAYFM_MODEL_PATH="",
        XRAYFM_MODEL_STORE=str(store),
        XRAYFM_RUNTIME="onnxruntime",
        XRAYFM_QUANTIZE="auto",
        XRAYFM_RUNTIME_CACHE=str(cache),
        XRAYFM_DEVICE="cpu",
    )
    try:
        with running.client() as http:
            ready = http.get("/ready").json()
            answer = http.post("/predict", files={"file": ("x.png", png_bytes(phantom(seed=1)))})
        assert answer.status_code == 200, answer.text
        assert answer.json()["runtime"] == "onnxruntime"
        model = answer.json()["model"]
        assert model["runtime"] == "onnxruntime"
        assert "XRAYFM_QUANTIZE=auto, fp32" in model["runtime_reason"]
        assert "stored model.onnx" in model["runtime_reason"]
        assert "stored model.onnx" in json.dumps(ready)  # /ready's worker list carries the same
        assert not cache.exists() or not any(cache.iterdir())  # served from the version: nothing exported
        log = running.worker.log.read_text()
        assert "XRAYFM_QUANTIZE=auto, fp32: int8 AUROC not measured" in log
    finally:
        running.stack.stop_all()
