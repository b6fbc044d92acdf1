"""ONNX Runtime serving: parity with torch on real radiographs (probabilities within 1e-4, rollout maps
correlated >= 0.999), LoRA merged before export, the export cache, gradient methods falling back to torch,
int8 quantization close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from xrayfm.data.images import read_image  # noqa: E402
from xrayfm.inference import Predictor, load_served_model  # noqa: E402
from xrayfm.inference.runtime import OnnxPredictor, cached_onnx, make_predictor  # noqa: E402


def real_images(shared_data: Path, n: int = 8) -> list[np.ndarray]:
    found = sorted(
        shared_data.glob("chexpert-small-valid/CheXpert-v1.0-small/valid/*/study1/view1_frontal.jpg")
    )
    if len(found) < n:
        pytest.skip("CheXpert valid images not found")
    return [read_image(path.read_bytes()) for path in found[:n]]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def full_checkpoint(folder: Path) -> Path:
    """A 2-block ViT-Tiny at 64 px with two labels and a class token."""
    return make_tiny_checkpoint(folder, ["Effusion", "Edema"], size=64)


def lora_checkpoint(tmp_path: Path) -> Path:
    """A LoRA adapter (random, non-zero B so the merge matters) over a tiny foundation."""
    import torch

    from xrayfm.models.checkpoint import load_checkpoint, save_adapted
    from xrayfm.models.lora import LoraSettings, apply_lora

    foundation = full_checkpoint(tmp_path / "foundation")
    base, meta = load_checkpoint(foundation)
    peft_model = apply_lora(base, LoraSettings(rank=4, alpha=8, dropout=0.0, targets=("qkv",)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "weights")}
    return save_adapted(tmp_path / "adapter", peft_model, {**meta, "foundation": str(foundation)})


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fp32_onnxruntime_matches_torch_on_real_images(tmp_path, shared_data, kind):
    path = full_checkpoint(tmp_path / "model") if kind == "full" else lora_checkpoint(tmp_path)
    served = load_served_model(path, device="cpu")
    images = real_images(shared_data)
    reference = Predictor(served).predict(images)
    onnx = OnnxPredictor(served, cache_dir=tmp_path / "cache")
    answers = onnx.predict(images)
    for ref, got in zip(reference, answers, strict=True):
        assert got.runtime == "onnxruntime" and ref.runtime == "torch"
        for label, p in ref.probabilities.items():
            assert abs(got.probabilities[label] - p) <= 1e-4, (label, got.probabilities[label], p)
        assert got.prediction == ref.prediction
        assert got.heatmap.shape == ref.heatmap.shape and got.heatmap.dtype == np.uint8
    # the rollout maps themselves (patch grid, float), batched as the worker runs them
    batch = onnx.preprocess(images)
    _, torch_maps, _, _ = Predictor(served).run(batch, True, "rollout")
    _, ort_maps, _, _ = onnx.run(batch, True, "rollout")
    for t_map, o_map in zip(torch_maps, ort_maps, strict=True):
        assert correlation(t_map, o_map) >= 0.999


def test_export_is_cached_by_checkpoint_hash(tmp_path):
    served = load_served_model(full_checkpoint(tmp_path / "model"), device="cpu")
    first = cached_onnx(served, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert served.sha256[:32] in first.name
    assert cached_onnx(served, tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no leftovers
    other = load_served_model(make_tiny_checkpoint(tmp_path / "other", ["A"], size=64), device="cpu")
    assert cached_onnx(other, tmp_path / "cache") != first


def test_gradient_methods_fall_back_to_torch_and_say_so(tmp_path):
    served = load_served_model(full_checkpoint(tmp_path / "model"), device="cpu")
    predictor = make_predictor(served, "onnxruntime", cache_dir=tmp_path / "cache")
    image = np.random.default_rng(0).integers(0, 255, (80, 60), dtype=np.uint8)
    (grad,) = predictor.predict([image], method="grad_rollout")
    (roll,) = predictor.predict([image], method="rollout")
    (plain,) = predictor.predict([image], explain_maps=False)
    assert (
        grad.runtime == "torch" and grad.explain_method == "grad_rollout" and grad.heatmap.shape == (80, 60)
    )
    assert roll.runtime == "onnxruntime" and plain.runtime == "onnxruntime" and plain.heatmap is None
    assert abs(plain.probability - roll.probability) < 1e-6


def test_int8_stays_close_to_fp32(tmp_path, shared_data):
    served = load_served_model(full_checkpoint(tmp_path / "model"), device="cpu")
    images = real_images(shared_data)
    fp32 = OnnxPredictor(served, cache_dir=tmp_path / "cache").predict(images)
    int8 = OnnxPredictor(served, cache_dir=tmp_path / "cache", quantize="int8")
    assert int8.runtime == "onnxruntime-int8" and "-int8-" in int8.onnx_path.name
    for a, b in zip(fp32, int8.predict(images), strict=True):
        for label, p in a.probabilities.items():
            assert abs(b.probabilities[label] - p) < 0.05
        assert correlation(a.heatmap, b.heatmap) > 0.9


def test_unknown_runtime_and_quantize_without_onnx_are_refused(tmp_path):
    from xrayfm.errors import XrayfmError

    served = load_served_model(full_checkpoint(tmp_path / "model"), device="cpu")
    with pytest.raises(XrayfmError, match="unknown runtime"):
        make_predictor(served, "tensorflow")
    with pytest.raises(XrayfmError, match="needs the onnxruntime runtime"):
        make_predictor(served, "torch", quantize="int8")
