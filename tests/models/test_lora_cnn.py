"""LoRA with PEFT on CNN backbones (ResNet, ConvNeXt, DenseNet): which layers are wrapped, exact
counts from the layers' shapes, zero-init, training, merge, save/load, the per-family defaults."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from xrayfm.errors import XrayfmError
from xrayfm.models import (
    LoraSettings,
    apply_lora,
    create_model,
    load_adapter,
    merge,
    save_adapter,
    trainable_summary,
)
from xrayfm.models.lora import default_lora_targets, resolve_lora_targets, targets_regex

RANK, CLASSES = 2, 3
# Small members of each family: built in well under a second, 32 px inputs.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # zero_init_last=False: timm zeroes each block's last BN by default, which would hide LoRA's effect
    "resnet": ("resnet18", {"zero_init_last": False}),
    "resnet-bottleneck": ("resnet26", {"zero_init_last": False}),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1)}),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1), "bn_size": 2}),
}
# family -> (default targets, regex every wrapped module name must fullmatch)
EXPECTED = {
    "resnet": (("conv1", "conv2"), r"layer[1-4]\.\d+\.conv[12]"),
    "resnet-bottleneck": (("conv1", "conv2", "conv3"), r"layer[1-4]\.\d+\.conv[123]"),
    "convnext": (("fc1", "fc2"), r"stages\.\d\.blocks\.\d+\.mlp\.fc[12]"),
    "densenet": (("conv1", "conv2"), r"features\.denseblock\d\.denselayer\d+\.conv[12]"),
}


def _model(family: str, seed: int = 0) -> nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return create_model(name, num_classes=CLASSES, **kwargs).eval()


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _wrapped(model: nn.Module) -> list[str]:
    names = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    return sorted(n.removeprefix("base_model.model.") for n in names)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_defaults_wrap_the_block_layers_only(family):
    model = _model(family)
    targets, pattern = EXPECTED[family]
    assert default_lora_targets(model) == targets
    assert resolve_lora_targets(model, ["qkv"]) == targets  # the ViT default becomes the family's
    expected = sorted(
        name
        for name, m in model.named_modules()
        if re.fullmatch(pattern, name) and isinstance(m, nn.Linear | nn.Conv2d)
    )
    peft_model = apply_lora(model, LoraSettings(rank=RANK, targets=targets))
    assert _wrapped(peft_model) == expected and expected
    # stems, transitions, shortcuts and the head keep no adapter
    assert not [n for n in _wrapped(peft_model) if n in ("conv1", "features.conv0", "stem.0", "fc")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainable_count_is_exact_from_layer_shapes(family):
    """LoRA on Linear(in, out): r*(in + out); on Conv2d(in, out, k x k): A = conv(in -> r, k x k) and
    B = conv(r -> out, 1x1), r*(in*k*k + out). The head (timm's classifier) trains fully."""
    model = _model(family)
    targets, pattern = EXPECTED[family]
    lora = 0
    for name, m in model.named_modules():
        if not re.fullmatch(pattern, name):
            continue
        if isinstance(m, nn.Linear):
            lora += RANK * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            lora += RANK * (m.in_channels * kh * kw + m.out_channels)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    base_total = sum(p.numel() for p in model.parameters())
    summary = trainable_summary(apply_lora(model, LoraSettings(rank=RANK, targets=targets)))
    assert summary["trainable"] == lora + head
    assert summary["total"] == base_total + lora + head  # PEFT keeps a frozen copy of the head


@pytest.mark.parametrize("family", ["resnet", "convnext", "densenet"])
def test_zero_init_training_merge_and_round_trip(family, tmp_path):
    images = _images()
    model = _model(family)
    before = model(images).detach()
    peft_model = apply_lora(model, LoraSettings(rank=RANK, targets=default_lora_targets(model)))
    peft_model.eval()
    torch.testing.assert_close(peft_model(images), before, rtol=0, atol=0)  # B = 0 at start
    # train the adapters alone (head frozen out of the optimiser) so the change is LoRA's own
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora_params, lr=5e-2)
    targets = (torch.arange(4 * CLASSES).reshape(4, CLASSES) % 2).float()
    for _ in range(3):
        loss = nn.functional.binary_cross_entropy_with_logits(peft_model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = peft_model(images).detach()
    assert not torch.allclose(after, before, atol=1e-4)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n and
               "modules_to_save" not in n)  # fmt: skip
    folder = save_adapter(peft_model, tmp_path / "adapter")
    loaded = load_adapter(_model(family), folder).eval()
    torch.testing.assert_close(loaded(images), after, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge(loaded)(images), after, rtol=1e-4, atol=1e-4)


def test_vit_regex_unchanged_and_explicit_targets_checked():
    # saved ViT adapters (the shipped model's among them) hold this exact string in adapter_config.json
    assert targets_regex(("qkv",)) == r"(?:.*\.)?(?:attn\.qkv)"
    assert targets_regex(("qkv", "fc1")) == r"(?:.*\.)?(?:attn\.qkv|mlp\.fc1)"
    with pytest.raises(XrayfmError, match=r"conv3.*candidates for ResNet: conv1, conv2, conv3"):
        apply_lora(_model("resnet"), LoraSettings(targets=("conv1", "conv3")))  # BasicBlocks: no conv3
    with pytest.raises(XrayfmError, match="no module of this ConvNeXt model matches"):
        apply_lora(_model("convnext"), LoraSettings(targets=("conv1",)))
    with pytest.raises(XrayfmError, match="unknown LoRA targets"):
        LoraSettings(targets=("conv_dw",))
    assert resolve_lora_targets(_model("resnet"), ["conv2"]) == ("conv2",)  # explicit: kept


def test_grouped_convolutions_are_refused():
    """PEFT's LoRA on grouped convs needs rank % groups == 0 and cannot merge: refused up front."""
    with torch.device("meta"):  # no memory, no init: the check runs before PEFT touches weights
        model = create_model("resnext50_32x4d", num_classes=2)
    with pytest.raises(XrayfmError, match=r"non-grouped\) Conv2d.*layer1\.0\.conv2"):
        apply_lora(model, LoraSettings(targets=("conv2",)))


def test_no_default_for_an_unknown_family():
    with pytest.raises(XrayfmError, match="no default LoRA targets for Sequential"):
        default_lora_targets(nn.Sequential(nn.Conv2d(3, 4, 3)))
