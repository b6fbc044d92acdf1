"""Independent reference maths for the explanation tests: a hand-written ViT attention forward and the
papers' rollout formulas in float64 numpy (no hooks, no xrayfm code)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def manual_forward(vit, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward a timm ViT computing every attention matrix from the qkv weights by hand.

    Returns the logits and per-block softmax attentions [B, H, N, N] (attached to the autograd graph).
    """
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    attns = []
    for blk in vit.blocks:
        a = blk.attn
        h = blk.norm1(t)
        b, n, c = h.shape
        qkv = F.linear(h, a.qkv.weight, a.qkv.bias).reshape(b, n, 3, a.num_heads, a.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * a.scale) @ k.transpose(-2, -1), dim=-1)
        attns.append(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        t = t + blk.ls1(a.proj(out))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return vit.forward_head(vit.norm(t)), attns


def _readout(relevance: np.ndarray, prefix: int, use_cls: bool, grid: tuple[int, int]) -> np.ndarray:
    row = relevance[0, prefix:] if use_cls else relevance[prefix:, prefix:].mean(axis=0)
    span = row.max() - row.min()
    row = (row - row.min()) / span if span > 0 else np.zeros_like(row)  # constant map -> zeros
    return row.reshape(grid)


def reference_rollout(
    attns: list[torch.Tensor],
    prefix: int,
    use_cls: bool,
    grid: tuple[int, int],
    fusion: str = "mean",
    discard: float = 0.0,
) -> np.ndarray:
    """Abnar & Zuidema rollout, image by image: fuse heads, drop the lowest entries (never the class
    token's self-attention), 0.5 A + 0.5 I, row-normalise, multiply up the layers."""
    mats = [a.detach().double().numpy() for a in attns]
    b, _, n, _ = mats[0].shape
    maps = []
    for i in range(b):
        r = np.eye(n)
        for m in mats:
            f = {"mean": m[i].mean(0), "max": m[i].max(0), "min": m[i].min(0)}[fusion]
            if discard:
                flat = f.flatten().copy()
                low = np.argsort(flat)[: int(n * n * discard)]
                if use_cls:
                    low = low[low != 0]
                flat[low] = 0.0
                f = flat.reshape(n, n)
            a = 0.5 * f + 0.5 * np.eye(n)
            a = a / a.sum(axis=1, keepdims=True)
            r = a @ r
        maps.append(_readout(r, prefix, use_cls, grid))
    return np.stack(maps)


def reference_grad_rollout(
    vit, x: torch.Tensor, target: int, prefix: int, use_cls: bool, grid: tuple[int, int]
) -> np.ndarray:
    """Chefer et al. 2021: R = I; R += mean_h((dy/dA * A)^+) R for each block."""
    logits, attns = manual_forward(vit, x)
    grads = torch.autograd.grad(logits[:, target].sum(), attns)
    maps = []
    for i in range(x.shape[0]):
        n = attns[0].shape[-1]
        r = np.eye(n)
        for a, g in zip(attns, grads, strict=True):
            cam = np.clip(g[i].double().numpy() * a[i].detach().double().numpy(), 0, None).mean(0)
            r = r + cam @ r
        maps.append(_readout(r, prefix, use_cls, grid))
    return np.stack(maps)
