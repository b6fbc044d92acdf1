"""Which LoRA settings adapt the shipped foundation best? A resumable grid of `xrayfm adapt` runs.

Screens LoRA targets x rank x alpha x dropout x learning rate on the tasks of
``scripts/transfer_experiment.py`` (MURA humerus study AUROC, NIH-1000 mean AUROC, PneumoniaMNIST AUROC),
at one label fraction and seed, with reference arms (scratch, full fine-tuning, linear probe) at the same
budget. The task definitions, the evaluation and the reference arms' learning rates are
transfer_experiment.py's (imported, not copied), so the numbers compare with docs/foundation.md.

Each run is one ``xrayfm adapt --config`` process (the CLI, so a run sees the library as it is on disk);
its result is appended as one JSON line to ``OUT/results.jsonl`` and skipped when the grid runs again. The
runs go most informative first (LoRA on qkv+proj and on every linear layer, rank 8-16, lr 1e-3 and 3e-3,
after the references and the library's default), so a grid stopped by --budget-minutes still answers.

    OMP_NUM_THREADS=1 nohup nice -n 19 python scripts/lora_grid.py --out /work/runs/lora-grid \\
        --budget-minutes 90 >> /work/runs/lora-grid/log.txt 2>&1 &
    python scripts/lora_grid.py --out /work/runs/lora-grid --plan     # the ordered grid, trainable %
    python scripts/lora_grid.py --out /work/runs/lora-grid --report   # table.md/.csv + grid.png

A LoRA config's name: ``lora-<targets>-r<rank>-a<alpha>-d<dropout>-lr<lr>``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_experiment as te  # noqa: E402  (a script beside this one, not a package)

TARGET_SETS = {"qkv": ["qkv"], "qkv+proj": ["qkv", "proj"], "all-linear": ["qkv", "proj", "fc1", "fc2"]}
REFERENCES = {  # arm -> (foundation, method); the learning rate is transfer_experiment.LR[method]
    "scratch": ("random", "scratch"),
    "full": ("mae", "full"),
    "linear": ("mae", "linear"),
    "auto": ("mae", "auto"),  # adapt --method auto: each candidate at its own learning rate
}
# What "most informative" means for the order: distance from these values, one point per setting.
CORE = {"targets": ("qkv+proj", "all-linear"), "rank": (8, 16), "lr": (1e-3, 3e-3), "dropout": (0.1,)}


@dataclass(frozen=True)
class Arm:
    """One training setting: a reference arm, or LoRA with its settings."""

    method: str
    targets: str = ""
    rank: int = 0
    alpha: int = 0
    dropout: float = 0.0
    lr: float = 0.0

    @property
    def name(self) -> str:
        """The config's name in folders, results and tables."""
        if self.method != "lora":
            return self.method
        return f"lora-{self.targets}-r{self.rank}-a{self.alpha}-d{self.dropout:g}-lr{self.lr:g}"

    def adapt_settings(self) -> dict[str, Any]:
        """The arm's LoRA settings of `xrayfm adapt` (none for a reference arm)."""
        if self.method != "lora":
            return {}
        return {
            "lora_rank": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "lora_targets": TARGET_SETS[self.targets],
        }

    def priority(self) -> tuple[int, ...]:
        """Sort key: settings off the core first count, then the core's own order."""
        if self.method != "lora":
            return (-2,)
        off = (
            (self.targets not in CORE["targets"])
            + (self.rank not in CORE["rank"])
            + (self.lr not in CORE["lr"])
            + (self.dropout not in CORE["dropout"])
            + (self.alpha != 2 * self.rank)
        )
        # A half-fraction of the core's 2x2x2 (targets x rank x lr) first: its four configs already
        # balance each of the three settings.
        half = 1 - ((self.targets == "all-linear") + (self.rank == 16) + (self.lr == 3e-3)) % 2
        order = list(TARGET_SETS)[::-1]  # every linear layer, then qkv+proj, then qkv
        return (
            off,
            half,
            abs(self.rank - 12),
            order.index(self.targets),
            -self.lr,
            -self.dropout,
            self.rank,
            -self.alpha,
        )


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers."""
    return [float(x) for x in text.split(",") if x]


def parse_arm(name: str) -> Arm:
    """The LoRA arm of a config name ``lora-<targets>-r<rank>-a<alpha>-d<dropout>-lr<lr>``."""
    match = re.fullmatch(r"lora-(.+)-r(\d+)-a(\d+)-d([\d.e-]+)-lr([\d.e-]+)", name)
    if match is None or match[1] not in TARGET_SETS:
        raise SystemExit(f"not a LoRA config name: {name!r} (lora-<{'|'.join(TARGET_SETS)}>-rR-aA-dD-lrLR)")
    return Arm("lora", match[1], int(match[2]), int(match[3]), float(match[4]), float(match[5]))


def grid(args: argparse.Namespace, default: Arm) -> list[Arm]:
    """The arms in running order: references, the library's default LoRA, then the grid by priority (or,
    with --configs, the named configs in their order)."""
    arms = [Arm(m) for m in args.references.split(",") if m]
    if args.configs:
        named = [parse_arm(n) for n in args.configs.split(",") if n]
        return arms + [default] + [a for a in named if a != default]
    lora = []
    for targets, rank, dropout, lr in itertools.product(
        args.targets.split(","), [int(r) for r in floats(args.ranks)], floats(args.dropouts), floats(args.lrs)
    ):
        lora.append(Arm("lora", targets, rank, 2 * rank, dropout, lr))
        if rank in floats(args.alpha_rank_ranks) and lr in floats(args.alpha_rank_lrs):
            lora.append(Arm("lora", targets, rank, rank, dropout, lr))
    lora = sorted(set(lora), key=Arm.priority)
    if default in lora:
        lora.remove(default)
        lora.insert(0, default)
    return arms + lora


def library_default() -> Arm:
    """The LoRA settings `xrayfm adapt` uses when given none (read from AdaptConfig, not restated)."""
    from xrayfm.train import AdaptConfig
    from xrayfm.train.config import METHOD_LR

    c = AdaptConfig()
    names = {tuple(v): k for k, v in TARGET_SETS.items()}
    targets = names.get(tuple(c.lora_targets), ",".join(c.lora_targets))
    return Arm("lora", targets, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lr or METHOD_LR["lora"])


def trainable_share(foundation: str, arm: Arm) -> float:
    """Trainable share of the parameters of an arm on the foundation, with a one-label head."""
    from xrayfm.models.checkpoint import load_checkpoint
    from xrayfm.models.lora import trainable_summary
    from xrayfm.train.adaptation import build_adapted_model
    from xrayfm.train.config import AdaptConfig

    if arm.method == "auto":  # its share is the chosen method's, known only after the run
        return float("nan")
    model, meta = load_checkpoint(foundation)
    settings = {"method": arm.method}
    settings |= arm.adapt_settings()
    built, _ = build_adapted_model(model, meta, AdaptConfig(**settings), 1)
    return trainable_summary(built)["fraction"]


def run_config(args: argparse.Namespace, task: str, arm: Arm, seed: int, foundations: dict) -> dict:
    """The `xrayfm adapt` settings of one run (shared caches per task, last weights reported)."""
    out, data = Path(args.out), Path(args.data).resolve()
    settings = te.task_settings(task, data)
    foundation = foundations[REFERENCES[arm.method][0]] if arm.method in REFERENCES else args.foundation
    config = {
        **settings,
        "out": str(out / "runs" / task / arm.name / f"fraction-{args.fraction:g}" / f"seed-{seed}"),
        "cache": str(out / "cache" / task / settings["split"]),
        "val_cache": str(out / "cache" / task / settings["val_split"]),
        "foundation": foundation,
        "method": arm.method,
        "lr": arm.lr if arm.method == "lora" else te.LR.get(arm.method, te.LR["lora"]),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": seed,
        "label_fraction": None if args.fraction == 1 else args.fraction,
        "report_on": "last",
        "n_bootstrap": 0,
        "resume": True,
        "progress_bar": False,
        "tensorboard": False,
    }
    config |= arm.adapt_settings()
    return config


def train_one(args: argparse.Namespace, config: dict, log: Any) -> bool:
    """Run `xrayfm adapt` on a config (retrying after a wait: the library may be mid-edit)."""
    run = Path(config["out"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "grid_config.json").write_text(json.dumps(config, indent=2) + "\n")
    cli = Path(sys.executable).with_name("xrayfm")
    for attempt in range(1, args.retries + 2):
        with open(run / "adapt.log", "a") as sink:
            code = subprocess.call(
                [str(cli), "adapt", "--config", str(run / "grid_config.json")], stdout=sink, stderr=sink
            )
        if code == 0 and (run / "report" / "predictions.csv").is_file():
            return True
        tail = (run / "adapt.log").read_text().strip().splitlines()[-3:]
        print(f"  run failed (exit {code}, try {attempt}): {' | '.join(tail)}", file=log, flush=True)
        if attempt <= args.retries:
            time.sleep(args.retry_wait)
    return False


def score(task: str, run: Path) -> dict[str, Any]:
    """transfer_experiment's metric of a finished run, with its size and trainable share."""
    predictions, names = te.seed_scores(task, run)
    m = te.metric(task, predictions, names)
    meta = json.loads((run / "best" / "meta.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    return {
        "value": m["value"],
        "kappa": m["kappa"],
        "labels": names,
        "trainable": meta["trainable"]["trainable"],
        "trainable_fraction": meta["trainable"]["fraction"],
        "train_images": meta["data"]["train"]["images"],
        "steps": summary["step"],
        "train_seconds": summary["seconds"],
    }


def cell_ci(
    out: Path, task: str, config: str, fraction: float, seeds: list[int], n: int
) -> tuple[float, float] | None:
    """95 % bootstrap CI of a cell's seed-mean metric from its runs' predictions; None unless every seed
    finished (or with --n-bootstrap 0)."""
    runs = [out / "runs" / task / config / f"fraction-{fraction:g}" / f"seed-{s}" for s in seeds]
    if n <= 0 or not all((r / "report" / "predictions.csv").is_file() for r in runs):
        return None
    tables, names = zip(*(te.seed_scores(task, r) for r in runs), strict=True)
    return te.bootstrap_ci(task, list(tables), names[0], n, seed=0)


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every finished run's JSON line."""
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(task: str, name: str, fraction: float, seed: int) -> tuple:
    """A run's identity in results.jsonl."""
    return (task, name, float(fraction), int(seed))


def train(args: argparse.Namespace) -> None:
    """Run the grid's unfinished runs in order, one at a time, until done or out of budget."""
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    arms = grid(args, library_default())
    done = {key(r["task"], r["config"], r["fraction"], r["seed"]) for r in load_results(out)}
    todo = [
        (arm, seed, task)
        for arm in arms
        for seed in seeds
        for task in tasks
        if key(task, arm.name, args.fraction, seed) not in done
    ]
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    foundations = {"mae": args.foundation}
    if any(REFERENCES.get(a.method, ("",))[0] == "random" for a, _, _ in todo):
        foundations["random"] = str(te.random_foundation(args.foundation, out / "foundations" / "random"))
    log = sys.stdout
    start = time.monotonic()
    bar = tqdm(todo, desc="lora grid", unit="run", file=sys.stderr, dynamic_ncols=True)
    for arm, seed, task in bar:
        if args.budget_minutes and time.monotonic() - start > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes:g} min spent: stopping (rerun to continue)", flush=True)
            break
        bar.set_postfix_str(f"{task} {arm.name}")
        config = run_config(args, task, arm, seed, foundations)
        began = time.monotonic()
        if not train_one(args, config, log):
            with open(out / "failures.jsonl", "a") as f:
                f.write(
                    json.dumps({"task": task, "config": arm.name, "seed": seed, "run": config["out"]}) + "\n"
                )
            continue
        row = {
            "task": task,
            "config": arm.name,
            "fraction": args.fraction,
            "seed": seed,
            **asdict(arm),
            "lr": config["lr"],
            **score(task, Path(config["out"])),
            "seconds": time.monotonic() - began,
            "run": config["out"],
        }
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{task:15s} {arm.name:45s} value {row['value']:.3f}  trainable "
            f"{100 * row['trainable_fraction']:.2f}%  {row['seconds']:.0f} s",
            file=log,
            flush=True,
        )


