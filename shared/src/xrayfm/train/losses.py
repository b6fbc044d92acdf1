"""Masked multi-label losses: BCE-with-logits with per-label ``pos_weight``, and focal loss.

A target is observed where ``mask == 1``; masked entries (uncertain under u-ignore, blanks under
blank=mask, labels a dataset does not annotate) contribute nothing to the loss nor to ``pos_weight``.
Losses return the *sum* over observed entries; the caller divides by the number of observed entries
(globally, across processes), so that a multi-GPU step equals a single-process step on the same batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from xrayfm.errors import DataError


def pos_weight_from_labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-label negatives/positives over observed entries of ``labels`` [N, L] (1, 0, NaN = masked).

    A label with no positive or no negative gets weight 1 (there is nothing to balance).
    """
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    if y.ndim != 2:
        raise DataError(f"labels must be [N, L], got shape {tuple(y.shape)}")
    pos = (y == 1).sum(0).float()
    neg = (y == 0).sum(0).float()
    weight = torch.ones(y.shape[1])
    both = (pos > 0) & (neg > 0)
    weight[both] = neg[both] / pos[both]
    return weight


def masked_bce_sum(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of BCE-with-logits over observed entries (``mask`` 1), positives weighted by ``pos_weight``."""
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    )
    return (loss * mask).sum()


def masked_focal_sum(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, alpha: float = -1
) -> torch.Tensor:
    """Sum of torchvision's sigmoid focal loss over observed entries; ``alpha < 0``: no class weighting."""
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    return (loss * mask).sum()


class MaskedLoss(torch.nn.Module):
    """``loss(logits, targets, mask) -> summed loss`` for the configured kind (bce or focal)."""

    def __init__(self, kind: str = "bce", pos_weight: torch.Tensor | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        if kind not in ("bce", "focal"):
            raise DataError(f"unknown loss {kind!r}; choose bce or focal")
        self.kind, self.gamma = kind, gamma
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "focal":
            return masked_focal_sum(logits, targets, mask, self.gamma)
        return masked_bce_sum(logits, targets, mask, self.pos_weight)


__all__ = ["MaskedLoss", "masked_bce_sum", "masked_focal_sum", "pos_weight_from_labels"]
