"""Evaluate a model on a dataset split: predictions, a study-level or multi-label report, ROC figures.

Binary tasks (one label, e.g. MURA "Abnormal") get :func:`~xrayfm.evaluate.binary_report` at image and
study level (study probability = mean of its images', as in the MURA paper), per body part when known,
with calibration (ECE). Multi-label tasks get :func:`~xrayfm.evaluate.multilabel_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from xrayfm.data.transforms import build_transform
from xrayfm.evaluate import binary_report, multilabel_report, roc_curves, study_level, write_report
from xrayfm.evaluate.metrics import operating_points
from xrayfm.train.artifacts import load_any
from xrayfm.train.config import EvaluateConfig, TrainConfig
from xrayfm.train.data import ensure_cache, is_synthetic, label_columns, open_cache
from xrayfm.train.distributed import DistEnv, setup, teardown
from xrayfm.train.loop import predict_logits, use_bf16
from xrayfm.train.sampler import SeededView


def headline(report: dict[str, Any]) -> tuple[str, float | None]:
    """The one number a report is summarised by: study AUROC (binary with studies), else mean AUROC."""
    if report.get("kind") == "binary":
        level = "study" if "study" in report["overall"] else "image"
        return f"{level}_auroc", report["overall"][level]["auroc"]["auroc"]
    return "mean_auroc", report.get("mean_auroc")


def report_for(
    y: np.ndarray, probs: np.ndarray, names: list[str], table: pd.DataFrame, n_bootstrap: int, seed: int
) -> tuple[dict[str, Any], dict[str, dict]]:
    """The report and ROC curves for labels ``y`` [N, L] (NaN = masked) and probabilities [N, L].

    The report's ``operating_points`` hold candidate thresholds per label (:func:`operating_points`) for
    image-level decisions (what /predict answers), and for studies when the rows have study ids."""
    studies = table["study_id"].astype(str).to_numpy() if "study_id" in table else None
    points = {
        name: {
            "image": operating_points(
                y[:, j], probs[:, j], n_bootstrap=n_bootstrap, seed=seed, clusters=studies
            )
        }
        for j, name in enumerate(names)
    }
    if len(names) == 1 and not np.isnan(y).any():
        groups = table["body_part"].astype(str).to_numpy() if "body_part" in table else None
        report = binary_report(
            y[:, 0], probs[:, 0], study_ids=studies, groups=groups, n_bootstrap=n_bootstrap, seed=seed
        )
        curves = roc_curves(y[:, 0], probs[:, 0], ["image"])
        if studies is not None:
            _, ys, ps = study_level(y[:, 0], probs[:, 0], studies)
            curves |= roc_curves(ys, ps, ["study"])
            points[names[0]]["study"] = operating_points(ys, ps, n_bootstrap=n_bootstrap, seed=seed)
        return {**report, "operating_points": points}, curves
    report = multilabel_report(y, probs, names, n_bootstrap=n_bootstrap, seed=seed)
    return {**report, "operating_points": points}, roc_curves(y, probs, names)


def evaluate_view(
    model: nn.Module,
    view: SeededView,
    names: list[str],
    out: str | Path,
    *,
    title: str,
    env: DistEnv,
    device: torch.device,
    bf16: bool = False,
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict ``view`` (all ranks); rank 0 writes report.json/.md, ROC/reliability PNGs, predictions.csv."""
    model.to(device)
    logits = predict_logits(model, view, batch_size, env, device, bf16, num_workers, progress)
    probs = torch.sigmoid(logits).numpy().astype(np.float64)
    if not env.is_main:
        return {}
    table = view.csv
    report, curves = report_for(view.labels.astype(np.float64), probs, names, table, n_bootstrap, seed)
    report["source"] = source or {}
    out = Path(out)
    paths = write_report(report, out, title, curves)
    predictions = pd.DataFrame(
        {c: table[c] for c in ("path", "patient_id", "study_id", "body_part") if c in table}
    )
    for j, name in enumerate(names):
        predictions[f"label/{name}"] = view.labels[:, j]
        predictions[f"prob/{name}"] = probs[:, j]
    predictions.to_csv(out / "predictions.csv", index=False)
    metric, value = headline(report)
    return {
        "report_dir": str(out),
        "files": {k: str(v) for k, v in paths.items()},
        "metric": metric,
        "value": value,
        "report": report,
    }


def evaluate(
    checkpoint: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    root: str | None = None,
    split: str = "valid",
    cache: str | None = None,
    body_parts: list[str] | None = None,
    frontal_only: bool = False,
    policy: str | None = None,
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    seed: int = 0,
    device: str = "auto",
    verify: str = "stat",
    num_workers: int = 0,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint (full or adapted) on a dataset split or a prepared cache; returns the summary.

    Images are prepared as the checkpoint's metadata says (size, resize mode, normalisation); a raw dataset
    is cached under ``OUT/cache/SPLIT`` first (rebuilt when the images or settings changed: it is the
    report's own), or in ``cache`` when that is given too. The dataset must have every label the model
    predicts, matched ignoring case (a folder class ``pneumonia`` serves a model's ``Pneumonia``); this is
    checked before any image is cached.
    """
    env, dev = setup(device)
    try:
        model, meta = load_any(checkpoint, "cpu")
        prep = meta["preprocessing"]
        settings = TrainConfig(
            out=str(out),
            kind=kind,
            root=root,
            split=split,
            cache=cache,
            size=int(prep["size"]),
            resize_mode=prep.get("mode", "pad"),
            policy=policy or prep.get("policy"),
            body_parts=body_parts,
            frontal_only=frontal_only,
            verify=verify,
            progress_bar=progress_bar,
            channels=int(prep["channels"]),
        )
        settings.validate()
        names = list(meta["labels"])
        cache_dir = ensure_cache(
            settings,
            split,
            cache,
            env,
            check=lambda dataset: label_columns(list(dataset.pathologies), names),
            replace=cache is None,
        )
        base = open_cache(cache_dir, settings)
        columns = label_columns(list(base.pathologies), names)
        transform = build_transform(
            False, int(prep["size"]), prep["mean"], prep["std"], int(prep["channels"])
        )
        view = SeededView(base, transform, seed, None, columns)
        source = {"checkpoint": str(Path(checkpoint).resolve()), "cache": str(base.cache_dir), "split": split,
                  "synthetic": is_synthetic(base.manifest)}  # fmt: skip
        title = f"Evaluation of {Path(checkpoint).name} on {base.manifest.get('kind')} {split}"
        if is_synthetic(base.manifest):
            title += " (SYNTHETIC data)"
        return evaluate_view(
            model,
            view,
            names,
            out,
            title=title,
            env=env,
            device=dev,
            bf16=use_bf16(settings, dev),
            batch_size=batch_size,
            n_bootstrap=n_bootstrap,
            seed=seed,
            num_workers=num_workers,
            progress=progress_bar,
            source=source,
        )
    finally:
        teardown()


def evaluate_config(config: EvaluateConfig, out: str | Path) -> dict[str, Any]:
    """:func:`evaluate` with the settings of an :class:`EvaluateConfig` (the CLI's and a job's)."""
    settings = config.to_dict()
    return evaluate(settings.pop("model"), out, **settings)


__all__ = ["evaluate", "evaluate_config", "evaluate_view", "headline", "report_for"]
