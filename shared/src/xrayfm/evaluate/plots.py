"""Figures for evaluation reports: ROC curves, reliability diagrams, label-efficiency curves.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot global state), so plotting is
safe in worker processes and threads without a display.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xrayfm.errors import DataError, list_offenders


def _new_figure(width: float = 6.5, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_roc(curves: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "ROC curves") -> Path:
    """Overlay ROC curves ({name: {"fpr", "tpr", "auroc"}}) on one panel with the chance diagonal."""
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    # Up to 20 distinct colours (the default cycle repeats after 10, and CheXpert has 14 labels).
    colours = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"].colors
    for i, (name, c) in enumerate(curves.items()):
        auc = c.get("auroc")
        label = f"{name} ({auc:.3f})" if auc is not None else name
        ax.plot(c["fpr"], c["tpr"], lw=1.5, label=label, color=colours[i % len(colours)])
    if not curves:
        ax.text(0.5, 0.5, "no label with both classes", ha="center", va="center")
    ax.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate", title=title
    )
    ax.set_aspect("equal")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="AUROC")
    return _save(fig, path)


def plot_reliability(
    ece_dict: Mapping[str, Any], path: str | Path, title: str = "Reliability diagram"
) -> Path:
    """Reliability diagram of one ECE result (see ``expected_calibration_error``) or of {name: result}."""
    results = {"": ece_dict} if "bins" in ece_dict else dict(ece_dict)
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, res in results.items():
        pts = [(b["mean_confidence"], b["accuracy"]) for b in res["bins"] if b["count"]]
        if not pts:
            continue
        conf, acc = zip(*pts, strict=True)
        ece = res.get("ece")
        label = f"{name} ECE={ece:.3f}".strip() if ece is not None else name or "observed"
        ax.plot(conf, acc, marker="o", lw=1.5, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Mean predicted probability", ylabel="Observed positive fraction")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def summarise_label_efficiency(table: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (ddof=1; 0 for one seed) of `metric` across seeds per (method, fraction).

    Rows need ``method``, ``fraction`` (in (0, 1]), ``seed`` and ``metric``; rows whose metric is None
    (undefined) are left out with a warning and counted in ``n_undefined``.
    """
    required = ("method", "fraction", "seed", "metric")
    missing = [i for i, row in enumerate(table) if any(k not in row for k in required)]
    if missing:
        raise DataError(f"rows lack one of {', '.join(required)}: row indices {list_offenders(missing)}")
    bad = [i for i, row in enumerate(table) if not 0 < float(row["fraction"]) <= 1]
    if bad:
        raise DataError(f"label fractions must be in (0, 1]; bad rows {list_offenders(bad)}")
    cells: dict[tuple[str, float], list] = {}
    for row in table:
        cells.setdefault((str(row["method"]), float(row["fraction"])), []).append(row["metric"])
    out = []
    for (method, fraction), values in sorted(cells.items()):
        defined = np.array([v for v in values if v is not None], dtype=float)
        undefined = len(values) - len(defined)
        if undefined:
            warnings.warn(
                f"{method} at fraction {fraction}: {undefined} undefined metric(s) left out", stacklevel=2
            )
        if not defined.size:
            continue
        std = float(defined.std(ddof=1)) if defined.size > 1 else 0.0
        out.append(
            {
                "method": method,
                "fraction": fraction,
                "mean": float(defined.mean()),
                "std": std,
                "n_seeds": int(defined.size),
                "n_undefined": undefined,
            }
        )
    return out


