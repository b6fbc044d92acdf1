"""Helpers shared by test folders (`from tests.helpers import ...`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the real radiographs live: $XRAYFM_SHARED_DATA, else ../shared/data next to the repo."""
    return Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))


# The tests' one tiny model: a 2-block ViT of width 48 (2 heads) on 32 px images with 8 px patches (16
# tokens, ~60k parameters), as `create_model` arguments. Tests that need another size or head override
# fields of it (tiny_spec(img_size=64)); none defines a tiny model of its own.
TINY_VIT: dict[str, Any] = {
    "name": "vit_tiny_patch16_224",
    "num_classes": 3,
    "img_size": 32,
    "patch_size": 8,
    "depth": 2,
    "embed_dim": 48,
    "num_heads": 2,
}


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """The tiny ViT's `create_model` arguments with `overrides` (a fresh dict)."""
    return {**TINY_VIT, **overrides}


def tiny_vit(seed: int = 0, **overrides: Any) -> Any:
    """A seeded random-init tiny ViT in eval mode (:data:`TINY_VIT` with `overrides`)."""
    import torch

    from xrayfm.models import create_model

    torch.manual_seed(seed)
    return create_model(**tiny_spec(**overrides)).eval()


def make_tiny_checkpoint(folder: Path, labels: list[str], size: int = 64, **meta_extra) -> Path:
    """A random-init tiny ViT checkpoint in the library's format (:data:`TINY_VIT` at `size` px)."""
    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_checkpoint

    spec = tiny_spec(num_classes=len(labels), img_size=size)
    meta = {
        "model": spec,
        "labels": labels,
        "preprocessing": {"size": size, "mean": [0.5], "std": [0.25], "channels": 3, "mode": "pad"},
        **meta_extra,
    }
    return save_checkpoint(folder, create_model(**spec), meta)


def starts_processes(fixture_function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a fixture that starts real processes (Redis, Celery workers, uvicorn, Streamlit, Orthanc,
    containers): every test that uses it, directly or through other fixtures, is marked slow
    (tests/conftest.py), so `make test-fast` runs none of them. Put it under ``@pytest.fixture``."""
    fixture_function.starts_processes = True  # type: ignore[attr-defined]
    return fixture_function
