"""Gradient-weighted rollout (Chefer et al.) against a reference, and Grad-CAM on tiny CNNs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from peft import LoraConfig, get_peft_model

from tests.explain.vit_reference import reference_grad_rollout
from tests.helpers import tiny_vit
from xrayfm.errors import XrayfmError
from xrayfm.explain import gradcam, gradient_rollout


def _images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("kwargs", "prefix", "use_cls"),
    [({}, 1, True), ({"class_token": False, "global_pool": "avg", "reg_tokens": 4}, 4, False)],
)
def test_grad_rollout_matches_reference(kwargs: dict, prefix: int, use_cls: bool) -> None:
    # Wider than the tiny default: the library accumulates relevance in float32 and the read-out rescales
    # each map to [0, 1], so the gradients must stand well above float32 rounding for a 1e-4 comparison.
    vit, x = tiny_vit(embed_dim=192, num_heads=3, **kwargs), _images()
    for target in (0, 2):
        expected = reference_grad_rollout(vit, x, target, prefix, use_cls, (4, 4))
        got = gradient_rollout(vit, x, target)
        assert got.shape == (2, 4, 4)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_grad_rollout_depends_on_target_and_defaults_to_top_class() -> None:
    torch.manual_seed(1)
    vit, x = tiny_vit(), _images(3)
    maps = [gradient_rollout(vit, x, t) for t in range(3)]
    assert not torch.allclose(maps[0], maps[1], atol=1e-2)
    assert not torch.allclose(maps[1], maps[2], atol=1e-2)
    with torch.no_grad():
        top = vit(x).argmax(1)
    torch.testing.assert_close(gradient_rollout(vit, x), gradient_rollout(vit, x, top))
    # one target per image
    per_image = gradient_rollout(vit, x, [0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(per_image[i], maps[i][i])


def test_grad_rollout_frozen_lora_model_equals_plain() -> None:
    torch.manual_seed(2)
    vit, x = tiny_vit(), _images()
    plain = gradient_rollout(vit, x, 1)
    wrapped = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, target_modules=["qkv"]))
    assert any(not p.requires_grad for p in wrapped.parameters())  # the base weights are frozen
    torch.testing.assert_close(gradient_rollout(wrapped, x, 1), plain, atol=1e-4, rtol=0)
    assert all(p.grad is None for p in wrapped.parameters())  # explaining leaves no .grad behind


@pytest.mark.parametrize(
    ("name", "size", "grid"), [("resnet18", 64, 2), ("resnet18", 96, 3), ("convnext_atto", 64, 2)]
)
def test_gradcam_shape(name: str, size: int, grid: int) -> None:
    torch.manual_seed(3)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    maps = gradcam(model, _images(2, size), target=1)
    assert maps.shape == (2, grid, grid)
    assert maps.min() >= 0 and maps.max() <= 1


def test_gradcam_matches_hand_computation_and_depends_on_target() -> None:
    torch.manual_seed(4)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    x = _images(2, 96)
    feats = model.forward_features(x)  # ResNet: the output of layer4
    logits = model.forward_head(feats)
    for target in (0, 3):
        (grad,) = torch.autograd.grad(logits[:, target].sum(), feats, retain_graph=True)
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1)).detach()
        lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
        expected = (cam - lo) / (hi - lo)
        torch.testing.assert_close(gradcam(model, x, target), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(gradcam(model, x, 0), gradcam(model, x, 3), atol=1e-2)


def test_gradcam_explicit_layer_and_errors() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    assert gradcam(model, _images(1, 64), 0, target_layer="layer3").shape == (1, 4, 4)
    with pytest.raises(XrayfmError, match="no submodule"):
        gradcam(model, _images(1, 64), 0, target_layer="layer9")
    with pytest.raises(XrayfmError, match="out of range"):
        gradcam(model, _images(1, 64), 4)
    with pytest.raises(XrayfmError, match="grad_rollout"):
        gradcam(tiny_vit(), _images(1))  # ViT blocks give tokens, not a feature map
