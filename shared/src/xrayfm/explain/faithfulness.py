"""How much to trust a saliency map: deletion/insertion curves, pointing game, top-k IoU, randomisation check.

Pure functions over (model, images, maps, masks) returning dicts of numpy arrays and floats.

- Deletion / insertion (Petsiuk et al. 2018, RISE): remove (or reveal) the most salient map cells first
  and follow the model's probability for the target class; a faithful map gives a low deletion AUC and a
  high insertion AUC, compared with a random map.
- Pointing game (Zhang et al. 2016): is the map's maximum inside the ground-truth mask?
- IoU of the top-k% most salient pixels with the mask.
- Model-randomisation sanity check (Adebayo et al. 2018): maps of a trained model should differ from
  those of the same architecture with re-initialised weights (low Spearman rank correlation).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from xrayfm.errors import XrayfmError
from xrayfm.explain.api import explain
from xrayfm.explain.gradients import Target, resolve_targets
from xrayfm.explain.methods import CLASS_SPECIFIC_METHODS, canonical_method
from xrayfm.explain.rollout import check_images, eval_mode

OUTPUT_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,  # multi-label heads (CheXpert findings)
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "none": lambda x: x,
}


def _as_maps(maps: np.ndarray | torch.Tensor, batch: int | None = None) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if m.dim() != 3:
        raise XrayfmError(f"maps must be [B, h, w], got shape {tuple(m.shape)}")
    if batch is not None and m.shape[0] != batch:
        raise XrayfmError(f"got {m.shape[0]} maps for {batch} images")
    if not torch.isfinite(m).all():
        raise XrayfmError("maps contain NaN or infinite values")
    return m


def _as_masks(masks: np.ndarray | torch.Tensor, batch: int) -> torch.Tensor:
    k = torch.as_tensor(np.asarray(masks)).bool()
    if k.dim() != 3 or k.shape[0] != batch:
        raise XrayfmError(f"masks must be [B, H, W] with B={batch}, got shape {tuple(k.shape)}")
    return k


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _baseline_image(image: torch.Tensor, baseline: str, blur_sigma: float | None) -> torch.Tensor:
    """What removed cells are replaced with: a strongly blurred copy, or the per-channel mean."""
    if baseline == "mean":
        return image.mean(dim=(-2, -1), keepdim=True).expand_as(image)
    if baseline == "blur":
        h, w = image.shape[-2:]
        sigma = blur_sigma if blur_sigma is not None else max(h, w) / 32.0
        size = 2 * math.ceil(3 * sigma) + 1
        size = min(size, 2 * ((min(h, w) - 1) // 2) + 1)  # reflect padding must stay inside the image
        return gaussian_blur(image[None], [size, size], [sigma, sigma])[0]
    raise XrayfmError(f"unknown baseline {baseline!r}; choose 'blur' or 'mean'")


def _curves_for_image(
    model: nn.Module,
    image: torch.Tensor,
    cell_map: torch.Tensor,
    target: int,
    fractions: np.ndarray,
    base: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves of one image for one map; all steps in one batched forward."""
    gh, gw = cell_map.shape
    order = torch.argsort(cell_map.flatten(), descending=True, stable=True)
    counts = np.rint(fractions * order.numel()).astype(int)
    cell_masks = torch.zeros(len(counts), gh * gw)
    for i, c in enumerate(counts):
        cell_masks[i, order[:c]] = 1.0
    pixel_masks = F.interpolate(cell_masks.reshape(-1, 1, gh, gw), size=image.shape[-2:], mode="nearest")
    pixel_masks = pixel_masks.to(image.device, image.dtype)
    deleted = image * (1 - pixel_masks) + base * pixel_masks
    inserted = base * (1 - pixel_masks) + image * pixel_masks
    with torch.no_grad():
        out = transform(model(torch.cat([deleted, inserted])))[:, target].float().cpu().numpy()
    return out[: len(counts)], out[len(counts) :]


def deletion_insertion(
    model: nn.Module,
    images: torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    target: Target = None,
    *,
    steps: int = 20,
    baseline: str = "blur",
    output: str = "sigmoid",
    random_baseline: bool = True,
    seed: int = 0,
    blur_sigma: float | None = None,
    progress: bool = True,
) -> dict:
    """Deletion and insertion curves and AUCs of `maps` [B, h, w], and of random maps as a baseline.

    Map cells (patches) are removed / revealed from most to least salient in `steps` steps, replaced by
    (or revealed over) a blurred or mean image; the curve is the model's `output` ('sigmoid', 'softmax'
    or 'none') for `target` (default: each image's top class). AUC uses the trapezoid rule over the
    fraction removed in [0, 1]. Lower deletion AUC and higher insertion AUC are better.
    """
    check_images(images)
    maps_t = _as_maps(maps, images.shape[0])
    if steps < 1:
        raise XrayfmError(f"steps must be >= 1, got {steps}")
    if output not in OUTPUT_TRANSFORMS:
        raise XrayfmError(f"unknown output {output!r}; choose one of {', '.join(OUTPUT_TRANSFORMS)}")
    transform = OUTPUT_TRANSFORMS[output]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    gen = torch.Generator().manual_seed(seed)
    random_maps = torch.rand(maps_t.shape, generator=gen)
    kinds = {"map": maps_t, "random": random_maps} if random_baseline else {"map": maps_t}
    curves = {k: {"deletion": [], "insertion": []} for k in kinds}
    with eval_mode(model), torch.no_grad():
        targets = resolve_targets(model(images), target).tolist()
        for i in tqdm(range(images.shape[0]), desc="deletion/insertion", disable=not progress):
            base = _baseline_image(images[i], baseline, blur_sigma)
            for kind, kind_maps in kinds.items():
                dele, ins = _curves_for_image(
                    model, images[i : i + 1], kind_maps[i], targets[i], fractions, base, transform
                )
                curves[kind]["deletion"].append(dele)
                curves[kind]["insertion"].append(ins)
    result: dict = {"fractions": fractions, "targets": np.asarray(targets)}
    for kind, by_curve in curves.items():
        prefix = "" if kind == "map" else "random_"
        for name, rows in by_curve.items():
            arr = np.stack(rows)
            auc = np.trapezoid(arr, fractions, axis=1)
            result[f"{prefix}{name}_curves"] = arr
            result[f"{prefix}{name}_auc"] = auc
            result[f"{prefix}{name}_auc_mean"] = float(auc.mean())
    if random_baseline:
        # Positive gains mean the map beats a random ordering of the same cells.
        result["deletion_gain"] = result["random_deletion_auc_mean"] - result["deletion_auc_mean"]
        result["insertion_gain"] = result["insertion_auc_mean"] - result["random_insertion_auc_mean"]
    return result


