"""`xrayfm pretrain`, `adapt`, `evaluate`, `cv`, `tune` and `experiment label-efficiency`: thin layers over
:mod:`xrayfm.train`.

Training options are generated from the configs' fields (:mod:`xrayfm.train.config`), so every
setting of a JSON job spec is also a documented command-line option, with the same name and default.
``--config FILE.json`` loads settings; options given on the command line override them.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from xrayfm.commands.output import print_json
from xrayfm.errors import XrayfmError
from xrayfm.train.config import (
    METHOD_LR,
    METHODS,
    AdaptConfig,
    CVConfig,
    EvaluateConfig,
    JsonConfig,
    PretrainConfig,
    TuneConfig,
    bounds_text,
    choices_text,
    settings_of,
)

C = TypeVar("C", bound=JsonConfig)


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"depth\": 4}'")
    return value


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type[JsonConfig], skip: tuple[str, ...] = ()
) -> None:
    """One ``--option`` per config field (help, default, range and choices from the config's fields);
    unset options stay unset."""
    parser.add_argument(
        "--config", metavar="FILE", help="JSON file of settings (options given here override it)"
    )
    for s in settings_of(cls).values():
        if s.name in skip:
            continue
        limits, allowed = bounds_text(s), choices_text(s)
        shown = json.dumps(s.default) + (f"; range {limits}" if limits else "")
        shown += f"; one of {allowed}" if allowed else ""
        help_text = f"{s.help} (default: {shown})"
        kind = s.type
        flag = "--" + s.name.replace("_", "-")
        common: dict[str, Any] = {"dest": s.name, "default": argparse.SUPPRESS, "help": help_text}
        # argparse checks a single value's choices; the items of a list are checked by the config
        if s.choices is not None and typing.get_origin(kind) is not list:
            common["choices"] = s.choices
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, type=_parse_list, metavar="A,B", **common)
        elif kind is dict or typing.get_origin(kind) is dict:
            parser.add_argument(flag, type=_parse_json_object, metavar="JSON", **common)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, metavar=s.name.upper(), **common)
        else:
            raise TypeError(f"no CLI parser for {cls.__name__}.{s.name}: {kind}")


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Settings of ``--config`` (if any), overridden by the options given on the command line."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise XrayfmError(f"cannot read config {args.config}: {exc}") from exc
        if not isinstance(data, dict):
            raise XrayfmError(f"config {args.config} must hold one JSON object")
    names = set(settings_of(cls))
    data.update({k: v for k, v in vars(args).items() if k in names})
    if getattr(args, "json", False):
        data["progress_bar"] = False
    return cls.from_dict(data)


def _print_summary(summary: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    if args.json:
        print_json({k: v for k, v in summary.items() if k != "history"})
        return 0
    print(f"{what}: {summary['status']} after {summary['step']}/{summary['total_steps']} steps")
    print(f"best {summary['metric']}: {summary['best_metric']} (epoch {summary['best_epoch']})")
    print(f"run folder: {summary['out']}  (best/: checkpoint, last/: resumable state)")
    if "report" in summary:
        print(
            f"report: {summary['report']['report_dir']}/report.md  "
            f"({summary['report']['metric']} = {summary['report']['value']})"
        )
    return 0 if summary["status"] != "cancelled" else 3


# -- commands ---------------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pre-train a foundation model."""
    from xrayfm.train.pretraining import pretrain

    config = config_from_args(PretrainConfig, args)
    if args.print_config:
        print(config.to_json(), end="")
        return 0
    summary = pretrain(config)
    return _print_summary(summary, args, "pre-training") if _is_rank0() else 0


def cmd_adapt(args: argparse.Namespace) -> int:
    """Adapt a foundation checkpoint to a task."""
    from xrayfm.train.adaptation import adapt

    config = config_from_args(AdaptConfig, args)
    if args.print_config:
        print(config.to_json(), end="")
        return 0
    summary = adapt(config)
    if not _is_rank0():
        return 0
    if not args.json:
        t = summary["trainable"]
        print(
            f"method {summary['method']}: {t['trainable']:,} of {t['total']:,} parameters trainable "
            f"({100 * t['fraction']:.3f}%)"
        )
    return _print_summary(summary, args, "adaptation")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint and write its report."""
    from xrayfm.train.evaluation import evaluate_config

    result = evaluate_config(config_from_args(EvaluateConfig, args), args.out)
    if not _is_rank0():
        return 0
    if args.json:
        print_json({k: v for k, v in result.items() if k != "report"} | {"report": result["report"]})
    else:
        print(f"{result['metric']} = {result['value']}")
        print(f"report: {result['report_dir']}/report.md")
    return 0


def cmd_label_efficiency(args: argparse.Namespace) -> int:
    """Run the label-efficiency experiment."""
    from xrayfm.train.experiment import label_efficiency

    base = config_from_args(AdaptConfig, args)
    lrs = {m: args.lr for m in METHODS} if "lr" in vars(args) else {}  # an explicit --lr applies to all
    for item in args.method_lr or []:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise XrayfmError(
                f"--method-lr expects METHOD=LR with METHOD in {', '.join(METHODS)}, got {item!r}"
            )
        lrs[method] = float(value)
    result = label_efficiency(
        base,
        methods=args.methods,
        fractions=[float(f) for f in args.fractions],
        seeds=[int(s) for s in args.seeds],
        lrs=lrs,
        report_on=args.report_weights,
    )
    if args.json:
        print_json(result)
    else:
        print(open(result["files"]["markdown"]).read())
        print(f"table: {result['files']['csv']}   plot: {result['files']['plot']}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    """k-fold cross-validation of an adaptation."""
    config = config_from_args(CVConfig, args)
    if args.print_config:
        print(config.to_json(), end="")
        return 0
    from xrayfm.train.cv import cross_validate

    result = cross_validate(config)
    if args.json:
        print_json({k: v for k, v in result.items()})
    else:
        print(open(result["files"]["markdown"]).read())
        print(f"table: {result['files']['folds']}   out-of-fold: {result['files']['oof_predictions']}")
        print(f"plot: {result['files']['plot']}   pooled report: {result['files']['oof_report']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Hyper-parameter search with Optuna."""
    config = config_from_args(TuneConfig, args)
    if args.print_config:
        print(config.to_json(), end="")
        return 0
    from xrayfm.train.tune import tune

    result = tune(config)
    if args.json:
        print_json(result)
    else:
        print(open(result["files"]["markdown"]).read())
        print(f"trials run now: {result['trials_run']} (the study held {result['trials_before']} before)")
        print(f"table: {result['files']['trials']}   best: {result['files']['best']}")
    return 3 if result["cancelled"] else 0


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


# -- registration -----------------------------------------------------------------------------------------
def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="print a machine-readable JSON summary, no progress bars"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training sub-commands to the `xrayfm` parser."""
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a foundation model (multi-label) on a dataset or a cache",
        description="Pre-train a timm model on radiographs: masked multi-label BCE (or focal), AdamW, "
        "warm-up + "
        "cosine, validation AUROC each epoch, best/ checkpoint and an exactly resumable last/ state. "
        "Multi-GPU/multi-node: launch with torchrun "
        "(e.g. torchrun --nproc_per_node=4 -m xrayfm.cli pretrain ...).",
    )
    add_config_arguments(p, PretrainConfig)
    _common_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser(
        "adapt",
        help="adapt a foundation checkpoint to a new task (lora, full, linear, scratch)",
        description="Adapt a foundation checkpoint: LoRA (PEFT), full fine-tuning, a linear probe or "
        "the same "
        "architecture from scratch, with the same loop and budget; then report on the validation split "
        "(study-level AUROC for MURA-style data).",
    )
    add_config_arguments(p, AdaptConfig)
    _common_flags(p)
    p.set_defaults(func=cmd_adapt)

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a dataset split: report.json/.md, ROC and reliability PNGs",
        description="Evaluate a full or adapted checkpoint. Binary tasks get image- and study-level AUROC "
        "with CIs, kappa, sensitivity/specificity and ECE (per body part when known); multi-label tasks get "
        "per-label AUROC with CIs. The dataset must have every label the model predicts, matched ignoring "
        "case (a folder class pneumonia/ serves the label Pneumonia); a raw dataset is cached under "
        "OUT/cache/SPLIT, rebuilt when its images change.",
    )
    p.add_argument("model", metavar="CHECKPOINT", help="checkpoint folder (a run's best/ or merged/)")
    p.add_argument("--out", required=True, help="report folder to write")
    add_config_arguments(p, EvaluateConfig, skip=("model",))
    p.add_argument("--json", action="store_true", help="print the report as JSON, no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "cv",
        help="k-fold cross-validation of an adaptation, folds grouped by patient",
        description="Cut the training split into --folds folds by patient (no patient in two folds; "
        "stratified by the label when the task has one binary label), adapt on K-1 folds and report on the "
        "held-out fold, for every fold. Writes folds.csv, oof_predictions.csv (every training image once), "
        "oof_report/, cv.json, summary.md (per-fold mean ± sd, pooled out-of-fold AUROC with a bootstrap "
        "CI over patients; study level for MURA) and cv.png under --out. Finished folds are reused.",
    )
    add_config_arguments(p, CVConfig, skip=("fold", "val_split", "val_cache", "val_fraction", "resume"))
    _common_flags(p)
    p.set_defaults(func=cmd_cv)

    p = subparsers.add_parser(
        "tune",
        help="hyper-parameter search for adapt with Optuna (seeded TPE, median pruning, resumable)",
        description="Search adaptation settings with Optuna: each trial is an adapt run under "
        "OUT/trials/, scored by its best epoch's --metric on a patient-level split of --split (never a "
        "separate split); trials below the median of earlier ones at the same epoch are pruned. The study "
        "is stored in OUT/study.db: the same command continues it up to --trials finished trials. Writes "
        "trials.csv, best.json (settings, value, the best trial's checkpoint), summary.md, "
        "optimization_history.png and param_importances.png. Example space: "
        '--space \'{"lr": {"low": 1e-4, "high": 3e-3, "log": true}, "lora_rank": [4, 8, 16]}\'.',
    )
    add_config_arguments(p, TuneConfig, skip=("val_split", "val_cache", "folds", "fold", "resume"))
    _common_flags(p)
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser(
        "experiment",
        help="experiments over many runs (label-efficiency)",
        description="Experiments made of many training runs.",
    )
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    e = sub.add_parser(
        "label-efficiency",
        help="methods x label fractions x seeds: table, Markdown summary and plot",
        description="Adapt a foundation checkpoint with each method at several label fractions and seeds "
        "(same budget for all), then write results.csv/.json, summary.md and label_efficiency.png "
        "under --out. "
        "Finished runs are reused.",
    )
    add_config_arguments(e, AdaptConfig, skip=("method", "label_fraction", "resume", "report_on"))
    e.add_argument(
        "--methods",
        type=_parse_list,
        default=list(METHODS),
        metavar="A,B",
        help=f"methods to compare (default: {','.join(METHODS)})",
    )
    e.add_argument(
        "--fractions",
        type=_parse_list,
        default=["0.01", "0.1", "1"],
        metavar="F,G",
        help="shares of training studies to keep (default: 0.01,0.1,1)",
    )
    e.add_argument(
        "--seeds",
        type=_parse_list,
        default=["0", "1", "2"],
        metavar="S,T",
        help="seeds per cell (default: 0,1,2)",
    )
    e.add_argument(
        "--method-lr",
        action="append",
        metavar="METHOD=LR",
        help="learning rate of one method (repeatable); defaults: "
        + ", ".join(f"{method} {lr:g}" for method, lr in METHOD_LR.items()),
    )
    e.add_argument(
        "--report-weights",
        choices=("last", "best"),
        default="last",
        help="weights each run reports: last (default: no checkpoint picked on the reported split) or best",
    )
    e.add_argument("--json", action="store_true", help="print the results as JSON, no progress bars")
    e.set_defaults(func=cmd_label_efficiency)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
