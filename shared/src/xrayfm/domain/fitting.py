"""Fitting a version's domain gate from its own images: the model's features of its training images
(the reference), a patient-level share of its validation images for the threshold, and the rest of them
to measure the pass rate the gate then has on images it never saw (``validation_pass_rate``).

Used when a run publishes (``adapt``, ``pretrain``, ``tune``: :func:`fit_gate_for_run`) and by
``xrayfm gate fit`` for existing versions and checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xrayfm.domain.checks import DeclaredDomain
from xrayfm.domain.features import capture_features
from xrayfm.domain.gate import DEFAULT_METHOD, DEFAULT_PASS_RATE, DomainGate
from xrayfm.errors import XrayfmError


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
    if len(threshold_rows) < 20 or len(test_rows) == 0:
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

    csv = val_view.csv
    patients = csv["patient_id"].to_numpy() if "patient_id" in csv else np.arange(len(val_view))
    reference, _ = run(train_view)
    held, held_p = run(val_view)
    return fit_gate_from_features(
        reference, held, patients, held_p, seed=seed, method=method, pass_rate=pass_rate, domain=domain,
        sources={"reference": f"the run's {len(reference)} training images",
                 "threshold": "half of its validation patients; the other half measures the pass rate"},
    )  # fmt: skip


__all__ = [
    "features_and_probabilities",
    "fit_gate_for_run",
    "fit_gate_from_features",
    "split_rows",
    "view_batches",
]
