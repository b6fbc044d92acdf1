"""Masked losses and pos_weight, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrayfm.errors import DataError
from xrayfm.train.losses import MaskedLoss, masked_bce_sum, masked_focal_sum, pos_weight_from_labels

NAN = float("nan")


def test_pos_weight_counts_observed_labels_only():
    labels = np.array(
        [
            [1, 0, NAN, 1],
            [0, 0, 1, 1],
            [0, NAN, 1, 1],
            [1, 0, 0, NAN],
            [0, 0, NAN, 1],
        ],
        dtype=np.float32,
    )
    # col 0: 2 pos, 3 neg -> 1.5; col 1: no positive -> 1; col 2: 2 pos, 1 neg -> 0.5; col 3: no negative -> 1
    assert pos_weight_from_labels(labels).tolist() == pytest.approx([1.5, 1.0, 0.5, 1.0])


def test_pos_weight_rejects_wrong_shape():
    with pytest.raises(DataError, match=r"\[N, L\]"):
        pos_weight_from_labels(np.zeros(4))


def _bce(x: float, y: float, pw: float = 1.0) -> float:
    s = 1 / (1 + math.exp(-x))
    return -(pw * y * math.log(s) + (1 - y) * math.log(1 - s))


def test_masked_bce_matches_hand_computation():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    pos_weight = torch.tensor([3.0, 0.5])
    expected = _bce(0.3, 1, 3.0) + _bce(-1.2, 0, 0.5) + _bce(0.5, 1, 0.5)  # [1, 0] is masked
    assert float(masked_bce_sum(logits, targets, mask, pos_weight)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["bce", "focal"])
def test_masked_entries_contribute_nothing(kind):
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    targets = (torch.rand(6, 4) > 0.5).float()
    mask = (torch.rand(6, 4) > 0.3).float()
    loss_fn = MaskedLoss(kind, torch.full((4,), 2.0) if kind == "bce" else None)
    loss = loss_fn(logits, targets, mask)
    loss.backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert torch.all(logits.grad[mask == 1] != 0)
    # Changing logits or targets where masked leaves the loss unchanged.
    other_logits = logits.detach().clone()
    other_targets = targets.clone()
    other_logits[mask == 0] = 50.0
    other_targets[mask == 0] = 1 - other_targets[mask == 0]
    assert float(loss_fn(other_logits, other_targets, mask)) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_focal_with_gamma_zero_is_bce():
    torch.manual_seed(1)
    logits, targets = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    mask = (torch.rand(5, 3) > 0.2).float()
    focal = masked_focal_sum(logits, targets, mask, gamma=0.0)
    assert float(focal) == pytest.approx(float(masked_bce_sum(logits, targets, mask)), rel=1e-5)
    # With gamma > 0 confident correct predictions are down-weighted: the loss is smaller.
    assert float(masked_focal_sum(logits, targets, mask, gamma=2.0)) < float(focal)


def test_unknown_loss_is_an_error():
    with pytest.raises(DataError, match="unknown loss"):
        MaskedLoss("hinge")
