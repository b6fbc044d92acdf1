"""Class-specific maps: gradient-weighted attention rollout (ViTs) and Grad-CAM (convolutional backbones).

Both need only a forward hook and one ``torch.autograd.grad`` call. They are written here rather than taken
from ``grad-cam`` (pytorch-grad-cam) to avoid a dependency for ~20 lines and to share the attention
capture (fused attention switched off, restored afterwards) with :mod:`xrayfm.explain.rollout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from xrayfm.errors import XrayfmError
from xrayfm.explain.rollout import (
    capture_attention,
    check_images,
    eval_mode,
    find_vit,
    normalize_maps,
    token_relevance_to_map,
)

Target = int | Sequence[int] | torch.Tensor | None


def resolve_targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Per-image output indices [B]: `target` for every image, one per image, or the argmax when None."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise XrayfmError(f"class-specific explanations need model outputs of shape [B, K], got {got}")
    b, k = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise XrayfmError(f"got {t.numel()} targets for a batch of {b} images")
    bad = sorted({int(i) for i in t.tolist() if not 0 <= i < k})
    if bad:
        raise XrayfmError(f"target index out of range for a model with {k} outputs: {bad}")
    return t


def _target_score(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Sum over the batch of each image's target logit (images do not interact, so grads stay per-image)."""
    targets = resolve_targets(logits, target)
    return logits.gather(1, targets[:, None]).sum()


def gradient_rollout(model: nn.Module, images: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021) for output `target`: maps [B, gh, gw] in [0, 1].

    R = I; for each block  Ā = mean_heads((∂y_t/∂A ⊙ A)⁺);  R ← R + Ā·R. Read out like plain rollout.
    """
    check_images(images)
    vit = find_vit(model, "gradient rollout")
    x = images.detach().clone().requires_grad_(True)  # grads flow even when every weight is frozen
    with eval_mode(model), torch.enable_grad(), capture_attention(model, keep_graph=True) as rec:
        logits = model(x)
    score = _target_score(logits, target)
    grads = torch.autograd.grad(score, rec.attentions, allow_unused=True)
    b, _, n, _ = rec.attentions[0].shape
    relevance = torch.eye(n, device=x.device).expand(b, n, n)
    for attn, grad in zip(rec.attentions, grads, strict=True):
        if grad is None:  # this block does not influence the output
            continue
        cam = (grad * attn).clamp(min=0).mean(dim=1).detach().float()
        relevance = relevance + cam @ relevance
    return token_relevance_to_map(relevance, vit, tuple(images.shape[-2:]))


def default_cam_layer(model: nn.Module) -> nn.Module:
    """The Grad-CAM layer of a timm CNN: its last feature stage (``feature_info[-1]``), also inside a PEFT
    wrapper. ResNet ``layer4``, ConvNeXt ``stages.3``, DenseNet ``features.norm5``.

    Why this one: it is the tensor the classifier head global-pools (its output *is* ``forward_features``:
    tested for each family), so the gradient-averaged channel weights of Grad-CAM are those of the
    head's own decision, with the most semantic features and still a spatial grid (stride 32). An
    earlier stage gives finer but less class-specific maps (pass ``target_layer=``). Read from timm's
    ``feature_info`` rather than a per-family name list so that any timm CNN (and its variants: deep
    stems, ``conv_mlp``, other depths) gets the right layer; DenseNet's is its final norm + ReLU, not the
    last dense block, because the head pools after that norm.
    """
    for module in model.modules():
        info = getattr(module, "feature_info", None)
        if isinstance(info, list) and info and "module" in info[-1] and hasattr(module, "forward_features"):
            return module.get_submodule(info[-1]["module"])
    raise XrayfmError(
        f"cannot find the last feature stage of {type(model).__name__}; pass target_layer= (a module or "
        "its dotted name)"
    )


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target: Target = None,
    *,
    target_layer: nn.Module | str | None = None,
    sign: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) for output `target`: maps [B, h, w] in [0, 1] at the feature grid.

    `target_layer` defaults to the last stage of a timm CNN (e.g. ``layer4`` of a ResNet, ``stages.3`` of
    a ConvNeXt); its output must be a [B, C, h, w] feature map. `sign` (one +1 / -1 per image) explains
    the negated score where it is -1: the evidence *against* the output, e.g. for a "Normal" decision of
    a one-output binary head (as pytorch-grad-cam's ``BinaryClassifierOutputTarget(0)``).
    """
    check_images(images)
    if isinstance(target_layer, str):
        try:
            layer = model.get_submodule(target_layer)
        except AttributeError as err:
            raise XrayfmError(f"model has no submodule {target_layer!r}") from err
    else:
        layer = target_layer if target_layer is not None else default_cam_layer(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    x = images.detach().clone().requires_grad_(True)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) or captured[0].dim() != 4:
        shapes = [tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__ for c in captured]
        raise XrayfmError(
            f"Grad-CAM needs one [B, C, h, w] feature map from the target layer, got {shapes}; "
            "for Vision Transformers use method='grad_rollout'"
        )
    feats = captured[0]
    targets = resolve_targets(logits, target)
    scores = logits.gather(1, targets[:, None]).squeeze(1)
    if sign is not None:
        scores = scores * torch.as_tensor(sign, dtype=scores.dtype, device=scores.device).reshape(-1)
    (grad,) = torch.autograd.grad(scores.sum(), feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # alpha_c: global-average-pooled gradients
    cam = torch.relu((weights * feats).sum(dim=1)).detach()
    return normalize_maps(cam)
