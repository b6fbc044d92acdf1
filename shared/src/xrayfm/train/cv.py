"""k-fold cross-validation of an adaptation: one adapt run per fold, grouped by patient, pooled out-of-fold.

The training split is cut into K folds with every patient wholly in one fold (stratified by the label when
the task has one binary label; see :func:`xrayfm.data.splits.kfold_by_patient`). Fold k trains on the
other K-1 folds and is validated and reported on fold k, so every training image gets exactly one
out-of-fold prediction. Folds report their *last* weights by default (no checkpoint is picked on the
fold that is reported). Finished folds (with a report) are reused, so an interrupted run continues.

Outputs under ``OUT``: ``folds/fold-K/`` (each fold's adapt run), ``folds.csv`` (one row per fold),
``oof_predictions.csv`` (every training image once, with its fold), ``oof_report/`` (the report of the
pooled predictions), ``cv.json``, ``summary.md`` and ``cv.png``.

The pooled AUROC is computed over the predictions of K different models; it is the usual summary, but
folds' scores need not be calibrated alike, so the mean ± sd of the per-fold metric is reported beside it.
Its bootstrap CI resamples whole patients (a patient's studies and images are correlated).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.evaluate import plot_cv, study_level, write_report
from xrayfm.evaluate.metrics import auroc_with_ci, bootstrap_aurocs, point_auroc, summarise_bootstrap
from xrayfm.train.adaptation import adapt
from xrayfm.train.config import CVConfig
from xrayfm.train.evaluation import headline, report_for
from xrayfm.utils import atomic_write_json, to_jsonable


def fold_dir(out: Path, fold: int) -> Path:
    """The adapt run folder of one fold."""
    return out / "folds" / f"fold-{fold}"


def _fold_row(run: Path, fold: int) -> dict[str, Any]:
    report = json.loads((run / "report" / "report.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "best" / "meta.json").read_text())
    name, value = headline(report)
    data = meta["data"]
    return {
        "fold": fold,
        "metric": value,
        "metric_name": name,
        "train_images": data["train"]["images"],
        "train_patients": data["train"]["patients"],
        "val_images": data["val"]["images"],
        "val_patients": data["val"]["patients"],
        "val_studies": data["val"]["studies"],
        "stratified": data.get("stratified"),
        "steps": summary["step"],
        "seconds": summary["seconds"],
        "synthetic": bool(data.get("synthetic")),
        "run": str(run),
    }


def pooled_auroc(
    predictions: pd.DataFrame, names: list[str], n_bootstrap: int, seed: int, alpha: float = 0.05
) -> dict[str, Any]:
    """AUROC of pooled predictions with a bootstrap CI that resamples whole patients.

    One binary label without masked entries: at study level when studies are known (study probability =
    mean of its images', as the MURA paper and :func:`~xrayfm.evaluate.study_level` do), else per image.
    Several labels: the mean of the per-label AUROCs (labels with both classes), per image.
    """
    y = predictions[[f"label/{n}" for n in names]].to_numpy(np.float64)
    p = predictions[[f"prob/{n}" for n in names]].to_numpy(np.float64)
    patients = predictions["patient_id"].astype(str).to_numpy() if "patient_id" in predictions else None
    if len(names) == 1 and not np.isnan(y).any():
        if "study_id" in predictions:
            studies = predictions["study_id"].astype(str).to_numpy()
            ids, ys, ps = study_level(y[:, 0], p[:, 0], studies)
            if patients is not None:
                patient_of = dict(zip(studies, patients, strict=True))
                patients = np.array([patient_of[s] for s in ids])
            level, n = "study", len(ids)
        else:
            ys, ps, level, n = y[:, 0], p[:, 0], "image", len(y)
        result = auroc_with_ci(ys, ps, n_bootstrap, seed, alpha, clusters=patients)
        return {"metric": f"{level}_auroc", "value": result["auroc"], **result, "level": level, "n_units": n}
    boot = bootstrap_aurocs(y, p, n_bootstrap, seed, clusters=patients)
    points = [point_auroc(y[:, j], p[:, j])[0] for j in range(len(names))]
    defined = [j for j, a in enumerate(points) if a is not None]
    if not defined:
        return {"metric": "mean_auroc", "value": None, "reason": "no label with both classes"}
    value = float(np.mean([points[j] for j in defined]))
    ci = summarise_bootstrap(value, boot[:, defined].mean(axis=1) if boot.size else np.empty(0), alpha)
    return {
        "metric": "mean_auroc",
        "value": value,
        "auroc": value,
        **ci,
        "labels": {names[j]: points[j] for j in range(len(names))},
        "level": "image",
        "n_units": len(y),
        "alpha": alpha,
    }


def cross_validate(
    config: CVConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every fold's adaptation under ``config.out``; pool the out-of-fold predictions.

    ``progress`` gets ``{"done", "total", "last", "trained"}`` after each fold; ``should_cancel`` is
    passed to each fold's adapt (a cancelled fold keeps its resumable state and raises XrayfmError).
    """
    config.validate()
    out = Path(config.out)
    folds = int(config.folds)
    base = config.adapt_config()
    # One training cache for every fold (prepared by the first fold that needs it).
    shared = {"cache": config.cache or str(out / "cache" / config.split), "resume": True}
    started = time.perf_counter()
    rows, trained = [], []
    for k in range(folds):
        run = fold_dir(out, k)
        if not (run / "report" / "report.json").exists():
            settings = dataclasses.replace(base, **shared, out=str(run), fold=k)
            result = adapt(settings, should_cancel=should_cancel)
            if result["status"] == "cancelled":
                raise XrayfmError(f"fold {k} ({run}) was cancelled")
            trained.append(k)
        rows.append(_fold_row(run, k))
        if progress is not None:
            progress({"done": k + 1, "total": folds, "last": rows[-1], "trained": k in trained})

    predictions = _pooled_predictions(out, folds)
    names = [c.removeprefix("label/") for c in predictions.columns if c.startswith("label/")]
    pooled = pooled_auroc(predictions, names, config.n_bootstrap, config.seed)
    values = np.array([r["metric"] for r in rows if r["metric"] is not None], dtype=float)
    result = {
        "command": "cv",
        "out": str(out),
        "folds": folds,
        "method": config.method,
        "foundation": config.foundation,
        "split_seed": config.split_seed,
        "stratified": rows[0]["stratified"],
        "report_on": config.report_on,
        "metric_name": rows[0]["metric_name"],
        "fold_mean": float(values.mean()) if values.size else None,
        "fold_sd": float(values.std(ddof=1)) if values.size > 1 else None,
        "n_folds_defined": int(values.size),
        "pooled": pooled,
        "synthetic": any(r["synthetic"] for r in rows),
        "trained_folds": trained,
        "reused_folds": [k for k in range(folds) if k not in trained],
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    result["files"] = _write_outputs(result, predictions, names, config, out)
    return result


def _pooled_predictions(out: Path, folds: int) -> pd.DataFrame:
    """Every fold's held-out predictions, with its fold; each image must appear exactly once."""
    parts = []
    for k in range(folds):
        part = pd.read_csv(fold_dir(out, k) / "report" / "predictions.csv")
        parts.append(part.assign(fold=k))
    pooled = pd.concat(parts, ignore_index=True)
    repeated = pooled["path"][pooled["path"].duplicated()].unique()
    if len(repeated):
        raise XrayfmError(f"{len(repeated)} images are in several folds: {list_offenders(repeated)}")
    if "patient_id" in pooled:
        spread = pooled.groupby(pooled["patient_id"].astype(str))["fold"].nunique()
        if (spread > 1).any():
            raise XrayfmError(f"patients in several folds: {list_offenders(spread.index[spread > 1])}")
    return pooled


def _write_outputs(
    result: dict[str, Any], predictions: pd.DataFrame, names: list[str], config: CVConfig, out: Path
) -> dict[str, str]:
    rows, pooled = result["rows"], result["pooled"]
    pd.DataFrame(rows).to_csv(out / "folds.csv", index=False)
    predictions.to_csv(out / "oof_predictions.csv", index=False)
    y = predictions[[f"label/{n}" for n in names]].to_numpy(np.float64)
    p = predictions[[f"prob/{n}" for n in names]].to_numpy(np.float64)
    report, curves = report_for(y, p, names, predictions, config.n_bootstrap, config.seed)
    report["source"] = {"cv": str(out), "folds": result["folds"], "pooled": "out-of-fold predictions"}
    title = f"Pooled out-of-fold predictions, {result['folds']}-fold CV ({config.method})"
    if result["synthetic"]:
        title += " (SYNTHETIC data)"
    write_report(report, out / "oof_report", title, curves)
    plot = plot_cv(
        [r["metric"] for r in rows],
        pooled,
        out / "cv.png",
        ylabel=result["metric_name"],
        title=f"{result['folds']}-fold CV, {config.method}",
    )
    files = {
        "json": str(out / "cv.json"),
        "folds": str(out / "folds.csv"),
        "oof_predictions": str(out / "oof_predictions.csv"),
        "oof_report": str(out / "oof_report" / "report.md"),
        "markdown": str(out / "summary.md"),
        "plot": str(plot),
    }
    (out / "summary.md").write_text(_markdown(result, config))
    atomic_write_json(out / "cv.json", to_jsonable({**result, "files": files}))
    return files


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _markdown(result: dict[str, Any], config: CVConfig) -> str:
    pooled, name = result["pooled"], result["metric_name"]
    ci = (
        f" [{_fmt(pooled.get('ci_low'))}, {_fmt(pooled.get('ci_high'))}]"
        if pooled.get("ci_low") is not None
        else " (no CI)"
    )
    sd = _fmt(result["fold_sd"])
    lines = [
        f"# {result['folds']}-fold cross-validation ({config.method})",
        "",
        f"Foundation `{config.foundation}`, split `{config.split}`; folds grouped by patient"
        f"{', stratified by the label' if result['stratified'] else ''} (seed {result['split_seed']}). "
        f"Each fold reports its {config.report_on} weights on its held-out fold.",
        "",
        "| Fold | " + name + " | Train images | Held-out images | Held-out patients | Steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [r["fold"], _fmt(r["metric"]), r["train_images"], r["val_images"], r["val_patients"]]
        lines.append("| " + " | ".join(str(c) for c in [*cells, r["steps"]]) + " |")
    lines += [
        "",
        f"- per-fold {name}: mean {_fmt(result['fold_mean'])} ± sd {sd} "
        f"({result['n_folds_defined']} of {result['folds']} folds defined)",
        f"- pooled out-of-fold {pooled['metric']}: {_fmt(pooled.get('value'))}{ci} "
        f"({round(100 * (1 - pooled.get('alpha', 0.05)))}% CI, {config.n_bootstrap} bootstrap resamples of "
        "patients)",
    ]
    if result["synthetic"]:
        lines += ["", "**The data are SYNTHETIC phantoms, not medical images.**"]
    return "\n".join(lines) + "\n"


__all__ = ["cross_validate", "fold_dir", "pooled_auroc"]
