"""CNN backbones through pretrain and adapt (ResNet, ConvNeXt, DenseNet): LoRA gets each family's own
targets when the ViT default is kept, the checkpoints load for inference, Grad-CAM explains them and
rollout refuses. Synthetic phantoms for the quick test; real MURA humerus radiographs per family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.train.train_helpers import CHEST_LABELS, QUIET, SIZE
from xrayfm.errors import XrayfmError
from xrayfm.train import AdaptConfig, PretrainConfig, adapt, pretrain

# One small member per family (model, model_kwargs): a few seconds per step on 2 CPU cores.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("resnet10t", {}),
    "convnext": ("convnext_atto", {"depths": [1, 1, 2, 1]}),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": [2, 2, 2, 2], "bn_size": 2}),
}
DEFAULT_TARGETS = {"resnet": ["conv1", "conv2"], "convnext": ["fc1", "fc2"], "densenet": ["conv1", "conv2"]}


def _pretrain(out: Path, family: str, **data: Any) -> Path:
    model, kwargs = FAMILIES[family]
    config = PretrainConfig(
        out=str(out), model=model, model_kwargs=kwargs, batch_size=16, augment=False, **data, **QUIET
    )  # drop_path_rate keeps its default 0.1: DenseNet has none and trains without it (a warning)
    summary = pretrain(config)
    assert summary["status"] == "completed"
    return out / "best"


def _adapt(out: Path, foundation: Path, **data: Any) -> dict[str, Any]:
    summary = adapt(
        AdaptConfig(
            out=str(out),
            foundation=str(foundation),
            method="lora",
            batch_size=16,
            n_bootstrap=20,
            **data,
            **QUIET,
        )  # fmt: skip
    )
    assert summary["status"] == "completed"
    return summary


def test_resnet_pretrain_then_lora_on_phantoms(chest_cache, tmp_path):
    data = {"cache": str(chest_cache), "labels": CHEST_LABELS, "size": SIZE}
    foundation = _pretrain(tmp_path / "pre", "resnet", epochs=1, **data)
    meta = json.loads((foundation / "meta.json").read_text())
    assert meta["model"]["name"] == "resnet10t" and "img_size" not in meta["model"]  # CNNs take any size
    summary = _adapt(tmp_path / "lora", foundation, epochs=1, **{**data, "labels": CHEST_LABELS[:1]})
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["lora_targets"] == DEFAULT_TARGETS["resnet"]  # recorded as used, not the ViT's qkv
    assert 0 < summary["trainable"]["fraction"] < 0.05
    with pytest.raises(XrayfmError, match="no module of this ResNet model matches LoRA target"):
        adapt(AdaptConfig(out=str(tmp_path / "bad"), foundation=str(foundation), lora_targets=["fc1"],
                          epochs=1, **data, **QUIET))  # fmt: skip


MURA_SIZE = 64


@pytest.fixture(scope="module")
def mura_caches(shared_data, tmp_path_factory) -> dict[str, str]:
    """The real MURA humerus train / valid splits cached once at 64 px (as shipped) for every family."""
    from xrayfm.data import open_dataset
    from xrayfm.data.cache import prepare_cache

    root = shared_data / "mura-humerus-64" / "MURA-v1.1"
    base = tmp_path_factory.mktemp("mura-cache")
    for split in ("train", "valid"):
        prepare_cache(open_dataset("mura", root, split=split), base / split, size=MURA_SIZE, workers=1,
                      progress=False)  # fmt: skip
    return {"cache": str(base / "train"), "val_cache": str(base / "valid"), "size": MURA_SIZE}


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cnn_family_on_real_mura_radiographs(shared_data, mura_caches, tmp_path, family):
    """Pre-train a few steps on real MURA humerus radiographs, LoRA-adapt, then explain real valid images:
    Grad-CAM maps are on each image's geometry and not constant; rollout refuses with its message."""
    from xrayfm.data.images import read_image
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.inference.runtime import make_predictor

    root = shared_data / "mura-humerus-64" / "MURA-v1.1"
    # a short budget at a high rate: enough to move the heads off their init, a few seconds per family
    train_only = {k: v for k, v in mura_caches.items() if k != "val_cache"}  # validates on 10% of train
    foundation = _pretrain(tmp_path / "pre", family, max_steps=8, lr=3e-3, **train_only)
    summary = _adapt(tmp_path / "lora", foundation, max_steps=4, lr=3e-3, **mura_caches)
    assert summary["data"]["synthetic"] is False and summary["data"]["val"]["studies"] == 125
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["lora_targets"] == DEFAULT_TARGETS[family]

    served = load_served_model(tmp_path / "lora" / "best", device="cpu")
    predictor = Predictor(served)
    assert predictor.default_method == "gradcam"
    paths = sorted((root / "valid" / "XR_HUMERUS").glob("patient*/study*/image*.*"))[:6]
    images = [read_image(p) for p in paths]
    answers = predictor.predict(images, method=None)
    for image, answer in zip(images, answers, strict=True):
        assert answer.explain_method == "gradcam" and 0.0 <= answer.probability <= 1.0
        assert answer.heatmap.shape == image.shape[:2]  # on the radiograph's own geometry
    # each map spans 0..255 (not constant): a one-output head maps the evidence for the answer shown
    assert [int(a.heatmap.max()) - int(a.heatmap.min()) for a in answers] == [255] * len(answers)
    assert len({a.heatmap.tobytes() for a in answers}) > 1  # maps differ between radiographs
    for method in ("rollout", "grad_rollout"):
        with pytest.raises(XrayfmError, match="rollout needs a ViT"):
            predictor.predict(images[:1], method=method)
    onnx = make_predictor(served, "onnxruntime", cache_dir=tmp_path / "onnx")
    via_onnx = onnx.predict(images, explain_maps=False)
    assert np.allclose([a.probability for a in via_onnx], [a.probability for a in answers], atol=1e-4)
