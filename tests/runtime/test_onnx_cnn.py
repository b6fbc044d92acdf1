"""CNN checkpoints in the inference library: the torch Predictor draws Grad-CAM by default and refuses
rollout ("rollout needs a ViT"); ONNX Runtime serves a CNN's logits (exported alone) with Grad-CAM from
torch. ViTs keep their behaviour (tests/runtime/test_onnx_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint

pytest.importorskip("onnxruntime")

from xrayfm.errors import XrayfmError  # noqa: E402
from xrayfm.inference import Predictor, load_served_model  # noqa: E402
from xrayfm.inference.runtime import make_predictor  # noqa: E402


def cnn_checkpoint(folder: Path, lora: bool = False) -> Path:
    """A small random ResNet at 64 px with two labels (full), or a LoRA adapter over it."""
    import torch

    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_adapted, save_checkpoint
    from xrayfm.models.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    spec = {"name": "resnet18", "num_classes": 2, "zero_init_last": False}
    meta = {
        "model": spec,
        "labels": ["Effusion", "Edema"],
        "preprocessing": {"size": 64, "mean": [0.5], "std": [0.25], "channels": 3, "mode": "pad"},
    }
    full = save_checkpoint(folder / "full", create_model(**spec), meta)
    if not lora:
        return full
    peft_model = apply_lora(create_model(**spec), LoraSettings(rank=2, targets=("conv1", "conv2")))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return save_adapted(folder / "adapter", peft_model, {**meta, "foundation": str(full)})


def grey_images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(48 + 8 * i, 64), dtype=np.uint8) for i in range(n)]


def test_torch_predictor_draws_gradcam_and_refuses_rollout(tmp_path):
    predictor = Predictor(load_served_model(cnn_checkpoint(tmp_path, lora=True), device="cpu"))
    assert predictor.methods == ("gradcam",) and predictor.default_method == "gradcam"
    images = grey_images()
    for method in (None, "gradcam", "grad-cam"):
        answers = predictor.predict(images, method=method)
        assert [a.explain_method for a in answers] == ["gradcam"] * 3
        for image, answer in zip(images, answers, strict=True):
            assert answer.heatmap.shape == image.shape and answer.heatmap.dtype == np.uint8
    for method in ("rollout", "grad_rollout"):
        with pytest.raises(XrayfmError, match="rollout needs a ViT"):
            predictor.predict(images, method=method)
    assert predictor.predict(images, explain_maps=False, method="rollout")[0].heatmap is None  # no map asked


def test_vit_predictor_keeps_rollout_default_and_refuses_gradcam(tmp_path):
    predictor = Predictor(load_served_model(make_tiny_checkpoint(tmp_path / "vit", ["A"]), device="cpu"))
    assert predictor.methods == ("rollout", "grad_rollout")
    assert predictor.predict(grey_images(1), method=None)[0].explain_method == "rollout"
    with pytest.raises(XrayfmError, match="gradcam is not available.*Vision Transformer"):
        predictor.predict(grey_images(1), method="gradcam")


@pytest.mark.parametrize("lora", [False, True])
def test_onnxruntime_serves_cnn_logits_with_gradcam_from_torch(tmp_path, lora):
    served = load_served_model(cnn_checkpoint(tmp_path, lora=lora), device="cpu")
    torch_answers = Predictor(served).predict(grey_images(), method="gradcam")
    onnx = make_predictor(served, "onnxruntime", cache_dir=tmp_path / "onnx")
    import onnxruntime as ort

    outputs = [o.name for o in ort.InferenceSession(str(onnx.onnx_path)).get_outputs()]
    assert outputs == ["logits", "features"]  # no attention to export; the domain gate's features
    plain = onnx.predict(grey_images(), explain_maps=False)
    assert {a.runtime for a in plain} == {"onnxruntime"}
    for a, b in zip(plain, torch_answers, strict=True):
        for label in a.probabilities:
            assert abs(a.probabilities[label] - b.probabilities[label]) < 1e-4
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
    mapped = onnx.predict(grey_images(), method=None)
    assert {a.runtime for a in mapped} == {"torch"} and {a.explain_method for a in mapped} == {"gradcam"}
    for a, b in zip(mapped, torch_answers, strict=True):
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
    with pytest.raises(XrayfmError, match="rollout needs a ViT"):
        onnx.predict(grey_images(1), method="rollout")


def test_one_output_model_maps_the_evidence_for_its_answer(tmp_path):
    """Binary head: the label's Grad-CAM when predicted, the negated logit's when the answer is negative."""
    import torch

    from xrayfm.explain import gradcam

    served = load_served_model(cnn_checkpoint(tmp_path), device="cpu")
    served.labels = ["Effusion"]  # keep one output of the two-label test model
    served.model.reset_classifier(1)
    predictor = Predictor(served)
    images = grey_images(4)
    batch = predictor.preprocess(images)
    with torch.no_grad():
        p = torch.sigmoid(served.model(batch))[:, 0]
    for threshold in (0.0, 1.01, float(p.median())):  # all positive, all negative, mixed
        served.threshold = threshold
        sign = torch.where(p >= threshold, 1.0, -1.0)
        logits, maps = predictor.forward(batch, True, "gradcam")
        np.testing.assert_allclose(maps, gradcam(served.model, batch, 0, sign=sign).numpy(), atol=1e-6)
    assert not np.allclose(
        predictor.forward(batch, True, "gradcam")[1], gradcam(served.model, batch, 0).numpy()
    )
