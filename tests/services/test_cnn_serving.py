"""A CNN checkpoint served by the real stack: the worker warms up and answers with Grad-CAM when the
deployment's default method (here grad_rollout) is one the model cannot do; a request that names a ViT
method other than that default gets a 422 saying rollout needs a ViT."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services.svc_helpers import decode_map, phantom, png_bytes, start_stack

pytestmark = pytest.mark.slow


def test_a_cnn_is_served_with_gradcam(tmp_path: Path) -> None:
    import torch

    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = {"name": "resnet18", "num_classes": 1, "zero_init_last": False}
    meta = {"model": spec, "labels": ["Abnormal"],
            "preprocessing": {"size": 64, "mean": [0.5], "std": [0.25], "channels": 3, "mode": "pad"}}  # fmt: skip
    model = save_checkpoint(tmp_path / "resnet", create_model(**spec), meta)
    running = start_stack(tmp_path / "stack", model, XRAYFM_EXPLAIN_METHOD="grad_rollout")
    try:
        with running.client() as http:
            image = {"file": ("x.png", png_bytes(phantom(90, 70)), "image/png")}
            answer = http.post("/predict", files=image)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["explain_method"] == "gradcam" and decode_map(body["attention_map"]).shape == (90, 70)
            refused = http.post("/predict", params={"method": "rollout"}, files=image)
            assert refused.status_code == 422 and "ViT" in refused.json()["detail"], refused.text
    finally:
        running.stack.stop_all()
