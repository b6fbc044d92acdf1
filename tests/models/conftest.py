"""Fixtures for model tests: a tiny ViT (2 blocks, width 48, 32x32 input) that builds in milliseconds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests import helpers
from xrayfm.models import create_model

# tests/helpers.py's tiny ViT with 16 px patches (2 x 2 tokens): the exact parameter counts of the model
# tests are written for it.
TINY_VIT: dict[str, Any] = helpers.tiny_spec(patch_size=16)


@pytest.fixture
def tiny_vit() -> Callable[..., nn.Module]:
    """Factory: `tiny_vit(seed=0, **overrides)` -> a seeded random tiny ViT."""

    def make(seed: int = 0, **overrides: Any) -> nn.Module:
        torch.manual_seed(seed)
        return create_model(**{**TINY_VIT, **overrides})

    return make


@pytest.fixture
def images() -> torch.Tensor:
    """A fixed batch of 4 random 3x32x32 images."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(123))


@pytest.fixture
def tiny_spec() -> dict[str, Any]:
    """The tiny ViT's `create_model` arguments (a fresh copy)."""
    return dict(TINY_VIT)