def pointing_game(
    maps: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor, tolerance: int = 0
) -> dict:
    """Pointing game: is the maximum of each map (upsampled to the mask size) inside its mask?

    `tolerance` (pixels) dilates the masks, as in the original protocol (15 px at 224). Images with
    empty masks are skipped (hit = NaN) and not counted in the hit rate.
    """
    maps_t = _as_maps(maps)
    masks_t = _as_masks(masks, maps_t.shape[0])
    if tolerance > 0:
        k = 2 * tolerance + 1
        masks_t = F.max_pool2d(masks_t[:, None].float(), k, stride=1, padding=tolerance)[:, 0].bool()
    up = _upsample(maps_t, tuple(masks_t.shape[-2:])).flatten(1)
    peak = up.argmax(dim=1)
    inside = masks_t.flatten(1).gather(1, peak[:, None])[:, 0]
    present = masks_t.flatten(1).any(dim=1)
    hits = np.where(present.numpy(), inside.numpy().astype(float), np.nan)
    n = int(present.sum())
    return {
        "hits": hits,
        "hit_rate": float(np.nanmean(hits)) if n else float("nan"),
        "n_evaluated": n,
        "n_skipped_empty": int(len(hits) - n),
    }


def topk_iou(
    maps: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor, top_percent: float = 20.0
) -> dict:
    """IoU between the top `top_percent`% most salient pixels (map upsampled to mask size) and the mask."""
    if not 0.0 < top_percent <= 100.0:
        raise XrayfmError(f"top_percent must be in (0, 100], got {top_percent}")
    maps_t = _as_maps(maps)
    masks_t = _as_masks(masks, maps_t.shape[0])
    up = _upsample(maps_t, tuple(masks_t.shape[-2:])).flatten(1)
    masks_t = masks_t.flatten(1)
    k = max(1, round(top_percent / 100.0 * up.shape[1]))
    region = torch.zeros_like(masks_t).scatter_(1, up.topk(k, dim=1).indices, True)
    inter = (region & masks_t).sum(dim=1).float()
    union = (region | masks_t).sum(dim=1).float()
    iou = (inter / union).numpy()
    return {"iou": iou, "mean_iou": float(iou.mean()), "top_percent": top_percent}


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of `model` with every weight re-drawn (the model itself is left untouched).

    Modules with ``reset_parameters`` re-draw their own weights; parameters held directly by modules
    without one (class/register tokens, position embeddings) get N(0, 0.02²), timm's usual init.
    """
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for param in module.parameters(recurse=False):
                    nn.init.trunc_normal_(param, std=0.02)
    return clone


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = stats.spearmanr(a.ravel(), b.ravel()).statistic
    return float(rho)


def randomization_check(
    model: nn.Module,
    images: torch.Tensor,
    *,
    method: str = "rollout",
    target: Target = None,
    seed: int = 0,
    randomized_model: nn.Module | None = None,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Model-randomisation sanity check: Spearman rank correlation between the maps of `model` and of a
    re-initialised copy (or `randomized_model`). Low correlation is what a faithful method should give.

    Extra keyword arguments go to :func:`xrayfm.explain.explain`. Constant maps give NaN correlations,
    left out of the means.
    """
    check_images(images)
    other = randomized_model if randomized_model is not None else reinitialize(model, seed)
    if target is None and canonical_method(method) in CLASS_SPECIFIC_METHODS:
        # Explain the trained model's top class in both models, not each model's own argmax.
        with eval_mode(model), torch.no_grad():
            target = resolve_targets(model(images), None)
    trained = explain(model, images, method=method, target=target, **kwargs)
    random_maps = explain(other, images, method=method, target=target, **kwargs)
    rhos = np.array(
        [
            _spearman(trained[i], random_maps[i])
            for i in tqdm(range(len(trained)), desc="randomisation check", disable=not progress)
        ]
    )
    valid = rhos[~np.isnan(rhos)]
    return {
        "spearman": rhos,
        "mean_spearman": float(valid.mean()) if valid.size else float("nan"),
        "mean_abs_spearman": float(np.abs(valid).mean()) if valid.size else float("nan"),
        "n_constant": int(np.isnan(rhos).sum()),
    }
