"""Attention rollout against an independent reference, capture of fused attention, prefix tokens, LoRA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from timm.layers import Attention

from tests.explain.vit_reference import manual_forward, reference_rollout
from tests.helpers import TINY_VIT, tiny_vit
from xrayfm.errors import XrayfmError
from xrayfm.explain import attention_rollout, capture_attention, predict_with_rollout, rollout_matrix


def _images(b: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("fusion", "discard"), [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
def test_rollout_matches_reference(fusion: str, discard: float) -> None:
    torch.manual_seed(0)
    vit, x = tiny_vit(), _images()
    with torch.no_grad():
        _, attns = manual_forward(vit, x)
    expected = reference_rollout(attns, prefix=1, use_cls=True, grid=(4, 4), fusion=fusion, discard=discard)
    got = attention_rollout(vit, x, head_fusion=fusion, discard_ratio=discard)
    assert got.shape == (3, 4, 4)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_rollout_invariants_rows_sum_to_one() -> None:
    torch.manual_seed(1)
    vit, x = tiny_vit(depth=3), _images(2)
    with capture_attention(vit) as rec, torch.no_grad():
        vit(x)
    heads = TINY_VIT["num_heads"]
    assert len(rec.attentions) == 3 and rec.attentions[0].shape == (2, heads, 17, 17)
    for discard in (0.0, 0.5):
        r = rollout_matrix(rec.attentions, discard_ratio=discard)
        assert r.shape == (2, 17, 17)
        torch.testing.assert_close(r.sum(-1), torch.ones(2, 17))
        assert (r >= 0).all()
    maps = attention_rollout(vit, x)
    assert maps.shape == (2, 4, 4) and maps.min() == 0 and maps.max() == 1


def test_single_forward_returns_the_models_logits() -> None:
    torch.manual_seed(2)
    vit, x = tiny_vit(), _images(2)
    with torch.no_grad():
        expected = vit(x)
    logits, maps = predict_with_rollout(vit, x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert maps.shape == (2, 4, 4)


@pytest.mark.parametrize("fused", [True, False])
def test_capture_works_whatever_fused_setting_and_restores_it(fused: bool) -> None:
    torch.manual_seed(3)
    vit, x = tiny_vit(), _images(2)
    with torch.no_grad():
        _, attns = manual_forward(vit, x)
    modules = [m for m in vit.modules() if isinstance(m, Attention)]
    for m in modules:
        m.fused_attn = fused
    got = attention_rollout(vit, x)
    np.testing.assert_allclose(got.numpy(), reference_rollout(attns, 1, True, (4, 4)), atol=1e-4)
    assert all(m.fused_attn is fused for m in modules)
    assert all(not m.attn_drop._forward_hooks for m in modules)


def test_capture_restores_setting_after_exception() -> None:
    vit = tiny_vit()
    modules = [m for m in vit.modules() if isinstance(m, Attention)]
    for m in modules:
        m.fused_attn = True
    with pytest.raises(RuntimeError, match="boom"), capture_attention(vit):
        assert all(m.fused_attn is False for m in modules)
        raise RuntimeError("boom")
    assert all(m.fused_attn is True for m in modules)
    assert all(not m.attn_drop._forward_hooks for m in modules)


def test_training_mode_restored_and_dropout_off_while_explaining() -> None:
    torch.manual_seed(4)
    vit, x = tiny_vit(attn_drop_rate=0.5, drop_rate=0.5), _images(2)
    vit.train()
    first, second = attention_rollout(vit, x), attention_rollout(vit, x)
    torch.testing.assert_close(first, second)
    assert vit.training and all(m.training for m in vit.modules())


@pytest.mark.parametrize(
    ("kwargs", "prefix", "use_cls"),
    [
        ({"reg_tokens": 4}, 5, True),
        ({"class_token": False, "global_pool": "avg"}, 0, False),
        ({"class_token": False, "global_pool": "avg", "reg_tokens": 4}, 4, False),
    ],
)
def test_register_tokens_and_avg_pooling(kwargs: dict, prefix: int, use_cls: bool) -> None:
    torch.manual_seed(5)
    vit, x = tiny_vit(**kwargs), _images(2)
    assert vit.num_prefix_tokens == prefix
    with torch.no_grad():
        _, attns = manual_forward(vit, x)
    got = attention_rollout(vit, x)
    np.testing.assert_allclose(got.numpy(), reference_rollout(attns, prefix, use_cls, (4, 4)), atol=1e-4)


def test_non_square_images_and_patch_size() -> None:
    torch.manual_seed(6)
    vit = tiny_vit(img_size=(32, 48), patch_size=16)
    x = _images(1, 32, 48)
    with torch.no_grad():
        _, attns = manual_forward(vit, x)
    got = attention_rollout(vit, x)
    assert got.shape == (1, 2, 3)
    np.testing.assert_allclose(got.numpy(), reference_rollout(attns, 1, True, (2, 3)), atol=1e-4)


def test_lora_wrapped_and_merged_models() -> None:
    torch.manual_seed(7)
    vit, x = tiny_vit(), _images(2)
    plain = attention_rollout(vit, x)
    # A fresh adapter has B = 0: the wrapped and the merged model must explain exactly like the plain one.
    wrapped = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, target_modules=["qkv"]))
    torch.testing.assert_close(attention_rollout(wrapped, x), plain, atol=1e-5, rtol=0)
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(attention_rollout(merged, x), plain, atol=1e-5, rtol=0)
    # A non-zero adapter changes the attention: the capture must see the LoRA path, merged or not.
    trained = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, target_modules=["qkv"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora_map = attention_rollout(trained, x)
    assert not torch.allclose(lora_map, plain, atol=1e-3)
    torch.testing.assert_close(attention_rollout(trained.merge_and_unload(), x), lora_map, atol=1e-4, rtol=0)


def test_errors_for_unsupported_input() -> None:
    import timm

    cnn = timm.create_model("resnet18", pretrained=False, num_classes=2)
    with pytest.raises(XrayfmError, match="VisionTransformer"):
        attention_rollout(cnn, _images(1))
    with pytest.raises(XrayfmError, match="head_fusion"):
        attention_rollout(tiny_vit(), _images(1), head_fusion="median")
    with pytest.raises(XrayfmError, match="discard_ratio"):
        attention_rollout(tiny_vit(), _images(1), discard_ratio=1.0)
    with pytest.raises(XrayfmError, match=r"\[B, C, H, W\]"):
        attention_rollout(tiny_vit(), torch.zeros(3, 32, 32))


def test_eval_mode_leaves_an_eval_model_alone_and_restores_a_mixed_one() -> None:
    """A model all in eval mode is not touched (no module's train() is called); one with any module in
    training mode is switched whole and each module gets its own flag back."""
    from xrayfm.explain.rollout import eval_mode

    vit = tiny_vit().eval()
    calls: list[bool] = []
    vit.blocks[0].train = lambda mode=True: calls.append(mode)  # type: ignore[method-assign]
    with eval_mode(vit):
        assert not any(m.training for m in vit.modules())
    assert calls == []
    del vit.blocks[0].train
    vit.blocks[1].train()  # one block in training mode, the rest not
    with eval_mode(vit):
        assert not any(m.training for m in vit.modules())
    assert vit.blocks[1].training and all(m.training for m in vit.blocks[1].modules())
    assert not vit.training and not vit.blocks[0].training