def plot_label_efficiency(
    table: Sequence[Mapping[str, Any]],
    path: str | Path,
    ylabel: str = "Mean AUROC",
    title: str = "Label efficiency",
) -> Path:
    """Mean ± std across seeds of the metric per method against the label fraction (log x-axis)."""
    summary = summarise_label_efficiency(table)
    fig = _new_figure()
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in summary):
        rows = [r for r in summary if r["method"] == method]
        x = np.array([r["fraction"] for r in rows])
        mean = np.array([r["mean"] for r in rows])
        std = np.array([r["std"] for r in rows])
        (line,) = ax.plot(x, mean, marker="o", label=method)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set(xlabel="Fraction of labels used", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    if summary:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cv(
    fold_values: Sequence[float | None],
    pooled: Mapping[str, Any],
    path: str | Path,
    ylabel: str = "AUROC",
    title: str = "Cross-validation",
) -> Path:
    """Per-fold metric (bars; undefined folds empty), their mean ± sd, and the pooled value with its CI."""
    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(fold_values))
    heights = [np.nan if v is None else v for v in fold_values]
    ax.bar(x, heights, color="#4c72b0", alpha=0.8, label="fold")
    defined = np.array([v for v in fold_values if v is not None], dtype=float)
    if defined.size:
        mean, sd = defined.mean(), defined.std(ddof=1) if defined.size > 1 else 0.0
        ax.axhline(mean, color="black", lw=1.2, label=f"mean {mean:.3f} ± sd {sd:.3f}")
        ax.axhspan(mean - sd, mean + sd, color="black", alpha=0.08)
    value = pooled.get("value")
    if value is not None:
        low, high = pooled.get("ci_low"), pooled.get("ci_high")
        err = None if low is None else [[value - low], [high - value]]
        ci = "" if low is None else f" [{low:.3f}, {high:.3f}]"
        ax.errorbar(
            [len(fold_values)], [value], yerr=err, fmt="D", color="#c44e52", capsize=4,
            label=f"pooled out-of-fold {value:.3f}{ci}",
        )  # fmt: skip
    ax.set_xticks([*x, len(fold_values)], [*(str(i) for i in x), "pooled"])
    ax.set(xlabel="Fold", ylabel=ylabel, title=title, ylim=(0, 1.05) if "auroc" in ylabel else None)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_optimization_history(
    trials: Sequence[Mapping[str, Any]], path: str | Path, ylabel: str = "objective", maximize: bool = True
) -> Path:
    """Objective per trial (``number``, ``state``, ``value``, ``last_intermediate``) and the best so far.

    Complete trials are dots joined by the running best; pruned trials are crosses at the last value they
    reported; failed trials are left out.
    """
    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    done = [(t["number"], t["value"]) for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    done = [(n, v) for n, v in done if np.isfinite(v)]
    pruned = [(t["number"], t["last_intermediate"]) for t in trials if t["state"] == "PRUNED"]
    pruned = [(n, v) for n, v in pruned if v is not None]
    if done:
        x, y = zip(*done, strict=True)
        ax.scatter(x, y, color="#4c72b0", label="complete", zorder=3)
        running = np.maximum.accumulate(y) if maximize else np.minimum.accumulate(y)
        ax.step(x, running, where="post", color="#c44e52", label="best so far")
    if pruned:
        x, y = zip(*pruned, strict=True)
        ax.scatter(x, y, marker="x", color="grey", label="pruned (last reported)", zorder=3)
    if not done and not pruned:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="Trial", ylabel=ylabel, title="Optimization history")
    ax.grid(True, alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_param_importances(
    importances: Mapping[str, float], path: str | Path, note: str | None = None
) -> Path:
    """Horizontal bars of parameter importances (largest on top); ``note`` says why there are none."""
    fig = _new_figure(6.0, 0.5 * max(len(importances), 3) + 1.5)
    ax = fig.add_subplot()
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="#4c72b0")
        ax.set(xlim=(0, max(1.0, *importances.values())), xlabel="Importance (fANOVA, sums to 1)")
    else:
        ax.text(
            0.5, 0.5, note or "no importances", ha="center", va="center", wrap=True, transform=ax.transAxes
        )
        ax.set_axis_off()
    ax.set_title("Hyper-parameter importances")
    return _save(fig, path)