def plan(args: argparse.Namespace) -> None:
    """Print the grid in running order with each config's trainable share and what has finished."""
    done = {(r["config"], r["task"]) for r in load_results(Path(args.out)) if r["fraction"] == args.fraction}
    shares: dict[tuple, float] = {}
    for k, arm in enumerate(grid(args, library_default()), 1):
        shape = (arm.method, arm.targets, arm.rank)
        if shape not in shares:
            shares[shape] = trainable_share(args.foundation, arm)
        finished = [t for t in args.tasks.split(",") if (arm.name, t) in done]
        print(f"{k:3d}  {arm.name:45s} {100 * shares[shape]:7.3f}%  finished: {','.join(finished) or '-'}")


def report(args: argparse.Namespace) -> pd.DataFrame:
    """table.md / table.csv (config, trainable %, per-task metric, mean over tasks) and grid.png."""
    out = Path(args.out)
    rows = [r for r in load_results(out) if r["fraction"] == args.fraction]
    if not rows:
        raise SystemExit(f"no finished runs in {out / 'results.jsonl'} at fraction {args.fraction:g}")
    tasks = [t for t in args.tasks.split(",") if any(r["task"] == t for r in rows)]
    frame = pd.DataFrame(rows)
    cells = frame.pivot_table(index="config", columns="task", values="value", aggfunc="mean")[tasks]
    table = pd.DataFrame(
        {
            "trainable %": 100 * frame.groupby("config")["trainable_fraction"].mean(),
            **{t: cells[t] for t in tasks},
            "mean": cells.mean(axis=1, skipna=False),
            "seeds": frame.groupby("config")["seed"].nunique(),
            "minutes": frame.groupby("config")["seconds"].sum() / 60,
        }
    )
    if "scratch" in table.index:
        table["vs scratch"] = table["mean"] - table.loc["scratch", "mean"]
    references = [a for a in REFERENCES if a in table.index]
    lora = table.drop(index=references).sort_values("mean", ascending=False, na_position="last")
    table = pd.concat([table.loc[references], lora])
    table.index.name = "config"
    table.to_csv(out / "table.csv")
    default = library_default().name
    shown = table.astype(object)
    for t in tasks:  # "mean [95 % CI]" where a cell has every seed's predictions
        for config in shown.index:
            ci = cell_ci(out, t, config, args.fraction, sorted(frame["seed"].unique()), args.n_bootstrap)
            if ci is not None and not pd.isna(table.at[config, t]):
                shown.at[config, t] = f"{table.at[config, t]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    shown = shown.rename(index=lambda n: f"{n} (default)" if n == default else n)
    text = markdown(shown)
    header = (
        f"{len(rows)} runs at {args.fraction:g} of the labels, "
        f"seeds {','.join(str(s) for s in sorted(frame['seed'].unique()))}; a cell is the mean over seeds "
        "[95 % bootstrap CI of that mean, evaluation studies or patients resampled: "
        "transfer_experiment.bootstrap_ci]; mean over tasks only where every task finished\n\n"
    )
    (out / "table.md").write_text(header + text + "\n")
    print(header + text)
    plot(table, tasks, references, default, out / "grid.png")
    return table


