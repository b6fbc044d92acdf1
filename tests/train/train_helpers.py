"""Constants shared by the training tests (a module of its own: test files import it by name)."""

from __future__ import annotations

from typing import Any

from tests.helpers import TINY_VIT

SIZE = TINY_VIT["img_size"]
# tests/helpers.py's tiny ViT as training-config fields.
TINY_MODEL: dict[str, Any] = {
    "model": TINY_VIT["name"],
    "model_kwargs": {k: TINY_VIT[k] for k in ("patch_size", "depth", "embed_dim", "num_heads")},
    "size": SIZE,
}
CHEST_LABELS = ["Cardiomegaly", "Lung Opacity", "Pleural Effusion"]
# Quiet, quick runs: no bars, no TensorBoard unless a test wants it.
QUIET: dict[str, Any] = {"progress_bar": False, "tensorboard": False, "log_every": 1}
