"""Does the MAE foundation transfer with few labels? Six arms side by side, equal adaptation budgets.

Arms (every one the same architecture, data, epochs and batch size; only weights and method change):

- ``mae-lora``:    the MAE foundation + LoRA (rank 8 on qkv, new head);
- ``sup-lora``:    a supervised foundation (the seed's recipe: multi-label BCE pre-training, here on the
                   labelled Kermany train split, NORMAL/PNEUMONIA) + LoRA;
- ``random-lora``: the same architecture at random init + LoRA;
- ``scratch``:     the same architecture trained from random init, every weight;
- ``mae-linear``:  a linear probe on the frozen MAE encoder;
- ``mae-full``:    full fine-tuning from the MAE foundation (every weight, its own learning rate).

Tasks: ``mura`` (MURA humerus, study AUROC and Cohen's kappa at 0.5 on its valid split), ``nih`` (NIH-1000,
mean AUROC over the labels with >= 10 positives in its test split), ``pneumoniamnist`` (the balanced
PneumoniaMNIST subsample's test split: Kermany *test* images, which no foundation here saw).

Each cell (task, arm, label fraction) runs ``xrayfm.train.label_efficiency`` over the seeds (finished runs
are reused) and reports the weights at the end of the budget (no checkpoint picked on the reported split).
The CI of a cell is a percentile bootstrap of its seed-mean metric: the evaluation studies (MURA) or
patients (NIH, PneumoniaMNIST: images) are resampled once per draw and every seed is scored on the draw.

    python scripts/transfer_experiment.py --out /work/runs/transfer --mae xrayfm/cxr-vit-tiny-mae \\
        --tasks mura,nih --fractions 0.01,0.1,1 --seeds 0,1,2 --epochs 10 [--supervised RUN/best]

Outputs under --out: ``results.csv`` (one row per run), ``table.csv`` / ``table.md`` (cells with CIs) and
``label_efficiency.png`` (or --plot PATH).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from xrayfm.evaluate.metrics import point_auroc, threshold_metrics
from xrayfm.evaluate.reports import study_level
from xrayfm.models.backbones import create_model
from xrayfm.models.checkpoint import load_checkpoint, save_checkpoint
from xrayfm.train import AdaptConfig, PretrainConfig, label_efficiency, pretrain
from xrayfm.train.config import METHOD_LR

ARMS = {  # arm -> (foundation, method)
    "mae-lora": ("mae", "lora"),
    "sup-lora": ("sup", "lora"),
    "random-lora": ("random", "lora"),
    "scratch": ("random", "scratch"),  # the weights are not used: the foundation fixes the architecture
    "mae-linear": ("mae", "linear"),
    "mae-full": ("mae", "full"),  # full fine-tuning from the foundation: every weight, the foundation's start
}
# Fixed before any result was seen (never tuned on the reported splits): short budgets favour larger steps.
# The library's per-method rates (what `adapt --method auto` gives each candidate).
LR = METHOD_LR
MIN_POSITIVES = 10


def task_settings(task: str, data: Path) -> dict[str, Any]:
    """The AdaptConfig data settings of a task."""
    if task == "mura":
        root = data / "mura-humerus-64" / "MURA-v1.1"
        return dict(
            kind="mura",
            root=str(root),
            split="train",
            val_split="valid",
            body_parts=["XR_HUMERUS"],
            hflip=True,
        )
    if task == "nih":
        return dict(
            kind="nih",
            root=str(data / "nih-cxr14-1000-64"),
            split="train",
            val_split="test",
            subsample_by="patient_id",
        )
    if task == "pneumoniamnist":
        return dict(kind="folder", root=str(data / "pneumoniamnist" / "png"), split="train", val_split="test")
    raise SystemExit(f"unknown task {task!r}")


def random_foundation(like: str, out: Path) -> Path:
    """A checkpoint of ``like``'s architecture and preprocessing at random init (seed 0)."""
    if (out / "meta.json").is_file():
        return out
    _, meta = load_checkpoint(like)
    torch.manual_seed(0)
    model = create_model(**meta["model"])
    keep = {k: meta[k] for k in ("preprocessing", "labels")}
    save_checkpoint(
        out,
        model,
        {
            **keep,
            "kind": "foundation",
            "task": "random-init",
            "model": meta["model"],
            "data": {"synthetic": False},
        },
    )
    return out


def supervised_foundation(like: str, data: Path, out: Path, epochs: int, batch_size: int) -> Path:
    """The seed's recipe on the labelled pool: BCE pre-training on Kermany train (NORMAL/PNEUMONIA)."""
    if (out / "best" / "meta.json").is_file() and (out / "summary.json").is_file():
        return out / "best"
    _, meta = load_checkpoint(like)
    spec, prep = meta["model"], meta["preprocessing"]
    kwargs = {
        k: v
        for k, v in spec.items()
        if k not in ("name", "num_classes", "img_size", "in_chans", "drop_path_rate")
    }
    config = PretrainConfig(
        out=str(out), kind="folder", root=str(data / "kermany-pneumonia" / "chest_xray"), split="train",
        size=int(prep["size"]), resize_mode=prep["mode"], model=spec["name"], model_kwargs=kwargs, drop_path_rate=0.0,
        epochs=epochs, batch_size=batch_size, lr=5e-4, seed=0, progress_bar=False, tensorboard=False, resume=True,
    )  # fmt: skip
    pretrain(config)
    return out / "best"


