"""Explanations on CNN backbones: Grad-CAM's default layer per family is what the head pools, Grad-CAM
matches a hand computation on ConvNeXt and DenseNet (ResNet: test_explain_gradients.py), a LoRA-wrapped
CNN explains like its base, and the rollout methods refuse a CNN ("rollout needs a ViT")."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_vit
from xrayfm.errors import XrayfmError
from xrayfm.explain import default_method, explain, gradcam, methods_for
from xrayfm.explain.gradients import default_cam_layer
from xrayfm.models import LoraSettings, apply_lora, create_model

CNNS = {
    "resnet18": {},
    "convnext_atto": {"depths": (1, 1, 1, 1)},
    "densenet121": {"growth_rate": 8, "block_config": (1, 1, 1, 1), "bn_size": 2},
}
LAYERS = {"resnet18": "layer4", "convnext_atto": "stages.3", "densenet121": "features.norm5"}


def _cnn(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=3, **CNNS[name]).eval()


def _images(b: int = 2, size: int = 96) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(CNNS))
def test_default_layer_output_is_what_the_head_pools(name):
    model = _cnn(name)
    layer = default_cam_layer(model)
    assert layer is model.get_submodule(LAYERS[name])
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = _images(1)
    with torch.no_grad():
        model(x)
        features = model.forward_features(x)
    handle.remove()
    torch.testing.assert_close(seen[0], features, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["convnext_atto", "densenet121"])
def test_gradcam_matches_hand_computation(name):
    """The reference uses no hook: forward_features -> forward_head, gradient of the target logit."""
    model = _cnn(name, seed=1)
    x = _images(2)
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    for target in (0, 2):
        (grad,) = torch.autograd.grad(logits[:, target].sum(), feats, retain_graph=True)
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1)).detach()
        lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
        expected = (cam - lo) / (hi - lo).clamp_min(1e-12)
        torch.testing.assert_close(gradcam(model, x, target), expected, atol=1e-5, rtol=1e-4)
    assert gradcam(model, x).shape == (2, 3, 3)  # 96 px / stride 32


@pytest.mark.parametrize("name", list(CNNS))
def test_lora_wrapped_cnn_explains_like_its_base(name):
    x = _images(2)
    plain = gradcam(_cnn(name), x, 1)
    targets = ("fc1",) if name.startswith("convnext") else ("conv1",)
    wrapped = apply_lora(_cnn(name), LoraSettings(rank=2, targets=targets))
    torch.testing.assert_close(explain(wrapped, x, "gradcam", target=1), plain.numpy(), atol=1e-5, rtol=1e-4)


def test_rollout_methods_refuse_a_cnn():
    model = _cnn("resnet18")
    assert methods_for(model) == ("gradcam",) and default_method(model) == "gradcam"
    assert methods_for(tiny_vit()) == ("rollout", "grad_rollout") and default_method(tiny_vit()) == "rollout"
    for method in ("rollout", "grad_rollout", "grad-rollout"):
        with pytest.raises(XrayfmError, match="rollout needs a ViT.*method='gradcam'"):
            explain(model, _images(1), method)


def test_gradcam_sign_explains_the_negated_score():
    model = _cnn("resnet18", seed=2)
    x = _images(2)
    feats = model.forward_features(x)
    score = -model.forward_head(feats)[:, 1]
    (grad,) = torch.autograd.grad(score.sum(), feats)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1)).detach()
    lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    expected = (cam - lo) / (hi - lo).clamp_min(1e-12)
    torch.testing.assert_close(gradcam(model, x, 1, sign=torch.tensor([-1.0, -1.0])), expected, atol=1e-5,
                               rtol=1e-4)  # fmt: skip
    mixed = gradcam(model, x, 1, sign=torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(mixed[0], gradcam(model, x[:1], 1)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], expected[1], atol=1e-5, rtol=1e-4)