def markdown(table: pd.DataFrame) -> str:
    """A table as Markdown: AUROCs with 3 decimals, a dash where a run has not finished."""
    formats = {"trainable %": "{:.3g}", "minutes": "{:.1f}", "seeds": "{:.0f}"}

    def cell(column: str, v: Any) -> str:
        if isinstance(v, float) and pd.isna(v):
            return "—"
        return formats.get(column, "{:.3f}").format(v) if isinstance(v, int | float) else str(v)

    head = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, *values in table.itertuples():
        lines.append("| " + " | ".join([str(name), *map(cell, table.columns, values)]) + " |")
    return "\n".join(lines)


def plot(table: pd.DataFrame, tasks: list[str], references: list[str], default: str, path: Path) -> None:
    """Per task, each LoRA config's metric (sorted by the mean) against the reference arms."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lora = table.drop(index=references)
    fig = Figure(figsize=(4.2 * len(tasks) + 3, 0.22 * len(lora) + 1.8), dpi=110)
    FigureCanvasAgg(fig)
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        y = range(len(lora))
        colours = ["tab:red" if n == default else "tab:blue" for n in lora.index]
        ax.scatter(lora[task], y, c=colours, s=14, zorder=3)
        for ref, style in zip(references, ("--", "-", ":"), strict=False):
            ax.axvline(table.loc[ref, task], color="black", ls=style, lw=1, label=ref)
        ax.set_yticks(list(y))
        ax.set_yticklabels(lora.index if k == 0 else [], fontsize=6)
        ax.invert_yaxis()
        ax.set(title=task, xlabel="AUROC (MURA: study AUROC)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "LoRA grid (red: the library's default), sorted by the mean over tasks",
        fontsize=9,
        y=1.0 + 0.3 / (0.22 * len(lora) + 1.8),
    )
    fig.savefig(path, bbox_inches="tight")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="/work/runs/lora-grid", help="grid folder (outside the repository)")
    parser.add_argument("--data", default="../shared/data", help="the real-data folder")
    parser.add_argument("--foundation", default="xrayfm/cxr-vit-tiny-mae", help="foundation to adapt")
    parser.add_argument("--tasks", default="mura,nih,pneumoniamnist", help="comma-separated tasks")
    parser.add_argument("--fraction", type=float, default=0.1, help="label fraction of every run")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=10, help="adaptation epochs (every arm)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (every arm)")
    parser.add_argument(
        "--references", default="scratch,full", help=f"reference arms, from {','.join(REFERENCES)}"
    )
    parser.add_argument(
        "--targets", default=",".join(TARGET_SETS), help=f"LoRA target sets: {list(TARGET_SETS)}"
    )
    parser.add_argument(
        "--configs",
        default="",
        help="finalists: comma-separated LoRA config names (lora-all-linear-r8-a16-d0.1-lr0.003) run "
        "instead of the grid, after the references and the library's default",
    )
    parser.add_argument("--ranks", default="4,8,16,32", help="LoRA ranks (alpha = 2 x rank)")
    parser.add_argument("--dropouts", default="0,0.1", help="LoRA dropouts")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="LoRA learning rates")
    parser.add_argument("--alpha-rank-ranks", default="8,16", help="ranks that also run with alpha = rank")
    parser.add_argument(
        "--alpha-rank-lrs", default="1e-3,3e-3", help="learning rates of those alpha = rank runs"
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=0, help="start no run after this (0: no limit)"
    )
    parser.add_argument("--max-runs", type=int, help="run at most this many unfinished runs")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed run")
    parser.add_argument("--retry-wait", type=float, default=180, help="seconds before a retry")
    parser.add_argument(
        "--n-bootstrap", type=int, default=1000, help="--report: bootstrap draws of each cell's CI (0: none)"
    )
    parser.add_argument("--plan", action="store_true", help="train nothing: print the ordered grid")
    parser.add_argument("--report", action="store_true", help="train nothing: table.md/.csv and grid.png")
    args = parser.parse_args()
    unknown = [t for t in args.targets.split(",") if t not in TARGET_SETS]
    unknown += [a for a in args.references.split(",") if a and a not in REFERENCES]
    if unknown:
        raise SystemExit(f"unknown target sets or references: {unknown}")
    if args.plan:
        plan(args)
    elif args.report:
        report(args)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        train(args)


if __name__ == "__main__":
    main()
