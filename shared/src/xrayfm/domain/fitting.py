"""Fitting a version's domain gate from its own images: the model's features of its training images
(the reference), a patient-level share of its validation images for the threshold, and the rest of them
to measure the pass rate the gate then has on images it never saw (``validation_pass_rate``).

Used when a run publishes (``adapt``, ``pretrain``, ``tune``: :func:`fit_gate_for_run`) and by
``xrayfm gate fit`` for existing versions and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xrayfm.domain.checks import DeclaredDomain
from xrayfm.domain.features import capture_features
from xrayfm.domain.gate import DEFAULT_METHOD, DEFAULT_PASS_RATE, MIN_HELD_OUT, DomainGate
from xrayfm.errors import XrayfmError

log = logging.getLogger(__name__)
MAX_REFERENCE = 20_000  # training images a run's gate is fitted on at most (a seeded subsample beyond)


@torch.no_grad()
def features_and_probabilities(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    multiclass: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's features [N, D] and probabilities [N, L] for normalised image batches [B, C, S, S]."""
    was_training = model.training
    model.eval()
    feats, probs = [], []
    try:
        with capture_features(model) as record:
            for batch in tqdm(batches, total=total, disable=not progress, desc="features", unit="batch"):
                logits = model(batch.to(device)).float()
                feats.append(record.features.float().cpu().numpy())
                probs.append(
                    (torch.softmax(logits, 1) if multiclass else torch.sigmoid(logits)).cpu().numpy()
                )
    finally:
        model.train(was_training)
    if not feats:
        raise XrayfmError("no images to compute features of")
    return np.concatenate(feats), np.concatenate(probs)


def view_batches(view: Any, rows: Sequence[int], batch_size: int = 128) -> Iterable[torch.Tensor]:
    """Normalised image batches of a dataset view's items ``rows`` (each item a dict with "image")."""
    for start in range(0, len(rows), batch_size):
        yield torch.stack([view[int(i)]["image"] for i in rows[start : start + batch_size]])


