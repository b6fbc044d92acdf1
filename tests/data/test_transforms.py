"""Transforms: deterministic eval, seeded train augmentation, no flip unless asked, shapes and norms."""

from __future__ import annotations

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from xrayfm.data.transforms import GreyToNormalized, build_transform, normalization_for
from xrayfm.errors import XrayfmError

SIZE = 48


@pytest.fixture
def grey() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (1, SIZE, SIZE), dtype=torch.uint8, generator=g)


def _left_bright() -> torch.Tensor:
    image = torch.full((1, SIZE, SIZE), 30, dtype=torch.uint8)
    image[..., : SIZE // 2] = 200
    return image


def test_eval_is_deterministic_and_normalised(grey: torch.Tensor) -> None:
    transform = build_transform(False, SIZE, channels=3)
    out = transform(grey)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(out, transform(grey))
    scaled = grey[0].float() / 255
    for c in range(3):
        expected = (scaled - IMAGENET_DEFAULT_MEAN[c]) / IMAGENET_DEFAULT_STD[c]
        torch.testing.assert_close(out[c], expected, atol=1e-5, rtol=0)


def test_eval_refuses_other_sizes_instead_of_stretching() -> None:
    transform = build_transform(False, 32, channels=1, mean=(0.5,), std=(0.25,))
    with pytest.raises(XrayfmError, match="32 x 32"):
        transform(_left_bright())
    out = transform(_left_bright()[:, :32, :32])
    assert out.shape == (1, 32, 32) and out[0, 0, 0] == pytest.approx((200 / 255 - 0.5) / 0.25, abs=1e-5)


def test_train_varies_with_seed_and_repeats_with_the_same_seed(grey: torch.Tensor) -> None:
    transform = build_transform(True, SIZE)
    torch.manual_seed(0)
    a = transform(grey)
    torch.manual_seed(0)
    b = transform(grey)
    torch.manual_seed(1)
    c = transform(grey)
    assert a.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, build_transform(False, SIZE)(grey))  # it does augment


def test_no_horizontal_flip_unless_asked() -> None:
    image = _left_bright()
    no_flip, flip = build_transform(True, SIZE), build_transform(True, SIZE, hflip=True)
    flipped = {"default": 0, "hflip": 0}
    for seed in range(30):
        torch.manual_seed(seed)
        out = no_flip(image)[0]
        flipped["default"] += int(out[:, : SIZE // 2].mean() < out[:, SIZE // 2 :].mean())
        torch.manual_seed(seed)
        out = flip(image)[0]
        flipped["hflip"] += int(out[:, : SIZE // 2].mean() < out[:, SIZE // 2 :].mean())
    assert flipped["default"] == 0
    assert 0 < flipped["hflip"] < 30  # p=0.5 each: all-or-none would mean a broken flip (odds ~2e-9)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_repeat_the_grey_image(grey: torch.Tensor, channels: int) -> None:
    out = build_transform(False, SIZE, mean=(0.5,), std=(0.5,), channels=channels)(grey)
    assert out.shape == (channels, SIZE, SIZE)
    for c in range(1, channels):
        torch.testing.assert_close(out[c], out[0])
    torch.testing.assert_close(out[0], grey[0].float() / 255 * 2 - 1, atol=1e-5, rtol=0)


def test_three_channel_stats_are_averaged_for_one_channel(grey: torch.Tensor) -> None:
    out = build_transform(False, SIZE, channels=1)(grey)
    mean, std = sum(IMAGENET_DEFAULT_MEAN) / 3, sum(IMAGENET_DEFAULT_STD) / 3
    torch.testing.assert_close(out[0], (grey[0].float() / 255 - mean) / std, atol=1e-5, rtol=0)
    with pytest.raises(XrayfmError, match="mean"):
        build_transform(False, SIZE, channels=4)  # 3 ImageNet values cannot fit 4 channels


def test_normalization_for_reads_timm_configs_without_download() -> None:
    assert normalization_for("resnet50") == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert normalization_for("vit_tiny_patch16_224") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # AugReg weights
    clip_mean, _ = normalization_for("vit_base_patch16_clip_224.openai")
    assert clip_mean != tuple(IMAGENET_DEFAULT_MEAN) and clip_mean[0] == pytest.approx(0.4815, abs=1e-4)
    assert normalization_for("no_such_model_xyz") == (
        tuple(IMAGENET_DEFAULT_MEAN),
        tuple(IMAGENET_DEFAULT_STD),
    )


def test_fused_normalisation_equals_the_torchvision_chain(grey: torch.Tensor) -> None:
    mean, std = normalization_for("vit_base_patch16_clip_224.openai")
    reference = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Grayscale(num_output_channels=3), v2.Normalize(mean, std)]
    )
    torch.testing.assert_close(GreyToNormalized(mean, std)(grey), reference(grey), atol=1e-5, rtol=0)
    batch = torch.stack([grey, grey.flip(-1)])  # [B, 1, H, W] works too
    assert GreyToNormalized(mean, std)(batch).shape == (2, 3, SIZE, SIZE)
    with pytest.raises(XrayfmError, match="grey"):
        GreyToNormalized(mean, std)(reference(grey))
