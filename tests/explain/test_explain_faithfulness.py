"""Faithfulness metrics on toy problems whose answer is known."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import tiny_vit
from xrayfm.errors import XrayfmError
from xrayfm.explain import deletion_insertion, pointing_game, randomization_check, reinitialize, topk_iou


class RegionModel(nn.Module):
    """Logit 0 rises with the mean intensity of the top-left 16x16 region; logit 1 is its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 10.0 * (x[:, :, :16, :16].mean(dim=(1, 2, 3)) - 0.6)
        return torch.stack([score, -score], dim=1)


def _region_images(b: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 32, 32, generator=gen) * 0.6
    x[:, :, :16, :16] = 0.8 + 0.2 * torch.rand(b, 3, 16, 16, generator=gen)
    return x


def _region_map(b: int, inside: float, outside: float) -> np.ndarray:
    m = np.full((b, 4, 4), outside, dtype=np.float32)
    m[:, :2, :2] = inside
    return m + np.random.default_rng(0).random((b, 4, 4)).astype(np.float32) * 0.01


@pytest.mark.parametrize(("baseline", "sigma"), [("mean", None), ("blur", 8.0)])
def test_map_on_the_region_beats_random_and_the_opposite_map_loses(
    baseline: str, sigma: float | None
) -> None:
    model, x = RegionModel(), _region_images()
    good = deletion_insertion(
        model,
        x,
        _region_map(3, 1.0, 0.0),
        target=0,
        steps=8,
        baseline=baseline,
        blur_sigma=sigma,
        progress=False,
    )
    assert good["deletion_gain"] > 0 and good["insertion_gain"] > 0
    assert (good["deletion_auc"] < good["random_deletion_auc"]).all()
    bad = deletion_insertion(
        model,
        x,
        _region_map(3, 0.0, 1.0),
        target=0,
        steps=8,
        baseline=baseline,
        blur_sigma=sigma,
        progress=False,
    )
    assert bad["deletion_gain"] < 0 and bad["insertion_gain"] < 0
    assert good["deletion_auc_mean"] < bad["deletion_auc_mean"]


def test_curve_endpoints_are_the_original_and_the_baseline() -> None:
    model, x = RegionModel(), _region_images(2)
    res = deletion_insertion(model, x, _region_map(2, 1.0, 0.0), steps=4, baseline="mean", progress=False)
    assert res["deletion_curves"].shape == (2, 5) and res["fractions"].tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    np.testing.assert_array_equal(res["targets"], [0, 0])  # the top class by default
    original = torch.sigmoid(model(x))[:, 0].numpy()
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    baseline = torch.sigmoid(model(flat))[:, 0].numpy()
    np.testing.assert_allclose(res["deletion_curves"][:, 0], original, atol=1e-6)
    np.testing.assert_allclose(res["insertion_curves"][:, -1], original, atol=1e-6)
    np.testing.assert_allclose(res["deletion_curves"][:, -1], baseline, atol=1e-6)
    np.testing.assert_allclose(res["insertion_curves"][:, 0], baseline, atol=1e-6)
    np.testing.assert_allclose(res["deletion_auc"], np.trapezoid(res["deletion_curves"], res["fractions"]))
    assert "random_deletion_auc" not in deletion_insertion(
        model, x, _region_map(2, 1, 0), steps=2, random_baseline=False, progress=False
    )


def test_deletion_insertion_rejects_bad_input() -> None:
    with pytest.raises(XrayfmError, match="2 images"):
        deletion_insertion(RegionModel(), _region_images(2), np.zeros((3, 4, 4)), progress=False)
    with pytest.raises(XrayfmError, match="baseline"):
        deletion_insertion(
            RegionModel(), _region_images(1), np.zeros((1, 4, 4)), baseline="zero", progress=False
        )


def _square_masks() -> np.ndarray:
    masks = np.zeros((3, 32, 32), dtype=bool)
    masks[0, 4:12, 4:12] = True
    masks[1, 20:28, 20:28] = True  # image 2 has an empty mask
    return masks


def test_pointing_game_hits_misses_tolerance_and_empty_masks() -> None:
    maps = np.zeros((3, 8, 8), dtype=np.float32)
    maps[0, 2, 2] = 1.0  # cell 2 covers pixels 8..11: inside the mask of image 0
    maps[1, 1, 1] = 1.0  # far from the mask of image 1
    maps[2, 5, 5] = 1.0
    res = pointing_game(maps, _square_masks())
    assert res["hits"][0] == 1 and res["hits"][1] == 0 and np.isnan(res["hits"][2])
    assert res["hit_rate"] == 0.5 and res["n_evaluated"] == 2 and res["n_skipped_empty"] == 1
    near = np.zeros((3, 32, 32), dtype=np.float32)
    near[:, 14, 14] = 1.0  # 3 px outside the mask of image 0 (rows/cols 4..11)
    assert pointing_game(near, _square_masks())["hits"][0] == 0
    assert pointing_game(near, _square_masks(), tolerance=3)["hits"][0] == 1


def test_topk_iou_on_synthetic_masks() -> None:
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[:, :8, :8] = True  # a quarter of the image
    exact = masks.astype(np.float32) + 0.001 * np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    rows = np.broadcast_to(np.linspace(1, 0, 16, dtype=np.float32)[:, None], (16, 16))
    half = np.stack([rows, rows, rows])  # top 50% = the top half, which contains the mask
    res = topk_iou(np.stack([exact[0], 1 - exact[1], half[2]]), masks, top_percent=25.0)
    np.testing.assert_allclose(res["iou"][:2], [1.0, 0.0])
    assert topk_iou(half, masks, top_percent=50.0)["iou"] == pytest.approx([0.5] * 3)
    with pytest.raises(XrayfmError, match="top_percent"):
        topk_iou(half, masks, top_percent=0)


def test_reinitialize_redraws_every_weight_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    before = copy.deepcopy(vit.state_dict())
    fresh = reinitialize(vit, seed=1)
    for name, value in vit.state_dict().items():
        torch.testing.assert_close(value, before[name])
    changed = {n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])}
    # LayerNorm weights/biases reset to 1/0 may equal timm's init; every other tensor must be new.
    unchanged = {n for n, _ in fresh.named_parameters()} - changed
    assert all("norm" in n for n in unchanged), unchanged
    assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "head.weight"} <= changed
    again = reinitialize(vit, seed=1)
    for (_, a), (_, b) in zip(fresh.named_parameters(), again.named_parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_randomization_check_low_for_reinitialized_high_for_identical() -> None:
    torch.manual_seed(0)
    vit = tiny_vit(img_size=64, patch_size=8)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    same = randomization_check(vit, x, randomized_model=copy.deepcopy(vit), progress=False)
    np.testing.assert_allclose(same["spearman"], 1.0, atol=1e-6)
    for method in ("rollout", "grad_rollout"):
        res = randomization_check(vit, x, method=method, seed=3, progress=False)
        assert res["spearman"].shape == (4,)
        assert res["mean_abs_spearman"] < 0.5, res
