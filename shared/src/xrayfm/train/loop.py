"""The training loop shared by pre-training and adaptation: one function, read top to bottom.

``fit`` trains ``model`` on ``data.train`` with AdamW, linear warm-up + cosine decay and gradient
clipping (bf16 autocast on CUDA, fp32 on CPU), validates every epoch, keeps the best checkpoint
(``best/``, written by the caller's ``save_best``) and a resumable training state (``last/``).

Exact resume: the data order is a permutation seeded by (seed, epoch), augmentation is seeded by
(seed, epoch, sample) (see :mod:`xrayfm.train.sampler`), and ``last/`` holds weights, optimizer, scheduler
and RNG states. A run killed after step k resumes from its last saved state, skips the batches of the
current epoch it already trained on, and ends with the weights of an uninterrupted run.

Multi-process (torchrun): each rank reads its slice of every global batch; the loss is normalised by
the number of observed labels of the *global* batch, so the averaged DDP gradient equals the
single-process gradient of the same global batch. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xrayfm.errors import DataError, XrayfmError
from xrayfm.evaluate import multilabel_report
from xrayfm.models.checkpoint import STATE_JSON, load_training_state, save_training_state
from xrayfm.train.config import TrainConfig
from xrayfm.train.data import TaskData
from xrayfm.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    gather_rows,
    max_weight_difference,
)
from xrayfm.train.losses import MaskedLoss, pos_weight_from_labels
from xrayfm.train.runlog import RunLog
from xrayfm.train.sampler import EpochBatches, SeededView, mix_seed, shard_batches

SaveBest = Callable[[nn.Module, Path, dict[str, Any]], None]
Progress = Callable[[dict[str, Any]], None]
# Hooks of other objectives (e.g. MAE): the loss of one training batch (already on the device), and the
# validation metrics of the model (they must include ``config.metric``).
StepLoss = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
Validate = Callable[[nn.Module], dict[str, Any]]


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``.

    A callable object (not a lambda) so that LambdaLR's state_dict records its settings.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA under ``auto``; fp32 on CPU unless bf16 is asked for explicitly."""
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norms, position embeddings, tokens."""
    from timm.optim import param_groups_weight_decay

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = set(base.no_weight_decay()) if hasattr(base, "no_weight_decay") else set()
    patterns = [p for k in skip for p in (k, f"*.{k}")]
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=patterns)
    if not groups:
        raise XrayfmError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    view: SeededView,
    batch_size: int,
    env: DistEnv,
    device: torch.device,
    bf16: bool = False,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Logits [N, L] of every image of ``view``, in order; each rank computes a contiguous share."""
    batches = shard_batches(len(view), batch_size, env.rank, env.world_size)
    # An own generator: creating a loader must not draw from the global RNG (that would shift dropout).
    loader = DataLoader(
        view,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )
    was_training = model.training
    model.eval()
    outs = []
    for batch in tqdm(loader, desc="validate", leave=False, disable=not (progress and env.is_main)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outs.append(model(batch["image"].to(device, non_blocking=True)).float())
    model.train(was_training)
    n_labels = view.labels.shape[1]
    mine = torch.cat(outs) if outs else torch.zeros((0, n_labels), device=device)
    return gather_rows(mine, env).cpu()


def validation_metrics(
    logits: torch.Tensor, view: SeededView, names: list[str], criterion: MaskedLoss
) -> dict:
    """val_loss (criterion per observed label), mean AUROC and per-label AUROC (undefined -> None)."""
    y = view.labels
    targets = torch.from_numpy(np.nan_to_num(y, nan=0.0))
    mask = torch.from_numpy((~np.isnan(y)).astype(np.float32))
    pos_weight = None if criterion.pos_weight is None else criterion.pos_weight.cpu()
    on_cpu = MaskedLoss(criterion.kind, pos_weight, criterion.gamma)
    with torch.no_grad():
        loss = on_cpu(logits, targets, mask) / mask.sum().clamp_min(1)
    report = multilabel_report(y, torch.sigmoid(logits).numpy(), names, n_bootstrap=0, competition=None)
    metrics: dict[str, Any] = {"val_loss": float(loss), "mean_auroc": report["mean_auroc"]}
    metrics |= {f"auroc/{n}": e["auroc"] for n, e in report["labels"].items()}
    return metrics


def _improved(value: float | None, best: float | None, metric: str) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


def fit(
    model: nn.Module,
    data: TaskData,
    config: TrainConfig,
    save_best: SaveBest,
    *,
    env: DistEnv,
    device: torch.device,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    step_loss: StepLoss | None = None,
    validate: Validate | None = None,
) -> dict[str, Any]:
    """Train, validate each epoch, checkpoint; returns a summary (completed, cancelled or early_stopped).

    The default step is the labelled one (masked BCE/focal, validation AUROC). Another objective passes
    ``step_loss(forward, batch)``: this rank's loss of its share of the global batch (DDP averages the
    gradients over processes, so it should be a mean over an equal share), and ``validate(model)``.
    """
    out = Path(config.out)
    last_dir, best_dir = out / "last", out / "best"
    bf16 = use_bf16(config, device)

    # ---- batch geometry: a global batch is batch_size x processes; the last partial one is dropped
    n_train = len(data.train)
    per_rank = min(config.batch_size, n_train // env.world_size)
    if per_rank < 1:
        raise DataError(f"{n_train} training images are too few for {env.world_size} processes")
    global_batch = per_rank * env.world_size
    steps_per_epoch = n_train // global_batch
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    eval_batch = config.eval_batch_size or 2 * config.batch_size
    geometry = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}

    # ---- model, loss (pos_weight from the observed training labels), optimizer, schedule
    model.to(device)
    pos_weight = (
        pos_weight_from_labels(data.train.labels) if config.pos_weight and config.loss == "bce" else None
    )
    criterion = MaskedLoss(config.loss, pos_weight, config.focal_gamma).to(device)
    optimizer = make_optimizer(model, config, device)
    warmup = int(config.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup, total_steps, config.min_lr_ratio)
    )
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- resume from last/ (weights, optimizer, scheduler, RNG, counters)
    step, best, best_epoch, bad_epochs, history, stopped = 0, None, None, 0, [], False
    if config.resume and (last_dir / STATE_JSON).exists():
        state = load_training_state(last_dir, model, optimizer, scheduler)
        extra = state["extra"]
        if extra.get("geometry") != geometry:
            raise XrayfmError(
                f"cannot resume {last_dir}: it was trained with {extra.get('geometry')}, "
                f"this run has {geometry} "
                "(same data, batch size, processes and epochs are needed for an exact resume)"
            )
        step, best, best_epoch = state["step"], extra.get("best"), extra.get("best_epoch")
        bad_epochs, history, stopped = (
            extra.get("bad_epochs", 0),
            list(extra.get("history", [])),
            extra.get("stopped"),
        )
    resumed_from = step

    def save_state() -> None:
        if env.is_main:
            extra = {
                "geometry": geometry,
                "best": best,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "history": history,
                "stopped": stopped,
                "metric": config.metric,
            }
            save_training_state(
                last_dir, model, optimizer, scheduler, epoch=step // steps_per_epoch, step=step, extra=extra
            )
        barrier(env)

    # ---- the forward model: DDP across processes, optionally compiled
    forward = model
    if env.enabled:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        forward = torch.compile(forward)

    def report(epoch: int, loss_value: float | None) -> None:
        """Tell the caller (e.g. a worker updating its job) where training stands."""
        if progress is None or not env.is_main:
            return
        eta = (time.perf_counter() - started) / max(step - resumed_from, 1) * (total_steps - step)
        lr = scheduler.get_last_lr()[0]
        progress(
            {
                "epoch": epoch,
                "step": step,
                "total_steps": total_steps,
                "loss": loss_value,
                "lr": lr,
                "metrics": metrics,
                "eta_s": eta,
            }
        )

    log = RunLog(out, env.is_main, data.names, resume_step=resumed_from, tensorboard=config.tensorboard)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (config.progress_bar and env.is_main),
    )
    status = "early_stopped" if stopped else "completed"
    started, metrics = time.perf_counter(), (history[-1] if history else {})
    window_start, window_steps = time.perf_counter(), 0

    try:
        while step < total_steps and status == "completed":
            epoch = step // steps_per_epoch
            epoch_started = time.perf_counter()
            sampler = EpochBatches(
                n_train,
                per_rank,
                epoch,
                config.seed,
                env.rank,
                env.world_size,
                start_batch=step - epoch * steps_per_epoch,
                weights=data.draw_weights,
            )
            # Its own generator: the loader must not draw from the global RNG (dropout's), or a resumed
            # run would see another dropout stream than an uninterrupted one.
            loader = DataLoader(
                data.train,
                batch_sampler=sampler,
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(mix_seed(config.seed, epoch)),
            )
            forward.train()
            for batch in loader:
                if step >= total_steps:
                    break
                cancel = bool(should_cancel()) if (should_cancel is not None and env.is_main) else False
                if broadcast_flag(cancel, env, device):
                    status = "cancelled"
                    break

                if step_loss is None:
                    images = batch["image"].to(device, non_blocking=True)
                    targets = batch["labels"].to(device, non_blocking=True)
                    mask = batch["mask"].to(device, non_blocking=True)
                    observed = all_reduce_sum(mask.sum(), env).clamp_min(1.0)  # labels in the global batch
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = forward(images)
                    loss = criterion(logits, targets, mask) * env.world_size / observed
                else:
                    on_device = {
                        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                        for k, v in batch.items()
                    }
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = step_loss(forward, on_device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip else None
                )
                optimizer.step()
                scheduler.step()
                step += 1
                window_steps += 1
                bar.update(1)

                if step % config.log_every == 0 or step == total_steps:
                    loss_value = float(all_reduce_sum(loss.detach(), env)) / env.world_size
                    now = time.perf_counter()
                    row = {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_value,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "images_per_s": window_steps * global_batch / max(now - window_start, 1e-9),
                        "elapsed_s": now - started,
                    }
                    window_start, window_steps = now, 0
                    log.step(row)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{row['lr']:.2e}")
                    report(epoch, loss_value)
                if config.save_every and step % config.save_every == 0 and step % steps_per_epoch != 0:
                    save_state()

            if status == "cancelled":
                save_state()
                break

            # ---- end of epoch (or of the step budget): validate, keep the best, save the state
            if validate is None:
                logits = predict_logits(
                    model, data.val, eval_batch, env, device, bf16, config.num_workers, config.progress_bar
                )
                metrics = {
                    "epoch": epoch,
                    "step": step,
                    **validation_metrics(logits, data.val, data.names, criterion),
                }
            else:
                metrics = {"epoch": epoch, "step": step, **validate(model)}
            improved = _improved(metrics[config.metric], best, config.metric) or best_epoch is None
            if improved:
                best, best_epoch, bad_epochs = metrics[config.metric], epoch, 0
                if env.is_main:
                    save_best(model, best_dir, metrics)
                barrier(env)
            else:
                bad_epochs += 1
            history.append(metrics)
            log.epoch({**metrics, "improved": improved, "seconds": time.perf_counter() - epoch_started})
            report(epoch, None)
            if config.early_stopping and bad_epochs >= config.early_stopping and step < total_steps:
                status, stopped = "early_stopped", True
            save_state()
    finally:
        bar.close()
        log.close()

    seconds = time.perf_counter() - started
    summary = {
        "status": status,
        "step": step,
        **geometry,
        "world_size": env.world_size,
        "resumed_from_step": resumed_from,
        "metric": config.metric,
        "best_metric": best,
        "best_epoch": best_epoch,
        "history": history,
        "seconds": seconds,
        "images_per_s": (step - resumed_from) * global_batch / seconds if seconds > 0 else None,
        "rank_weight_max_diff": max_weight_difference(model, env),
        "best_dir": str(best_dir),
        "last_dir": str(last_dir),
    }
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


__all__ = [
    "StepLoss",
    "Validate",
    "WarmupCosine",
    "fit",
    "make_optimizer",
    "predict_logits",
    "use_bf16",
    "validation_metrics",
]
