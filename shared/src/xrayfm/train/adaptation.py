"""Adapting a foundation checkpoint to a new task: LoRA, full fine-tuning, linear probe, or from scratch.

All four methods use the same data, loop and budget, so they compare fairly (``auto`` chooses among the
first three: :mod:`xrayfm.train.auto`):

- ``lora``: PEFT LoRA on the chosen attention/MLP layers (ViT) or block convolutions / MLPs (CNNs: see
  :mod:`xrayfm.models.lora`) + a new trainable head; the rest is frozen.
- ``full``: every weight trains (foundation init, new head).
- ``linear``: a linear probe: the backbone is frozen, only the new head trains.
- ``scratch``: the same architecture from random init (the foundation only fixes the architecture).

The run keeps ``best/`` (LoRA: the adapter alone + meta with the foundation's path and hash; other
methods: a full checkpoint), optionally ``merged/``, and ends with a report on the validation split
(``report/``: study-level AUROC for binary tasks like MURA, ECE, ROC figures).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xrayfm.domain.fitting import save_run_gate
from xrayfm.errors import XrayfmError
from xrayfm.models.backbones import classifier_names, create_model
from xrayfm.models.checkpoint import load_checkpoint, save_adapted, save_checkpoint
from xrayfm.models.lora import LoraSettings, apply_lora, merge, resolve_lora_targets, trainable_summary
from xrayfm.registry import resolve_checkpoint_dir
from xrayfm.train.artifacts import load_any
from xrayfm.train.config import METHOD_LR, AdaptConfig
from xrayfm.train.data import describe_views, load_task_data, subsample_labelled
from xrayfm.train.distributed import barrier, setup, teardown
from xrayfm.train.evaluation import evaluate_view
from xrayfm.train.loop import fit, use_bf16


def build_adapted_model(
    foundation: nn.Module, foundation_meta: dict[str, Any], config: AdaptConfig, num_classes: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to train for ``config.method`` and its ``create_model`` spec (torch RNG must be seeded)."""
    spec = {
        **foundation_meta["model"],
        "num_classes": int(num_classes),
        "drop_path_rate": config.drop_path_rate,
    }
    model = create_model(**spec)
    heads = tuple(f"{h}." for h in classifier_names(model))
    if config.method != "scratch":
        backbone = {k: v for k, v in foundation.state_dict().items() if not k.startswith(heads)}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        not_head = [k for k in missing if not k.startswith(heads)]
        if not_head or unexpected:
            raise XrayfmError(
                f"foundation weights do not fit {spec}: missing {not_head}, unexpected {unexpected}"
            )
    if config.method == "lora":
        targets = resolve_lora_targets(model, config.lora_targets)  # the ViT default -> the family's
        settings = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_dropout, targets)
        model = apply_lora(model, settings)
    elif config.method == "linear":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(heads)
    return model, spec


