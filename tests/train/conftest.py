"""Fixtures for training tests: tiny synthetic caches (32 px phantoms) and a tiny ViT configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.train_helpers import CHEST_LABELS, QUIET, SIZE, TINY_MODEL
from xrayfm.data import open_dataset
from xrayfm.data.cache import prepare_cache
from xrayfm.data.synth import synth_bone, synth_chest


def _cache(kind: str, root: Path, split: str, out: Path) -> Path:
    prepare_cache(open_dataset(kind, root, split=split), out, size=SIZE, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def chest_root(tmp_path_factory) -> Path:
    """A synthetic CheXpert-layout dataset (48 images)."""
    root = tmp_path_factory.mktemp("synth") / "CheXpert-synth"
    synth_chest(root, n=48, seed=1, size=SIZE, progress=False)
    return root


@pytest.fixture(scope="session")
def chest_cache(chest_root, tmp_path_factory) -> Path:
    """Cache of the synthetic chest train split."""
    return _cache("chexpert", chest_root, "train", tmp_path_factory.mktemp("cache") / "chest-train")


@pytest.fixture(scope="session")
def bone_root(tmp_path_factory) -> Path:
    """A synthetic MURA-layout dataset (64 images, forearm + humerus)."""
    root = tmp_path_factory.mktemp("synth") / "MURA-synth"
    synth_bone(root, n=64, seed=2, size=SIZE, progress=False)
    return root


@pytest.fixture(scope="session")
def bone_caches(bone_root, tmp_path_factory) -> tuple[Path, Path]:
    """(train, valid) caches of the synthetic bone dataset."""
    base = tmp_path_factory.mktemp("cache")
    return _cache("mura", bone_root, "train", base / "bone-train"), _cache(
        "mura", bone_root, "valid", base / "bone-valid"
    )


@pytest.fixture(scope="session")
def foundation(chest_cache, tmp_path_factory) -> Path:
    """best/ of a tiny pre-training run on the synthetic chest cache (a foundation checkpoint)."""
    from xrayfm.train import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("foundation") / "run"
    config = PretrainConfig(
        out=str(out),
        cache=str(chest_cache),
        labels=CHEST_LABELS,
        epochs=1,
        batch_size=8,
        drop_path_rate=0.0,
        augment=False,
        **TINY_MODEL,
        **QUIET,
    )
    pretrain(config)
    return out / "best"
