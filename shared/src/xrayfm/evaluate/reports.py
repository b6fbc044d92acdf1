"""Evaluation reports: multi-label (CheXpert-style) and binary (MURA-style); JSON + Markdown + PNG output."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrayfm.data.labels import COMPETITION_TASKS
from xrayfm.errors import DataError, list_offenders
from xrayfm.evaluate.metrics import (
    auroc_with_ci,
    bootstrap_aurocs,
    check_binary,
    check_probabilities,
    expected_calibration_error,
    label_counts,
    point_auroc,
    summarise_bootstrap,
    threshold_metrics,
)
from xrayfm.evaluate.plots import plot_reliability, plot_roc
from xrayfm.utils import to_jsonable

UNDEFINED_TEXT = "undefined (single class)"


def _mean_with_ci(
    values: Mapping[str, dict], wanted: Sequence[str], boot: np.ndarray, names: Sequence[str], alpha: float
) -> tuple[float | None, dict[str, Any]]:
    """Mean AUROC over the `wanted` labels that are defined, with a joint-bootstrap CI."""
    excluded = {n: "not in names" for n in wanted if n not in values}
    excluded |= {n: values[n]["reason"] for n in wanted if n in values and values[n]["auroc"] is None}
    included = [n for n in wanted if n in values and n not in excluded]
    info: dict[str, Any] = {"included": included, "excluded": excluded}
    if not included:
        return None, {**info, "reason": "no label with both classes", "ci_low": None, "ci_high": None}
    mean = float(np.mean([values[n]["auroc"] for n in included]))
    cols = [list(names).index(n) for n in included]
    # A resample where any included label lacks a class gives NaN here, and is skipped (and counted).
    boot_mean = boot[:, cols].mean(axis=1) if boot.size else np.empty(0)
    return mean, {**info, **summarise_bootstrap(mean, boot_mean, alpha)}


def multilabel_report(
    y_true: Any,
    y_prob: Any,
    names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    competition: Sequence[str] | None = COMPETITION_TASKS,
    alpha: float = 0.05,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Per-label AUROC [CI], counts and ECE for labels [N, L] (NaN = masked) and probabilities [N, L].

    ``mean_auroc`` averages the labels with both classes; ``competition_mean_auroc`` averages the
    `competition` tasks that are present and defined (the ``*_info`` entries say which were included or
    excluded, and give the joint-bootstrap CI). ``calibration`` is the ECE pooled over all labelled entries.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    names = list(names)
    if y.ndim != 2 or p.shape != y.shape:
        raise DataError(f"labels and probabilities must both be [N, L]; got {y.shape} and {p.shape}")
    if y.shape[1] != len(names):
        raise DataError(f"{y.shape[1]} label columns but {len(names)} names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate label names: {list_offenders(dupes)}")
    for j in range(len(names)):
        check_binary(y[:, j], p[:, j])
    check_probabilities(p, where=~np.isnan(y))

    boot = bootstrap_aurocs(y, p, n_bootstrap, seed)
    labels: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        auc, reason = point_auroc(y[:, j], p[:, j])
        entry: dict[str, Any] = {"auroc": auc, **summarise_bootstrap(auc, boot[:, j], alpha)}
        if reason:
            entry["reason"] = reason
        entry |= label_counts(y[:, j])
        entry["ece"] = expected_calibration_error(y[:, j], p[:, j], n_bins)["ece"]
        labels[name] = entry

    mean, mean_info = _mean_with_ci(labels, names, boot, names, alpha)
    comp, comp_info = _mean_with_ci(labels, list(competition or []), boot, names, alpha)
    keep = ~np.isnan(y)
    return {
        "kind": "multilabel",
        "n": int(y.shape[0]),
        "names": names,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "alpha": alpha,
        "labels": labels,
        "mean_auroc": mean,
        "mean_auroc_info": mean_info,
        "competition_mean_auroc": comp,
        "competition_mean_auroc_info": comp_info,
        "calibration": expected_calibration_error(y[keep], p[keep], n_bins),
    }


def study_level(y_true: Any, y_prob: Any, study_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate images to studies: (sorted study ids, study labels, mean image probability).

    Every image of a study must carry the same label (a DataError names the studies that do not).
    """
    y, p = check_binary(y_true, y_prob, allow_masked=False)
    ids = np.asarray(study_ids)
    if ids.shape != y.shape:
        raise DataError(f"study_ids has shape {ids.shape}, labels {y.shape}")
    frame = pd.DataFrame({"study": ids, "y": y, "p": p}).groupby("study", sort=True)
    agg = frame.agg(y_min=("y", "min"), y_max=("y", "max"), p=("p", "mean"))
    mixed = agg.index[agg["y_min"] != agg["y_max"]]
    if len(mixed):
        raise DataError(f"{len(mixed)} studies mix labels across their images: {list_offenders(mixed)}")
    return agg.index.to_numpy(), agg["y_min"].to_numpy(), agg["p"].to_numpy()


