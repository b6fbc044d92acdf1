"""Attention rollout (Abnar & Zuidema 2020) for timm Vision Transformers.

The attention matrices are captured with forward hooks on each attention module's ``attn_drop``, which
timm's *unfused* attention path calls with the softmax output. timm's fused path
(``F.scaled_dot_product_attention``) never calls ``attn_drop``, so :func:`capture_attention` switches every
attention module to the unfused path for the duration of the context and restores the original setting
afterwards (also when an exception is raised). Attention modules are found by type, not by name, so the
same code works on plain models, PEFT-LoRA-wrapped models and merged models.

timm has no rollout of its own and the common reference (jacobgil/vit-explain) is not a package, so the
few lines of rollout maths are written here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from timm.layers import Attention
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn

from xrayfm.errors import XrayfmError

HEAD_FUSIONS = ("mean", "max", "min")

# Modules whose unfused path computes ``attn = softmax(q k^T * scale); attn = self.attn_drop(attn)``.
ATTENTION_TYPES: tuple[type[nn.Module], ...] = (Attention, ParallelScalingBlock)


def is_vit(model: nn.Module) -> bool:
    """Whether `model` is or contains a timm ``VisionTransformer`` (what the rollout methods need)."""
    return any(isinstance(module, VisionTransformer) for module in model.modules())


def find_vit(model: nn.Module, what: str = "attention rollout") -> VisionTransformer:
    """Return the timm ``VisionTransformer`` inside `model` (itself, or wrapped by PEFT and the like).

    Raises "<what> needs a ViT" otherwise (e.g. for a ResNet, ConvNeXt or DenseNet)."""
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            return module
    raise XrayfmError(
        f"{what} needs a ViT: {type(model).__name__} is not (and does not contain) a timm "
        "VisionTransformer; use method='gradcam' for convolutional backbones (ResNet, ConvNeXt, DenseNet)"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """All supported attention modules of `model`, in definition order (= execution order in a ViT)."""
    found = [m for m in model.modules() if isinstance(m, ATTENTION_TYPES)]
    if not found:
        raise XrayfmError(
            f"no timm attention module ({', '.join(t.__name__ for t in ATTENTION_TYPES)}) found in "
            f"{type(model).__name__}; attention-based explanations are not supported for this model"
        )
    return found


def fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """Reduce per-head attention [B, H, N, N] to [B, N, N] with 'mean', 'max' or 'min'."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise XrayfmError(f"unknown head_fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}")


