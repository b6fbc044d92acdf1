"""Pre-training a foundation model with the shared loop: multi-label classification, or MAE (self-supervised)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xrayfm.data.transforms import normalization_for
from xrayfm.domain.fitting import save_run_gate
from xrayfm.models.backbones import check_timm_model, create_model
from xrayfm.models.checkpoint import load_checkpoint, save_checkpoint
from xrayfm.train.artifacts import model_spec, preprocessing
from xrayfm.train.config import PretrainConfig
from xrayfm.train.data import describe_views, load_task_data
from xrayfm.train.distributed import setup, teardown
from xrayfm.train.loop import fit


def pretrain(
    config: PretrainConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Pre-train ``config.model`` on the configured dataset; returns the run summary.

    Writes ``OUT/config.json``, ``best/`` (model.safetensors + meta.json, by ``config.metric``),
    ``last/`` (resumable state), ``log.csv``, ``metrics.csv``, ``tensorboard/`` and ``summary.json``.
    Under torchrun every process calls this; rank 0 writes. ``objective="mae"``: see :mod:`xrayfm.train.mae`.
    """
    config.validate()
    check_timm_model(config.model)  # before any data is read or cached
    if config.objective == "mae":
        from xrayfm.train.mae import pretrain_mae

        return pretrain_mae(config, progress=progress, should_cancel=should_cancel)
    env, device = setup(config.device)
    try:
        out = Path(config.out)
        mean, std = normalization_for(config.model)
        data = load_task_data(config, env, mean, std)
        spec = model_spec(config, len(data.names))
        torch.manual_seed(config.seed)
        pretrained: bool | str = False
        if config.pretrained:
            pretrained = True if config.pretrained == "timm" else config.pretrained
        model = create_model(**spec, pretrained=pretrained)
        data_info = describe_views(data)
        meta: dict[str, Any] = {
            "kind": "foundation",
            "task": "multilabel" if len(data.names) > 1 else "binary",
            "labels": data.names,
            "preprocessing": preprocessing(config, mean, std),
            "data": data_info,
            "manifest_sha256": data_info["manifest_sha256"],
            "training": config.to_dict(),
        }
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config.to_json(out / "config.json")

        def save_best(best_model: nn.Module, path: Path, metrics: dict[str, Any]) -> None:
            save_checkpoint(path, best_model, {**meta, "model": spec, "metrics": metrics})

        summary = fit(
            model,
            data,
            config,
            save_best,
            env=env,
            device=device,
            progress=progress,
            should_cancel=should_cancel,
        )
        result = {"command": "pretrain", "out": str(out), **summary, "data": data_info, "labels": data.names}
        if summary["status"] != "cancelled" and env.is_main:  # the version's domain gate, from best/
            best = load_checkpoint(out / "best")[0].to(device)
            result["domain_gate"] = save_run_gate(
                best, data, out / "best", device=device, seed=config.seed, progress=config.progress_bar
            )
        return result
    finally:
        teardown()


def pretrain_dict(spec: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """``pretrain`` from a JSON-like job spec (what a worker receives)."""
    return pretrain(PretrainConfig.from_dict(spec), **kwargs)


__all__ = ["pretrain", "pretrain_dict"]