def _level_section(y, p, threshold, n_bootstrap, seed, alpha, n_bins, clusters=None) -> dict[str, Any]:
    counts = label_counts(y)
    return {
        "auroc": auroc_with_ci(y, p, n_bootstrap, seed, alpha, clusters=clusters),
        "n": counts["n"],
        "positives": counts["positives"],
        "negatives": counts["negatives"],
        **threshold_metrics(y, p, threshold),
        "calibration": expected_calibration_error(y, p, n_bins),
    }


def _binary_sections(y, p, study_ids, threshold, n_bootstrap, seed, alpha, n_bins) -> dict[str, Any]:
    args = (threshold, n_bootstrap, seed, alpha, n_bins)
    out = {"image": _level_section(y, p, *args, clusters=study_ids)}
    if study_ids is not None:
        _, ys, ps = study_level(y, p, study_ids)
        out["study"] = _level_section(ys, ps, *args)
    return out


def binary_report(
    y_true: Any,
    y_prob: Any,
    study_ids: Any = None,
    groups: Any = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Binary report at image level and, given ``study_ids``, at study level (study prob = mean image prob).

    Each level has AUROC [CI], Cohen's kappa, sensitivity, specificity, accuracy (``prob >= threshold``)
    and calibration. ``overall`` covers all images; ``groups`` (e.g. body part per image) splits them.
    Image-level CIs resample whole studies when study ids are given (images of a study are correlated).
    """
    y, p = check_binary(y_true, y_prob, allow_masked=False)
    check_probabilities(p)
    ids = None if study_ids is None else np.asarray(study_ids)
    if ids is not None and ids.shape != y.shape:
        raise DataError(f"study_ids has shape {ids.shape}, labels {y.shape}")
    grp = None if groups is None else np.asarray(groups).astype(str)
    if grp is not None and grp.shape != y.shape:
        raise DataError(f"groups has shape {grp.shape}, labels {y.shape}")
    if grp is not None and ids is not None:
        spread = pd.Series(grp).groupby(ids).nunique()
        split = spread.index[spread > 1]
        if len(split):
            raise DataError(f"{len(split)} studies span several groups: {list_offenders(split)}")
    args = (threshold, n_bootstrap, seed, alpha, n_bins)
    report: dict[str, Any] = {
        "kind": "binary",
        "n_images": int(len(y)),
        "n_studies": None if ids is None else int(len(np.unique(ids))),
        "threshold": threshold,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "alpha": alpha,
        "overall": _binary_sections(y, p, ids, *args),
        "groups": {},
    }
    if grp is not None:
        for g in np.unique(grp):
            m = grp == g
            report["groups"][str(g)] = _binary_sections(y[m], p[m], None if ids is None else ids[m], *args)
    return report


# ---------------------------------------------------------------------------------------------- writing


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _fmt_auroc(entry: Mapping[str, Any], value_key: str = "auroc") -> str:
    value = entry.get(value_key)
    if value is None:
        reason = entry.get("reason", "undefined")
        return UNDEFINED_TEXT if reason == "single class" else f"undefined ({reason})"
    if entry.get("ci_low") is None:
        return f"{value:.3f} (no CI)"
    return f"{value:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _multilabel_markdown(report: Mapping[str, Any], ci_pct: int) -> list[str]:
    lines = [
        f"| Label | AUROC [{ci_pct}% CI] | n | Positives | Negatives | Masked |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in report["labels"].items():
        cells = [name, _fmt_auroc(e), e["n"], e["positives"], e["negatives"], e["masked"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for title, key in (("Mean AUROC", "mean_auroc"), ("Competition mean AUROC", "competition_mean_auroc")):
        info = report[f"{key}_info"]
        entry = {"auroc": report[key], **info}
        lines.append(f"| **{title}** ({len(info['included'])} labels) | {_fmt_auroc(entry)} | | | | |")
    lines.append("")
    for title, key in (("Mean AUROC", "mean_auroc"), ("Competition mean AUROC", "competition_mean_auroc")):
        excluded = report[f"{key}_info"]["excluded"]
        if excluded:
            listed = "; ".join(f"{n} ({why})" for n, why in excluded.items())
            lines.append(f"- {title} excludes: {listed}")
    ece = report.get("calibration", {}).get("ece")
    lines.append(f"- ECE (pooled over labelled entries): {_fmt(ece)}")
    return lines


def _binary_markdown(report: Mapping[str, Any], ci_pct: int) -> list[str]:
    columns = ["Group", "Level", f"AUROC [{ci_pct}% CI]", "Kappa", "Sensitivity", "Specificity", "Accuracy"]
    columns += ["ECE", "n", "Positives"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    sections = [("overall", report["overall"]), *report.get("groups", {}).items()]
    for group, levels in sections:
        for level, s in levels.items():
            cells = [group, level, _fmt_auroc(s["auroc"]), _fmt(s["kappa"]), _fmt(s["sensitivity"])]
            cells += [_fmt(s["specificity"]), _fmt(s["accuracy"]), _fmt(s["calibration"]["ece"])]
            cells += [s["n"], s["positives"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        f"Thresholded metrics use probability >= {report['threshold']}.",
        "Study probability = mean of its images' probabilities.",
    ]
    return lines


def report_markdown(report: Mapping[str, Any], title: str) -> str:
    """A readable Markdown summary of a multilabel or binary report."""
    ci_pct = round(100 * (1 - report.get("alpha", 0.05)))
    lines = [f"# {title}", ""]
    if report.get("kind") == "multilabel":
        lines += [f"{report['n']} images, {report['n_bootstrap']} bootstrap resamples.", ""]
        lines += _multilabel_markdown(report, ci_pct)
    elif report.get("kind") == "binary":
        lines += [f"{report['n_images']} images, {report['n_bootstrap']} bootstrap resamples.", ""]
        lines += _binary_markdown(report, ci_pct)
    else:
        lines += ["```json", json.dumps(to_jsonable(report), indent=2, allow_nan=False), "```"]
    lines += _operating_points_markdown(report.get("operating_points") or {}, ci_pct)
    return "\n".join(lines) + "\n"


def _operating_points_markdown(points: Mapping[str, Mapping[str, list]], ci_pct: int) -> list[str]:
    """A table of the candidate thresholds (see :func:`xrayfm.evaluate.metrics.operating_points`)."""
    rows = [
        f"| {name} | {level} | {o['rule']} | {o['threshold']:.3f} | {_fmt_ratio(o, 'sensitivity')} "
        f"| {_fmt_ratio(o, 'specificity')} |"
        for name, levels in points.items()
        for level, options in levels.items()
        for o in options
    ]
    if not rows:
        return []
    return [
        "",
        "## Operating points",
        "",
        f"Candidate thresholds ({ci_pct}% bootstrap CIs), chosen on this split: optimistic here, confirm them on "
        "data of their own. A model version can carry one (`POST /models/{name}/{version}/operating-point`).",
        "",
        "| label | level | rule | threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _fmt_ratio(point: Mapping[str, Any], key: str) -> str:
    ci = point.get(f"{key}_ci")
    return f"{point[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _calibrations(report: Mapping[str, Any]) -> dict[str, dict]:
    if report.get("kind") == "multilabel":
        return {"all labels": report["calibration"]}
    if report.get("kind") == "binary":
        return {level: s["calibration"] for level, s in report["overall"].items()}
    return {}


def write_report(
    report: Mapping[str, Any], out_dir: str | Path, title: str, curves: Mapping[str, dict] | None = None
) -> dict[str, Path]:
    """Write report.json (strict JSON), report.md, roc_curves.png (when `curves` are given, see
    :func:`xrayfm.evaluate.metrics.roc_curves`) and reliability.png; return {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(report_markdown(report, title))
    if curves is not None:
        paths["roc"] = plot_roc(curves, out / "roc_curves.png", title=title)
    calibrations = {k: v for k, v in _calibrations(report).items() if v.get("ece") is not None}
    if calibrations:
        paths["reliability"] = plot_reliability(calibrations, out / "reliability.png", title=title)
    return paths