def finished_rows(arm_dir: Path, method: str, fractions: list[float], seeds: list[int]) -> list[dict]:
    """The label_efficiency rows of the runs under `arm_dir` that finished (their report exists)."""
    from xrayfm.train.experiment import _row_from_report, _run_dir

    found = []
    for f in fractions:
        for s in seeds:
            run = _run_dir(arm_dir, method, f, s)
            if (run / "report" / "report.json").is_file() and (run / "summary.json").is_file():
                found.append(_row_from_report(run, method, f, s, LR[method]))
    return found


def seed_scores(task: str, run: Path) -> tuple[pd.DataFrame, list[str]]:
    """The run's predictions, and the label names that count for the task's metric."""
    predictions = pd.read_csv(run / "report" / "predictions.csv")
    names = [c.removeprefix("label/") for c in predictions.columns if c.startswith("label/")]
    if task == "nih":
        names = [n for n in names if (predictions[f"label/{n}"] == 1).sum() >= MIN_POSITIVES]
    elif task == "pneumoniamnist":
        names = [n for n in names if n == "pneumonia"]
    return predictions, names


def metric(task: str, predictions: pd.DataFrame, names: list[str]) -> dict[str, float | None]:
    """The task's headline metric (and kappa for MURA) on a table of predictions."""
    if task == "mura":
        _, y, p = study_level(
            predictions["label/Abnormal"], predictions["prob/Abnormal"], predictions["study_id"]
        )
        return {"value": point_auroc(y, p)[0], "kappa": threshold_metrics(y, p)["kappa"]}
    aurocs = [
        point_auroc(predictions[f"label/{n}"].to_numpy(), predictions[f"prob/{n}"].to_numpy())[0]
        for n in names
    ]
    aurocs = [a for a in aurocs if a is not None]
    return {"value": float(np.mean(aurocs)) if aurocs else None, "kappa": None}