def adapt(
    config: AdaptConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Adapt ``config.foundation`` to the configured dataset with ``config.method``; returns the summary.

    ``label_fraction`` / ``max_studies`` keep a seeded share of training studies (or patients, by
    ``subsample_by``); a separate validation split is never subsampled, one drawn from the training data
    comes from that share (:func:`xrayfm.train.data.subsample_labelled`). ``auto`` tries lora, full and linear
    and keeps the best (:func:`xrayfm.train.auto.adapt_auto`).
    """
    if config.method == "auto":
        from xrayfm.train.auto import adapt_auto  # it runs this module's run_adaptation

        return adapt_auto(config, progress, should_cancel)
    return run_adaptation(config, progress, should_cancel)


def run_adaptation(
    config: AdaptConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    *,
    extra_meta: dict[str, Any] | None = None,
    gate: bool = True,
) -> dict[str, Any]:
    """One adaptation with a fixed ``config.method`` (:func:`adapt`'s work). ``extra_meta`` joins the
    checkpoint's meta (e.g. ``auto``'s choice); ``gate=False`` fits no domain gate (a candidate run that
    is never published)."""
    config.validate()
    if config.method == "auto":
        raise XrayfmError("run_adaptation trains one method: call adapt for --method auto")
    # A shipped foundation (xrayfm/<name>) is its folder inside the package from here on (lineage, meta);
    # no --lr: the method's own.
    config = dataclasses.replace(
        config,
        foundation=str(resolve_checkpoint_dir(config.foundation)),
        lr=METHOD_LR[config.method] if config.lr is None else config.lr,
    )
    env, device = setup(config.device)
    try:
        foundation, fmeta = load_checkpoint(config.foundation)
        prep = fmeta["preprocessing"]
        # The images must be prepared as for pre-training: size, resize mode, channels, normalisation.
        config = dataclasses.replace(
            config,
            size=config.size or int(prep["size"]),
            resize_mode=prep.get("mode", config.resize_mode),
            channels=int(prep["channels"]),
            model=fmeta["model"]["name"],
        )
        if int(config.size) != int(prep["size"]):
            raise XrayfmError(f"size {config.size} differs from the foundation's {prep['size']} px")
        if config.method == "lora":  # recorded as used: a CNN's own default instead of the ViT's qkv
            targets = resolve_lora_targets(foundation, config.lora_targets)
            config = dataclasses.replace(config, lora_targets=list(targets))
        out = Path(config.out)
        data = load_task_data(config, env, prep["mean"], prep["std"])
        data = subsample_labelled(
            data, config.label_fraction, config.max_studies, config.subsample_by, config.seed
        )
        torch.manual_seed(config.seed)
        model, spec = build_adapted_model(foundation, fmeta, config, len(data.names))
        del foundation
        params = trainable_summary(model)
        data_info = describe_views(data)
        lineage = {"path": str(Path(config.foundation).resolve()), "sha256": fmeta["weights"]["sha256"]}
        meta: dict[str, Any] = {
            "kind": "adapted",
            "method": config.method,
            "task": "multilabel" if len(data.names) > 1 else "binary",
            "labels": data.names,
            "preprocessing": {**prep, "policy": config.policy or prep.get("policy")},
            "data": data_info,
            "manifest_sha256": data_info["manifest_sha256"],
            "trainable": params,
            "training": config.to_dict(),
            **(extra_meta or {}),
        }
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config.to_json(out / "config.json")

        def save_best(best_model: nn.Module, path: Path, metrics: dict[str, Any]) -> None:
            if config.method == "lora":
                save_adapted(path, best_model, {**meta, "foundation": config.foundation, "metrics": metrics})
            else:
                save_checkpoint(
                    path, best_model, {**meta, "model": spec, "foundation": lineage, "metrics": metrics}
                )

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
        result = {
            "command": "adapt",
            "out": str(out),
            "method": config.method,
            "trainable": params,
            **summary,
            "data": data_info,
            "labels": data.names,
        }
        if summary["status"] == "cancelled":
            return result

        best_dir = out / "best"
        if config.merge and config.method == "lora" and env.is_main:
            adapted, _ = load_any(best_dir)
            merged = merge(copy.deepcopy(adapted))
            save_checkpoint(
                out / "merged",
                merged,
                {
                    **meta,
                    "model": {**fmeta["model"], "num_classes": len(data.names)},
                    "foundation": lineage,
                    "merged_from": str(best_dir),
                },
            )
            result["merged_dir"] = str(out / "merged")
        barrier(env)
        evaluated = load_any(best_dir)[0] if config.report_on == "best" else model
        title = (
            f"{config.method} adaptation ({config.report_on} weights) on {data_info['train_cache']['kind']}"
        )
        if data_info["synthetic"]:
            title += " (SYNTHETIC data)"
        source = {
            "run": str(out),
            "weights": config.report_on,
            "foundation": lineage,
            "label_fraction": config.label_fraction,
            "max_studies": config.max_studies,
        }
        evaluation = evaluate_view(
            evaluated,
            data.val,
            data.names,
            out / "report",
            title=title,
            env=env,
            device=device,
            bf16=use_bf16(config, device),
            batch_size=config.eval_batch_size or 2 * config.batch_size,
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
            num_workers=config.num_workers,
            progress=config.progress_bar,
            source=source,
        )
        if env.is_main:
            result["report"] = {k: v for k, v in evaluation.items() if k != "report"}
        if env.is_main and gate:
            # the version's domain gate, from the best weights (what is published)
            gated = evaluated if config.report_on == "best" else load_any(best_dir)[0]
            result["domain_gate"] = save_run_gate(
                gated.to(device),
                data,
                best_dir,
                device=device,
                seed=config.seed,
                progress=config.progress_bar,
            )
        return result
    finally:
        teardown()


__all__ = ["adapt", "build_adapted_model", "run_adaptation"]
