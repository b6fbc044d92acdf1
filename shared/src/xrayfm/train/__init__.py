"""Training engine: pre-training, adaptation (LoRA / full / linear / scratch), evaluation, experiments.

    from xrayfm.train import PretrainConfig, pretrain, AdaptConfig, adapt, evaluate
    summary = pretrain(PretrainConfig(out="runs/fm", kind="chexpert", root="CheXpert-v1.0-small"))

Names are imported lazily, so that ``xrayfm --help`` does not pay for torch and timm. The search is
``xrayfm.train.tune.tune`` (not re-exported here: the name would clash with its module's).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "xrayfm.train.config",
    "PretrainConfig": "xrayfm.train.config",
    "AdaptConfig": "xrayfm.train.config",
    "EvaluateConfig": "xrayfm.train.config",
    "CVConfig": "xrayfm.train.config",
    "TuneConfig": "xrayfm.train.config",
    "pretrain": "xrayfm.train.pretraining",
    "adapt": "xrayfm.train.adaptation",
    "evaluate": "xrayfm.train.evaluation",
    "label_efficiency": "xrayfm.train.experiment",
    "cross_validate": "xrayfm.train.cv",
    "fit": "xrayfm.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xrayfm.train' has no attribute {name!r}")