def bootstrap_ci(
    task: str, tables: list[pd.DataFrame], names: list[str], n: int, seed: int
) -> tuple[float, float]:
    """95% percentile CI of the seed-mean metric, resampling studies (MURA) or patients (else)."""
    rng = np.random.default_rng(seed)
    values = []
    if task == "mura":  # resample studies of the study-level table (the same studies for every seed)
        studies = [study_level(t["label/Abnormal"], t["prob/Abnormal"], t["study_id"]) for t in tables]
        for _ in range(n):
            draw = rng.integers(0, len(studies[0][0]), len(studies[0][0]))
            scores = [point_auroc(y[draw], p[draw])[0] for _, y, p in studies]
            if all(s is not None for s in scores):
                values.append(float(np.mean(scores)))
    else:  # resample patients, with all their images
        groups = tables[0]["patient_id"].astype(str).to_numpy()
        ids, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
        for _ in range(n):
            draw = np.concatenate([members[g] for g in rng.integers(0, len(ids), len(ids))])
            scores = [metric(task, t.iloc[draw], names)["value"] for t in tables]
            if all(s is not None for s in scores):
                values.append(float(np.mean(scores)))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="experiment folder (outside the repository)")
    parser.add_argument("--data", default="../shared/data", help="the real-data folder")
    parser.add_argument("--mae", required=True, help="MAE foundation: xrayfm/<name> or a checkpoint folder")
    parser.add_argument("--supervised", help="supervised foundation folder (default: trained here)")
    parser.add_argument(
        "--supervised-epochs", type=int, default=3, help="epochs of that supervised pre-training"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--tasks", default="mura,nih", help="comma-separated: mura, nih, pneumoniamnist")
    parser.add_argument("--fractions", default="0.01,0.1,1", help="label fractions")
    parser.add_argument("--seeds", default="0,1,2", help="seeds per cell")
    parser.add_argument("--epochs", type=int, default=5, help="adaptation epochs (every arm)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument(
        "--plot", help="where to write the label-efficiency figure (default OUT/label_efficiency.png)"
    )
    parser.add_argument(
        "--aggregate-only",
        action="store_true",
        help="train nothing: tabulate the runs that finished (a cell says how many seeds it has)",
    )
    args = parser.parse_args()

    out, data = Path(args.out), Path(args.data).resolve()
    arms = args.arms.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    foundations = {"mae": args.mae}
    if args.aggregate_only:
        foundations = {}
    elif any(ARMS[a][0] == "random" for a in arms):
        foundations["random"] = str(random_foundation(args.mae, out / "foundations" / "random"))
    if not args.aggregate_only and any(ARMS[a][0] == "sup" for a in arms):
        foundations["sup"] = args.supervised or str(
            supervised_foundation(
                args.mae, data, out / "foundations" / "supervised", args.supervised_epochs, args.batch_size
            )
        )

    rows, cells = [], []
    for task in args.tasks.split(","):
        for arm in arms:
            foundation, method = ARMS[arm]
            if args.aggregate_only:  # what finished, as it is: no training
                result = {"rows": finished_rows(out / task / arm, method, fractions, seeds)}
            else:
                base = AdaptConfig(
                    out=str(out / task / arm), foundation=foundations[foundation], method=method, epochs=args.epochs,
                    batch_size=args.batch_size, n_bootstrap=0, progress_bar=False, tensorboard=False, **task_settings(task, data),
                )  # fmt: skip
                result = label_efficiency(
                    base, methods=[method], fractions=fractions, seeds=seeds, lrs=LR, report_on="last"
                )
            for f in fractions:
                runs = [Path(r["run"]) for r in result["rows"] if r["fraction"] == f]
                if not runs:
                    continue
                tables, names = zip(*(seed_scores(task, r) for r in runs), strict=True)
                per_seed = [metric(task, t, names[0]) for t in tables]
                values = [m["value"] for m in per_seed]
                lo, hi = bootstrap_ci(task, list(tables), names[0], args.n_bootstrap, seed=0)
                kappas = [m["kappa"] for m in per_seed if m["kappa"] is not None]
                run_rows = [r for r in result["rows"] if r["fraction"] == f]
                cells.append(
                    {
                        "task": task, "arm": arm, "fraction": f, "mean": float(np.mean(values)), "std": float(np.std(values)),
                        "ci_low": lo, "ci_high": hi, "kappa": float(np.mean(kappas)) if kappas else None,
                        "seeds": len(values), "labels": ",".join(names[0]), "train_images": run_rows[0]["train_images"],
                        "trainable_fraction": run_rows[0]["trainable_fraction"],
                        "seconds": float(np.mean([r["seconds"] for r in run_rows])),
                    }
                )  # fmt: skip
                rows += [
                    {**r, "task": task, "arm": arm, "value": v} for r, v in zip(run_rows, values, strict=True)
                ]
            if cells:
                write_tables(out, rows, cells, args.plot)
    print((out / "table.md").read_text())


def write_tables(out: Path, rows: list[dict], cells: list[dict], plot: str | None) -> None:
    """results.csv, table.csv, table.md and the label-efficiency figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    table = pd.DataFrame(cells)
    table.to_csv(out / "table.csv", index=False)
    lines = []
    for task, part in table.groupby("task", sort=False):
        fractions = sorted(part["fraction"].unique())
        metric_name = {"mura": "study AUROC (kappa)", "nih": "mean AUROC", "pneumoniamnist": "AUROC"}[task]
        lines += [
            f"### {task}: {metric_name}, mean of {int(part['seeds'].max())} seeds [95% bootstrap CI]",
            "",
        ]
        lines.append("| arm | trainable | " + " | ".join(f"{f:g} of labels" for f in fractions) + " |")
        lines.append("|---|---|" + "---|" * len(fractions))
        for arm, arm_rows in part.groupby("arm", sort=False):
            by_f = {r.fraction: r for r in arm_rows.itertuples()}
            texts = []
            for f in fractions:
                r = by_f.get(f)
                if r is None:
                    texts.append("—")
                    continue
                kappa = f" (κ {r.kappa:.2f})" if r.kappa is not None and not pd.isna(r.kappa) else ""
                fewer = (
                    f" ({r.seeds} seed{'s' if r.seeds > 1 else ''})" if r.seeds < part["seeds"].max() else ""
                )
                texts.append(f"{r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]{kappa}{fewer}")
            share = 100 * arm_rows["trainable_fraction"].iloc[0]
            shown = f"{share:.2f}%" if share >= 0.01 else f"{share:.3g}%"  # a linear probe's head
            lines.append(f"| {arm} | {shown} | " + " | ".join(texts) + " |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))

    tasks = list(dict.fromkeys(table["task"]))
    fig = Figure(figsize=(5.5 * len(tasks), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        part = table[table["task"] == task]
        for arm, arm_rows in part.groupby("arm", sort=False):
            arm_rows = arm_rows.sort_values("fraction")
            x, y = arm_rows["fraction"].to_numpy(), arm_rows["mean"].to_numpy()
            err = np.vstack([y - arm_rows["ci_low"].to_numpy(), arm_rows["ci_high"].to_numpy() - y])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(
            xlabel="fraction of training labels",
            ylabel={"mura": "study AUROC", "nih": "mean AUROC"}.get(task, "AUROC"),
            title=task,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    path = Path(plot) if plot else out / "label_efficiency.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")


if __name__ == "__main__":
    main()
