"""The single entry point `explain`: dispatch, output contract, errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from tests.helpers import tiny_vit
from xrayfm.errors import XrayfmError
from xrayfm.explain import attention_rollout, explain, gradcam, gradient_rollout


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_dispatch_matches_the_functions_and_returns_numpy_in_unit_range() -> None:
    torch.manual_seed(0)
    vit, cnn = tiny_vit(), timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    cases = [
        (explain(vit, _x(), "rollout", head_fusion="max"), attention_rollout(vit, _x(), head_fusion="max")),
        (explain(vit, _x(), "grad-rollout", target=1), gradient_rollout(vit, _x(), 1)),
        (explain(cnn, _x(64), "Grad-CAM", target=2), gradcam(cnn, _x(64), 2)),
    ]
    for got, expected in cases:
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)


def test_sensible_errors() -> None:
    vit = tiny_vit()
    with pytest.raises(XrayfmError, match="unknown explanation method"):
        explain(vit, _x(), "lime")
    with pytest.raises(XrayfmError, match="unexpected option"):
        explain(vit, _x(), "grad_rollout", head_fusion="max")
    with pytest.raises(XrayfmError, match="class-agnostic"):
        explain(vit, _x(), "rollout", target=0)
    with pytest.raises(XrayfmError, match="VisionTransformer"):
        explain(timm.create_model("resnet18", pretrained=False), _x(), "rollout")
    with pytest.raises(XrayfmError, match="3 outputs"):
        explain(vit, _x(), "grad_rollout", target=[0, 7])