@dataclass
class AttentionRecord:
    """What :func:`capture_attention` collected: one tensor per attention call, in execution order.

    ``attentions[i]`` is [B, H, N, N] (or [B, N, N] when heads were fused in the hook).
    """

    attentions: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def capture_attention(
    model: nn.Module, *, head_fusion: str | None = None, keep_graph: bool = False
) -> Iterator[AttentionRecord]:
    """Record the softmax attention of every timm attention module during forwards inside the context.

    Fused attention is switched off while inside (and restored on exit, also on exceptions). With
    `head_fusion` the heads are reduced in the hook (saves memory); with `keep_graph` the tensors stay
    attached to the autograd graph (needed for gradient-weighted rollout), otherwise they are detached.
    """
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise XrayfmError(f"unknown head_fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}")
    modules = attention_modules(model)
    record = AttentionRecord()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        attn = output if keep_graph else output.detach()
        record.attentions.append(fuse_heads(attn, head_fusion) if head_fusion else attn)

    originals = [m.fused_attn for m in modules]
    handles = []
    try:
        for m in modules:
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(hook))
        yield record
    finally:
        for h in handles:
            h.remove()
        for m, fused in zip(modules, originals, strict=True):
            m.fused_attn = fused


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (no dropout) and restore each one's own flag afterwards.

    A model wholly in eval mode already (as a served one is) is left as it is: switching and restoring
    every module's flag on each call is a cost of its own, paid on every served request."""
    flags = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in flags):
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each map of a batch [B, ...] to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1).float()
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def discard_lowest(fused: torch.Tensor, discard_ratio: float, protect_cls: bool) -> torch.Tensor:
    """Zero the lowest `discard_ratio` fraction of each [N, N] matrix of a batch [B, N, N].

    As in the reference implementation (jacobgil/vit-explain), the class token's self-attention entry
    (0, 0) is never dropped when the model has a class token.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise XrayfmError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    b, n, _ = fused.shape
    k = int(n * n * discard_ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n)
    idx = flat.topk(k, dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    if protect_cls:
        drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(b, n, n)


def rollout_matrix(
    attentions: list[torch.Tensor],
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    protect_cls: bool = True,
) -> torch.Tensor:
    """Roll attention out over the layers: R = Â_L ··· Â_1 with Â = rownorm(0.5·A + 0.5·I).

    `attentions` are per-layer [B, H, N, N] (heads fused with `head_fusion`) or already fused [B, N, N].
    Returns R [B, N, N]; every row sums to 1.
    """
    if not attentions:
        raise XrayfmError("no attention matrices were captured (did the forward pass run?)")
    first = attentions[0]
    n = first.shape[-1]
    eye = torch.eye(n, dtype=torch.float32, device=first.device)
    result = eye.expand(first.shape[0], n, n)
    for attn in attentions:
        fused = attn.float() if attn.dim() == 3 else fuse_heads(attn.float(), head_fusion)
        fused = discard_lowest(fused, discard_ratio, protect_cls)
        a = 0.5 * fused + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def uses_class_token(vit: VisionTransformer) -> bool:
    """True when the classifier reads the class token (so the map is the class token's row)."""
    return bool(getattr(vit, "has_class_token", vit.cls_token is not None)) and vit.global_pool == "token"


def patch_grid(vit: VisionTransformer, image_hw: tuple[int, int], num_patch_tokens: int) -> tuple[int, int]:
    """The (gh, gw) patch grid for an input of size `image_hw`, checked against the token count."""
    grid = tuple(vit.patch_embed.grid_size)
    if grid[0] * grid[1] != num_patch_tokens and hasattr(vit.patch_embed, "dynamic_feat_size"):
        grid = tuple(vit.patch_embed.dynamic_feat_size(tuple(image_hw)))
    if grid[0] * grid[1] != num_patch_tokens:
        raise XrayfmError(
            f"cannot map {num_patch_tokens} patch tokens to a grid for an image of size {tuple(image_hw)} "
            f"(model grid {tuple(vit.patch_embed.grid_size)})"
        )
    return int(grid[0]), int(grid[1])


def token_relevance_to_map(
    relevance: torch.Tensor, vit: VisionTransformer, image_hw: tuple[int, int]
) -> torch.Tensor:
    """Read a [B, N, N] relevance matrix out as [B, gh, gw] patch maps normalised to [0, 1].

    Uses the class token's row when the head reads the class token, else the mean over the rows of the
    tokens the head pools (patch tokens, plus prefix tokens if the model pools them). Columns of prefix
    and register tokens are dropped.
    """
    prefix = vit.num_prefix_tokens
    if uses_class_token(vit):
        row = relevance[:, 0, prefix:]
    else:
        first = 0 if getattr(vit, "pool_include_prefix", False) else prefix
        row = relevance[:, first:, prefix:].mean(dim=1)
    gh, gw = patch_grid(vit, image_hw, row.shape[1])
    return normalize_maps(row.reshape(row.shape[0], gh, gw))


def check_images(images: torch.Tensor) -> None:
    """Raise a clear error unless `images` is a [B, C, H, W] tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise XrayfmError(f"images must be a [B, C, H, W] tensor, got {shape}")


def predict_with_rollout(
    model: nn.Module,
    images: torch.Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving both the model's output and the rollout maps [B, gh, gw] in [0, 1].

    The attention is captured from the same forward (no second pass), in eval mode, without gradients.
    """
    check_images(images)
    vit = find_vit(model)
    with eval_mode(model), torch.no_grad(), capture_attention(model, head_fusion=head_fusion) as rec:
        logits = model(images)
    relevance = rollout_matrix(
        rec.attentions, discard_ratio=discard_ratio, protect_cls=vit.cls_token is not None
    )
    return logits, token_relevance_to_map(relevance, vit, tuple(images.shape[-2:]))


def attention_rollout(
    model: nn.Module,
    images: torch.Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Attention-rollout maps [B, gh, gw] in [0, 1] over the patch tokens of a timm ViT."""
    return predict_with_rollout(model, images, head_fusion=head_fusion, discard_ratio=discard_ratio)[1]
