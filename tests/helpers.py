"""Helpers shared by test folders (import as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the real radiographs live: $XRAYFM_SHARED_DATA, else ../shared/data next to the repo."""
    return Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_tiny_checkpoint(folder: Path, labels: list[str], size: int = 64, **meta_extra) -> Path:
    """A random-init 2-block ViT-Tiny checkpoint in the library's format, fast enough for CPU tests."""
    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_checkpoint

    spec = {"name": "vit_tiny_patch16_224", "num_classes": len(labels), "img_size": size, "depth": 2}
    meta = {
        "model": spec,
        "labels": labels,
        "preprocessing": {"size": size, "mean": [0.5], "std": [0.25], "channels": 3, "mode": "pad"},
        **meta_extra,
    }
    return save_checkpoint(folder, create_model(**spec), meta)
