"""Constants shared by the training tests (a module of its own: test files import it by name)."""

from __future__ import annotations

from typing import Any

SIZE = 32
# A 2-block ViT of width 48 on 32 px images with 8 px patches: 16 tokens, ~60k parameters.
TINY_MODEL: dict[str, Any] = {
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
    "size": SIZE,
}
CHEST_LABELS = ["Cardiomegaly", "Lung Opacity", "Pleural Effusion"]
# Quiet, quick runs: no bars, no TensorBoard unless a test wants it.
QUIET: dict[str, Any] = {"progress_bar": False, "tensorboard": False, "log_every": 1}
