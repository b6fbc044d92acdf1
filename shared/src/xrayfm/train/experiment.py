"""Label-efficiency experiment: methods x label fractions x seeds, one adaptation run each.

Every run uses the same caches, validation split, epochs and batch size (the same budget); only the
method, the share of training studies kept and the seed change. The validation split is never
subsampled, and runs report their *last* weights by default (no checkpoint picked on the reported split).
Finished runs (with a report) are reused, so an interrupted experiment continues where it stopped.
Outputs: ``results.csv`` / ``results.json`` (one row per run), ``summary.md`` (mean ± std across seeds)
and ``label_efficiency.png``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from xrayfm.errors import XrayfmError
from xrayfm.evaluate import plot_label_efficiency, summarise_label_efficiency
from xrayfm.train.adaptation import adapt
from xrayfm.train.config import METHOD_LR, METHODS, AdaptConfig
from xrayfm.train.evaluation import headline
from xrayfm.utils import to_jsonable


def _run_dir(out: Path, method: str, fraction: float, seed: int) -> Path:
    return out / "runs" / method / f"fraction-{fraction:g}" / f"seed-{seed}"


def _row_from_report(run: Path, method: str, fraction: float, seed: int, lr: float) -> dict[str, Any]:
    report = json.loads((run / "report" / "report.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "best" / "meta.json").read_text())
    name, value = headline(report)
    return {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "metric": value,
        "metric_name": name,
        "lr": lr,
        "train_images": meta["data"]["train"]["images"],
        "train_studies": meta["data"]["train"]["studies"],
        "trainable": meta["trainable"]["trainable"],
        "trainable_fraction": meta["trainable"]["fraction"],
        "steps": summary["step"],
        "synthetic": bool(meta["data"].get("synthetic")),
        "seconds": summary["seconds"],
        "run": str(run),
    }


def label_efficiency(
    base: AdaptConfig,
    methods: Sequence[str] = METHODS,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    lrs: dict[str, float] | None = None,
    report_on: str = "last",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every (method, fraction, seed) adaptation under ``base.out``; returns the table and file paths."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise XrayfmError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise XrayfmError(f"label fractions must be in (0, 1], got {list(fractions)}")
    if not seeds:
        raise XrayfmError("give at least one seed")
    base.validate()
    out = Path(base.out)
    lrs = {**METHOD_LR, **(lrs or {})}
    # One cache per split for every run.
    shared = {"cache": base.cache or str(out / "cache" / base.split)}
    if base.val_split or base.val_cache:
        shared["val_cache"] = base.val_cache or str(out / "cache" / (base.val_split or "valid"))
    rows, total, done = [], len(methods) * len(fractions) * len(seeds), 0
    for fraction in fractions:
        for method in methods:
            for seed in seeds:
                run = _run_dir(out, method, fraction, seed)
                if not (run / "report" / "report.json").exists():
                    config = dataclasses.replace(
                        base,
                        **shared,
                        out=str(run),
                        method=method,
                        seed=seed,
                        lr=lrs[method],
                        label_fraction=None if fraction == 1 else fraction,
                        resume=True,
                        report_on=report_on,
                    )
                    result = adapt(config)
                    if result["status"] == "cancelled":
                        raise XrayfmError(f"run {run} was cancelled")
                rows.append(_row_from_report(run, method, fraction, seed, lrs[method]))
                done += 1
                if progress is not None:
                    progress({"done": done, "total": total, "last": rows[-1]})
    return write_results(rows, out, title=f"Label efficiency ({rows[0]['metric_name']})")


def write_results(rows: list[dict[str, Any]], out: Path, title: str) -> dict[str, Any]:
    """results.csv/.json, summary.md (mean ± std per method and fraction) and label_efficiency.png."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "results.json").write_text(json.dumps(to_jsonable(rows), indent=2, allow_nan=False) + "\n")
    summary = summarise_label_efficiency(rows)
    plot = plot_label_efficiency(
        rows, out / "label_efficiency.png", ylabel=rows[0]["metric_name"], title=title
    )
    fractions = sorted({r["fraction"] for r in summary})
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cell = {(r["method"], r["fraction"]): r for r in summary}
    trainable = {r["method"]: r["trainable_fraction"] for r in rows}
    lines = [
        f"# {title}",
        "",
        f"Mean ± std over seeds of {rows[0]['metric_name']} on the validation split.",
        "",
    ]
    lines.append("| Method | Trainable | " + " | ".join(f"{f:g} of labels" for f in fractions) + " |")
    lines.append("|---|---|" + "---|" * len(fractions))
    for m in methods:
        cells = []
        for f in fractions:
            c = cell.get((m, f))
            cells.append("—" if c is None else f"{c['mean']:.3f} ± {c['std']:.3f} (n={c['n_seeds']})")
        lines.append(f"| {m} | {100 * trainable[m]:.2f}% | " + " | ".join(cells) + " |")
    if any(r.get("synthetic") for r in rows):
        lines += ["", "**The data are SYNTHETIC phantoms, not medical images.**"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return {
        "rows": rows,
        "summary": summary,
        "files": {
            "csv": str(out / "results.csv"),
            "json": str(out / "results.json"),
            "markdown": str(out / "summary.md"),
            "plot": str(plot),
        },
    }


__all__ = ["label_efficiency", "write_results"]