def split_rows(groups: Sequence[Any], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices split by group (patient): (rows outside, rows in a seeded `fraction` of the groups)."""
    groups = np.asarray([str(g) for g in groups])
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(unique, max(1, round(fraction * len(unique))), replace=False).tolist())
    inside = np.array([g in chosen for g in groups])
    return np.flatnonzero(~inside), np.flatnonzero(inside)


def fit_gate_from_features(
    reference: np.ndarray,
    held_out: np.ndarray,
    held_out_groups: Sequence[Any],
    held_out_probabilities: np.ndarray | None = None,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    sources: dict[str, Any] | None = None,
    **fit_options: Any,
) -> DomainGate:
    """Fit on `reference` features; split the `held_out` ones by group (patient) into the threshold's set
    and a test share (`test_fraction` of the groups) whose pass rate is recorded as
    ``validation_pass_rate``. Options go to :meth:`DomainGate.fit` (method, pass_rate, domain, k)."""
    threshold_rows, test_rows = split_rows(held_out_groups, test_fraction, seed)
    if len(threshold_rows) < MIN_HELD_OUT or len(test_rows) == 0:
        threshold_rows, test_rows = np.arange(len(held_out)), np.array([], dtype=int)
    probs = None if held_out_probabilities is None else np.asarray(held_out_probabilities)[threshold_rows]
    gate = DomainGate.fit(
        reference, held_out[threshold_rows], held_out_probabilities=probs, sources=sources, seed=seed,
        **fit_options,
    )  # fmt: skip
    if len(test_rows):
        gate.facts["validation_pass_rate"] = round(gate.pass_rate_of(held_out[test_rows]), 4)
        gate.facts["validation_images"] = int(len(test_rows))
    return gate


def declared_domain(data_info: dict[str, Any]) -> DeclaredDomain:
    """A run's declared domain from its data description (``describe_views``): its training set, in words."""
    cache = data_info.get("train_cache") or {}
    kind, split = cache.get("kind") or "its", cache.get("split") or "training"
    images = (data_info.get("train") or {}).get("images")
    synthetic = " (SYNTHETIC phantoms)" if data_info.get("synthetic") else ""
    return DeclaredDomain(
        description=f"radiographs like its {images or ''} {kind} {split} images{synthetic}".replace(
            "  ", " "
        ),
        body_parts=("CHEST",) if kind in ("chexpert", "nih") else (),
    )


def save_run_gate(
    model: nn.Module, data: Any, best_dir: Any, *, device: Any, seed: int, progress: bool
) -> dict:
    """Fit the gate of a run's `best_dir` model on its task data (``TaskData``: training images through
    the evaluation transform, validation images for the threshold) and store it there; its facts."""
    from xrayfm.train.sampler import SeededView

    train = SeededView(
        data.train.base, data.val.transform, data.train.seed, data.train.rows, data.train.columns
    )
    if len(train) > MAX_REFERENCE:  # moments of 20,000 images are as good as of all of them
        rows = np.sort(np.random.default_rng(seed).choice(len(train), MAX_REFERENCE, replace=False))
        train = train.with_rows(train.rows[rows])
    domain = declared_domain(data.info | {"train": {"images": len(data.train)}})
    try:
        gate = fit_gate_for_run(
            model, train, data.val, device=device, domain=domain, seed=seed, progress=progress
        )
    except XrayfmError as exc:  # a toy run: published without a gate (input checks only), and it says so
        log.warning("no domain gate for %s: %s", best_dir, exc)
        return {"error": str(exc)}
    gate.save(best_dir)
    return {k: v for k, v in gate.describe().items() if k not in ("reference", "domain")}


def fit_gate_for_run(
    model: nn.Module,
    train_view: Any,
    val_view: Any,
    *,
    device: torch.device | str = "cpu",
    multiclass: bool = False,
    domain: DeclaredDomain | None = None,
    method: str = DEFAULT_METHOD,
    pass_rate: float = DEFAULT_PASS_RATE,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> DomainGate:
    """The gate of a trained run: fitted on the training view's images (give a view with the evaluation
    transform: no augmentation), its threshold on half of the validation view's patients, its
    ``validation_pass_rate`` measured on the other half."""

    def run(view: Any) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(view))
        return features_and_probabilities(
            model, view_batches(view, rows, batch_size), device, multiclass, progress,
            total=-(-len(rows) // batch_size),
        )  # fmt: skip

    def patients(view: Any) -> np.ndarray:
        csv = view.csv
        return (
            csv["patient_id"].astype(str).to_numpy()
            if "patient_id" in csv
            else np.arange(len(view)).astype(str)
        )

    reference, _ = run(train_view)
    held, held_p = run(val_view)
    groups = patients(val_view)
    sources = {"reference": f"the run's {len(reference)} training images",
               "threshold": "half of its validation patients; the other half measures the pass rate"}  # fmt: skip
    if (
        len(held) < 2 * MIN_HELD_OUT
    ):  # a small validation split: hold a share of the training patients out too
        outside, inside = split_rows(patients(train_view), 0.2, seed)
        if len(outside) < MIN_HELD_OUT:
            raise XrayfmError(
                f"too few images for a domain gate: {len(reference)} training and {len(held)} validation"
            )
        held = np.concatenate([held, reference[inside]])
        held_p = np.concatenate([held_p, np.full((len(inside), held_p.shape[1]), np.nan)])
        groups = np.concatenate([groups, np.array([f"train:{g}" for g in patients(train_view)[inside]])])
        reference = reference[outside]
        sources = {"reference": f"{len(reference)} of the run's training images (a small validation split)",
                   "threshold": f"half of the patients of its {len(val_view)} validation and {len(inside)} other "
                                "training images; the other half measures the pass rate"}  # fmt: skip
    return fit_gate_from_features(
        reference, held, groups, held_p, seed=seed, method=method, pass_rate=pass_rate, domain=domain,
        sources=sources,
    )  # fmt: skip


__all__ = [
    "declared_domain",
    "features_and_probabilities",
    "fit_gate_for_run",
    "fit_gate_from_features",
    "save_run_gate",
    "split_rows",
    "view_batches",
]
