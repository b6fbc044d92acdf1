"""LoRA with PEFT on a tiny timm ViT: exact counts, zero-init, training, frozen base, save/load, merge."""

from __future__ import annotations

import pytest
import torch

from xrayfm.errors import XrayfmError
from xrayfm.models import LoraSettings, apply_lora, load_adapter, merge, save_adapter, trainable_summary
from xrayfm.models.lora import ADAPTER_WEIGHTS

E, CLASSES, DEPTH, RANK = 48, 3, 2, 4  # tiny ViT: width, classes, blocks (see conftest)


def _train(model, images, steps: int = 3) -> None:
    """A few AdamW steps on random multi-label targets (dropout off: eval mode)."""
    model.eval()
    targets = (torch.arange(images.shape[0] * CLASSES).reshape(-1, CLASSES) % 2).float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("targets", "train_head"),
    [(("qkv",), True), (("qkv", "proj", "fc1", "fc2"), True), (("qkv",), False)],
)
def test_trainable_counts_are_exact(tiny_vit, targets, train_head):
    model = tiny_vit()
    base_total = sum(p.numel() for p in model.parameters())
    # LoRA adds A (r x in) and B (out x r) per wrapped Linear; in/out from timm's ViT shapes.
    shapes = {"qkv": (E, 3 * E), "proj": (E, E), "fc1": (E, 4 * E), "fc2": (4 * E, E)}
    lora = DEPTH * sum(RANK * (shapes[t][0] + shapes[t][1]) for t in targets)
    head = E * CLASSES + CLASSES
    summary = trainable_summary(
        apply_lora(model, LoraSettings(rank=RANK, targets=targets, train_head=train_head))
    )
    expected_trainable = lora + (head if train_head else 0)
    # PEFT keeps a frozen copy of the original head next to the trainable one
    expected_total = base_total + lora + (head if train_head else 0)
    assert summary == {
        "trainable": expected_trainable,
        "total": expected_total,
        "fraction": expected_trainable / expected_total,
    }


def test_only_timm_linear_targets_are_wrapped(tiny_vit):
    model = apply_lora(tiny_vit(), LoraSettings(rank=RANK, targets=("proj",)))
    wrapped = sorted({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    # attn.proj only: not patch_embed.proj (a Conv2d), not qkv
    assert wrapped == [f"base_model.model.blocks.{i}.attn.proj" for i in range(DEPTH)]


def test_fresh_adapter_keeps_outputs_then_training_changes_them(tiny_vit, images):
    model = tiny_vit().eval()
    before = model(images).detach()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LoraSettings(rank=RANK, targets=("qkv", "fc1")))
    peft_model.eval()
    torch.testing.assert_close(peft_model(images), before, rtol=0, atol=0)
    _train(peft_model, images)
    assert not torch.allclose(peft_model(images), before, atol=1e-3)
    # base weights frozen and untouched (the original head too: training updates PEFT's copy)
    base_now = peft_model.get_base_model()
    for name, param in base_now.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            assert param.requires_grad
            continue
        assert not param.requires_grad, name
        original = name.replace(".original_module", "").replace(".base_layer", "")
        assert torch.equal(param, base_state[original]), name
    assert not torch.equal(base_now.head.modules_to_save["default"].weight, base_state["head.weight"])


def test_head_frozen_without_train_head(tiny_vit):
    peft_model = apply_lora(tiny_vit(), LoraSettings(rank=RANK, train_head=False))
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "head" in n)


def test_save_load_round_trip_and_merge(tiny_vit, images, tmp_path):
    base = tiny_vit(seed=5)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = apply_lora(base, LoraSettings(rank=RANK, targets=("qkv", "proj", "fc1", "fc2")))
    _train(peft_model, images)
    peft_model.eval()
    expected = peft_model(images).detach()

    folder = save_adapter(peft_model, tmp_path / "adapter")
    adapter_bytes = (folder / ADAPTER_WEIGHTS).stat().st_size
    model_bytes = sum(v.numel() * v.element_size() for v in base_state.values())
    assert adapter_bytes < 0.25 * model_bytes, (adapter_bytes, model_bytes)

    fresh_base = tiny_vit(seed=6)  # other random init, then the foundation weights
    fresh_base.load_state_dict(base_state)
    loaded = load_adapter(fresh_base, folder).eval()
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)

    merged = merge(loaded)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "VisionTransformer"
    torch.testing.assert_close(merged(images), expected, rtol=1e-5, atol=1e-5)


def test_errors(tiny_vit, tmp_path):
    with pytest.raises(XrayfmError, match="unknown LoRA targets"):
        LoraSettings(targets=("query",))
    with pytest.raises(XrayfmError, match="invalid LoRA"):
        LoraSettings(rank=0)
    with pytest.raises(XrayfmError, match="no module"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraSettings())
    with pytest.raises(XrayfmError, match="not an adapter folder"):
        load_adapter(tiny_vit(), tmp_path / "nowhere")
    folder = save_adapter(apply_lora(tiny_vit(), LoraSettings(rank=RANK)), tmp_path / "adapter")
    with pytest.raises(XrayfmError, match="does not fit"):
        load_adapter(tiny_vit(embed_dim=64), folder)
    with pytest.raises(XrayfmError, match="does not fit"):
        load_adapter(tiny_vit(depth=1), folder)  # fewer blocks: adapter weights for blocks.1 unused
