"""create_model: random init, local weight files (resize, new head, stem), errors; model_info, new_head."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from xrayfm.errors import XrayfmError
from xrayfm.models import LoraSettings, apply_lora, create_model, model_info, new_head


def _save(model: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def test_random_init_forward_and_info(tiny_vit, images):
    model = tiny_vit()
    assert model(images).shape == (4, 3)
    info = model_info(model)
    assert info["name"] == "vit_tiny_patch16_224"
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert info["params_trainable"] == info["params_total"]
    assert (info["img_size"], info["patch_size"], info["embed_dim"], info["num_classes"]) == (
        (32, 32),
        (16, 16),
        48,
        3,
    )


@pytest.mark.parametrize("name", ["convnext_atto", "resnet10t"])
def test_other_families_single_channel(name):
    model = create_model(name, num_classes=5, in_chans=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert model_info(model)["patch_size"] is None


def test_file_same_config_loads_every_tensor(tiny_spec, tiny_vit, tmp_path):
    state = _save(tiny_vit(seed=1), tmp_path / "w.safetensors")
    loaded = create_model(**tiny_spec, pretrained=tmp_path / "w.safetensors").state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state), "head or backbone not loaded"


def test_file_other_img_size_and_classes_resizes_and_new_head(tiny_spec, tiny_vit, tmp_path):
    state = _save(tiny_vit(seed=1), tmp_path / "w.safetensors")
    torch.manual_seed(99)
    model = create_model(
        **{**tiny_spec, "img_size": 64, "num_classes": 5}, pretrained=str(tmp_path / "w.safetensors")
    )
    sd = model.state_dict()
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    assert torch.equal(sd["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    # 2x2 grid -> 4x4 grid, interpolated from the file (not random); the class token's entry is kept.
    assert sd["pos_embed"].shape == (1, 1 + 16, 48)
    assert torch.equal(sd["pos_embed"][:, :1], state["pos_embed"][:, :1])
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(sd["pos_embed"], expected)
    # new head: fresh init for 5 classes
    assert sd["head.weight"].shape == (5, 48)
    torch.manual_seed(99)
    fresh = create_model(**{**tiny_spec, "img_size": 64, "num_classes": 5})
    assert torch.equal(sd["head.weight"], fresh.state_dict()["head.weight"])
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], fresh.state_dict()["blocks.0.attn.qkv.weight"])


def test_rgb_file_into_single_channel_model(tiny_spec, tiny_vit, tmp_path):
    state = _save(tiny_vit(seed=2), tmp_path / "w.safetensors")
    model = create_model(**{**tiny_spec, "in_chans": 1}, pretrained=tmp_path / "w.safetensors")
    stem = model.patch_embed.proj.weight
    assert stem.shape == (48, 1, 16, 16)
    torch.testing.assert_close(stem[:, 0], state["patch_embed.proj.weight"].sum(dim=1))


def test_pth_is_loaded_weights_only(tiny_spec, tiny_vit, tmp_path):
    model = tiny_vit(seed=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    loaded = create_model(**tiny_spec, pretrained=tmp_path / "w.pth")
    assert torch.equal(loaded.head.weight, model.head.weight)
    # a pickle with arbitrary objects is refused, not executed
    torch.save({"state_dict": model.state_dict(), "evil": _Pickled()}, tmp_path / "evil.pth")
    with pytest.raises(XrayfmError, match="weights-only"):
        create_model(**tiny_spec, pretrained=tmp_path / "evil.pth")


class _Pickled:
    """An arbitrary class instance: only loadable by a full (unsafe) unpickler."""


def test_file_errors(tiny_spec, tiny_vit, tmp_path):
    with pytest.raises(XrayfmError, match="not found"):
        create_model(**tiny_spec, pretrained=tmp_path / "missing.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(XrayfmError, match="unsupported"):
        create_model(**tiny_spec, pretrained=tmp_path / "w.ckpt")
    _save(tiny_vit(), tmp_path / "w.safetensors")
    with pytest.raises(XrayfmError, match="backbone tensors missing"):  # deeper model: blocks.2 absent
        create_model(**{**tiny_spec, "depth": 3, "num_classes": 7}, pretrained=tmp_path / "w.safetensors")
    with pytest.raises(XrayfmError, match="size mismatch"):  # wider model
        create_model(**{**tiny_spec, "embed_dim": 64}, pretrained=tmp_path / "w.safetensors")
    with pytest.raises(XrayfmError, match="unknown timm model"):
        create_model("vit_nonexistent_patch16_224")
    with pytest.raises(XrayfmError, match="does not accept"):
        create_model("resnet10t", no_such_argument=1)


def test_pretrained_true_offline_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if the env var was set after import
    start = time.monotonic()
    with pytest.raises(XrayfmError, match="offline"):
        create_model("vit_tiny_patch16_224", num_classes=2, pretrained=True)
    assert time.monotonic() - start < 20
    assert constants.HF_HUB_OFFLINE is False, "the hub's offline flag must be restored"


def test_new_head(tiny_vit, images):
    model = tiny_vit()
    backbone = model.blocks[0].attn.qkv.weight.clone()
    assert new_head(model, 7)(images).shape == (4, 7)
    assert new_head(model, 0)(images).shape == (4, 48)  # features only
    assert torch.equal(model.blocks[0].attn.qkv.weight, backbone)
    with pytest.raises(XrayfmError, match="before apply_lora"):
        new_head(apply_lora(model, LoraSettings(rank=2)), 3)
