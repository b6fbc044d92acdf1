"""Hyper-parameter search for adaptation with Optuna: seeded TPE, median pruning, a resumable study.

Each trial is one :func:`~xrayfm.train.adaptation.adapt` run under ``OUT/trials/trial-NNNN`` with the
settings the sampler proposes from the search space. Its objective is ``metric`` (mean AUROC by default)
of its best epoch on a patient-level split of the training split (``val_fraction``, ``split_seed``; the
same split for every trial): a separate validation split, which may be the one results are reported on,
is refused by :class:`~xrayfm.train.config.TuneConfig`. After every epoch the trial reports its
validation metric to the pruner (through adapt's ``progress`` callback); a pruned trial stops through
adapt's ``should_cancel`` and keeps the ``best/`` of the epochs it ran.

The study lives in ``OUT/study.db`` (SQLite): running the same command again continues it up to
``trials`` finished trials (0 new trials when it holds enough). A trial that was interrupted (still
"running" in the file) is marked failed and its settings are tried again first. The sampler is seeded with
``tune_seed`` and the number of trials already in the study, so a fresh study is reproducible and a
resumed one does not repeat its first proposals.

Outputs: ``trials.csv``, ``best.json`` (best settings, value, the trial's run folder and ``best/``
checkpoint), ``summary.md``, ``optimization_history.png`` and ``param_importances.png``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.evaluate import plot_optimization_history, plot_param_importances
from xrayfm.train.adaptation import adapt
from xrayfm.train.config import TUNABLE, TuneConfig
from xrayfm.train.sampler import mix_seed
from xrayfm.utils import atomic_write_json, read_json, to_jsonable

STUDY_NAME = "xrayfm-tune"
STUDY_FILE = "study.db"
# The space searched when none is given: LoRA's settings only apply to method lora.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-4, "high": 3e-3, "log": True},
    "weight_decay": {"low": 0.0, "high": 0.1},
    "lora_rank": [4, 8, 16],
    "lora_alpha": [8, 16, 32],
    "lora_dropout": {"low": 0.0, "high": 0.2},
    "lora_targets": ["qkv", "qkv,proj", "qkv,proj,fc1,fc2"],
}
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
# Settings of a TuneConfig that do not change what a trial trains (a resumed study may change them).
_NOT_THE_SEARCH = ("trials", "progress_bar", "num_workers", "device", "log_every", "tensorboard")


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension of the search space: a numeric range (``low``..``high``, ``log``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The value ``trial`` proposes (lists of LoRA targets are ``'a,b'`` strings inside Optuna)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if TUNABLE[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def parse_space(space: dict[str, Any], method: str) -> list[Param]:
    """The search space as Params; ``{}`` means :data:`DEFAULT_SPACE` (LoRA settings only for lora)."""
    if not space:
        space = {k: v for k, v in DEFAULT_SPACE.items() if method == "lora" or k not in LORA_ONLY}
    params, problems = [], []
    for name, spec in space.items():
        kind = TUNABLE.get(name)
        if kind is None:
            problems.append(f"{name}: not tunable (choose from {', '.join(TUNABLE)})")
        elif isinstance(spec, list):
            choices = tuple(",".join(c) if isinstance(c, list) else c for c in spec)
            bad = [c for c in choices if not isinstance(c, bool | int | float | str) or isinstance(c, bool)]
            if not choices or bad:
                problems.append(f"{name}: choices must be a non-empty list of numbers or strings")
            else:
                params.append(Param(name, choices=choices))
        elif isinstance(spec, dict) and set(spec) <= {"low", "high", "log"} and {"low", "high"} <= set(spec):
            low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
            if kind not in (int, float) or not all(isinstance(v, int | float) for v in (low, high)):
                problems.append(f"{name}: a range needs a numeric setting and numbers low, high")
            elif not low < high or (log and low <= 0):
                problems.append(f"{name}: need low < high (and low > 0 with log), got {spec}")
            else:
                params.append(Param(name, float(low), float(high), log))
        else:
            problems.append(f'{name}: give {{"low": L, "high": H, "log": false}} or a list of choices')
    if problems:
        raise XrayfmError("invalid search space: " + "; ".join(problems))
    return params


def decode(params: dict[str, Any]) -> dict[str, Any]:
    """AdaptConfig settings from Optuna's values (``'qkv,proj'`` becomes ``['qkv', 'proj']``)."""
    out = dict(params)
    if isinstance(out.get("lora_targets"), str):
        out["lora_targets"] = [t.strip() for t in out["lora_targets"].split(",") if t.strip()]
    return out


def trial_dir(out: Path, number: int) -> Path:
    """The adapt run folder of trial ``number``."""
    return out / "trials" / f"trial-{number:04d}"


def _search_settings(config: TuneConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_THE_SEARCH}


def open_study(config: TuneConfig) -> Any:
    """The Optuna study of ``config.out`` (created, or loaded to be continued), with its sampler and pruner."""
    import optuna

    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / STUDY_FILE}"
    direction = "minimize" if config.metric == "val_loss" else "maximize"
    # The number of trials already stored seeds the sampler too (a resumed study gets fresh proposals).
    existing = 0
    if (out / STUDY_FILE).exists():
        try:
            existing = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
        except KeyError:  # the file exists but holds no study of that name
            existing = 0
    sampler = optuna.samplers.TPESampler(
        seed=config.tune_seed if not existing else mix_seed(config.tune_seed, existing) % 2**32,
        n_startup_trials=max(1, min(10, config.trials // 2)),
    )
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=config.prune_startup_trials, n_warmup_steps=config.prune_warmup_epochs
        )
        if config.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        study_name=STUDY_NAME,
        direction=direction,
        load_if_exists=True,
    )
    settings = to_jsonable(_search_settings(config))
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != settings:
        changed = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
        raise XrayfmError(
            f"{out / STUDY_FILE} holds a study with other settings ({list_offenders(changed)}): "
            "continue it with the same settings, or use another --out"
        )
    return study


def tune(
    config: TuneConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the search until the study holds ``config.trials`` finished trials; write results.

    ``progress`` gets ``{"trial", "done", "total", "params", "epoch", "metrics"}`` after each epoch of a
    trial; ``should_cancel`` stops the running trial (it is recorded as failed) and the search.
    """
    import optuna
    from optuna.trial import TrialState

    config.validate()
    space = parse_space(config.space, config.method)
    out = Path(config.out).resolve()
    study = open_study(config)
    # Trials left "running" by an interrupted search: failed, and their settings are tried again first.
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
        study.enqueue_trial(stale.params, skip_if_exists=False)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done_before = len(study.get_trials(deepcopy=False, states=finished))
    to_run = max(0, config.trials - done_before)
    base = dataclasses.replace(
        config.adapt_config(), cache=config.cache or str(out / "cache" / config.split), resume=False
    )
    cancelled = {"flag": False}
    started = time.perf_counter()

    def objective(trial: Any) -> float:
        proposed = {p.name: p.suggest(trial) for p in space}
        run = trial_dir(out, trial.number)
        trial.set_user_attr("run", str(run))
        pruned = {"flag": False, "epoch": None}

        def on_progress(info: dict[str, Any]) -> None:
            metrics = info.get("metrics") or {}
            # adapt reports after each validation with loss None and the epoch's metrics.
            if info.get("loss") is not None or metrics.get("epoch") != info.get("epoch"):
                return
            value = metrics.get(config.metric)
            if value is not None and math.isfinite(value):
                trial.report(float(value), int(info["epoch"]))
                if trial.should_prune():
                    pruned["flag"], pruned["epoch"] = True, int(info["epoch"])
            if progress is not None:
                done = len(study.get_trials(deepcopy=False, states=finished))
                progress({"trial": trial.number, "done": done, "total": config.trials,
                          "params": proposed, "epoch": info["epoch"], "metrics": metrics})  # fmt: skip

        def stop() -> bool:
            if should_cancel is not None and should_cancel():
                cancelled["flag"] = True
            return pruned["flag"] or cancelled["flag"]

        settings = dataclasses.replace(base, **decode(proposed), out=str(run))
        result = adapt(settings, progress=on_progress, should_cancel=stop)
        for key in ("status", "step", "seconds", "best_metric", "best_epoch"):
            trial.set_user_attr(key, to_jsonable(result.get(key)))
        if result["status"] == "cancelled":
            if cancelled["flag"]:
                raise XrayfmError(f"trial {trial.number} was cancelled")
            raise optuna.TrialPruned(f"pruned after epoch {pruned['epoch']}")
        trial.set_user_attr("best_dir", result["best_dir"])
        if result.get("report"):
            trial.set_user_attr("report_metric", result["report"]["metric"])
            trial.set_user_attr("report_value", to_jsonable(result["report"]["value"]))
        value = result["best_metric"]
        return float("nan") if value is None else float(value)

    if to_run:
        try:
            study.optimize(objective, n_trials=to_run, catch=())
        except XrayfmError:
            if not cancelled["flag"]:
                raise
    result = write_results(study, config, out)
    result |= {
        "trials_before": done_before,
        "trials_run": len(study.get_trials(deepcopy=False, states=finished)) - done_before,
        "cancelled": cancelled["flag"],
        "seconds": time.perf_counter() - started,
    }
    return result


def _importances(study: Any, seed: int) -> tuple[dict[str, float] | None, str | None]:
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"{len(complete)} complete trial(s): importances need at least 2"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        return None, str(exc)
    return {k: float(v) for k, v in values.items()}, None


def write_results(study: Any, config: TuneConfig, out: Path) -> dict[str, Any]:
    """trials.csv, best.json, summary.md and the two plots of ``study``; returns the best trial and paths."""
    from optuna.trial import TrialState

    trials = study.trials
    table = study.trials_dataframe()
    if len(table):
        table["state"] = [t.state.name for t in trials]
    table.to_csv(out / "trials.csv", index=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    complete = [t for t in complete if math.isfinite(t.value)]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    importances, why = _importances(study, config.tune_seed)
    best: dict[str, Any] = {"metric": config.metric, "direction": study.direction.name.lower()}
    if complete:
        pick = min if config.metric == "val_loss" else max
        top = pick(complete, key=lambda t: t.value)
        best |= {
            "number": top.number,
            "value": top.value,
            "params": decode(top.params),
            "run": top.user_attrs.get("run"),
            "checkpoint": top.user_attrs.get("best_dir"),
            "best_epoch": top.user_attrs.get("best_epoch"),
            "report_metric": top.user_attrs.get("report_metric"),
            "report_value": top.user_attrs.get("report_value"),
        }
    history = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "last_intermediate": t.intermediate_values[max(t.intermediate_values)]
            if t.intermediate_values
            else None,
        }
        for t in trials
    ]
    files = {
        "trials": str(out / "trials.csv"),
        "best": str(out / "best.json"),
        "markdown": str(out / "summary.md"),
        "history_plot": str(
            plot_optimization_history(
                history,
                out / "optimization_history.png",
                ylabel=f"validation {config.metric}",
                maximize=config.metric != "val_loss",
            )
        ),
        "importance_plot": str(
            plot_param_importances(importances or {}, out / "param_importances.png", note=why)
        ),
        "study": str(out / STUDY_FILE),
    }
    result = {
        "command": "tune",
        "out": str(out),
        "study": {"name": STUDY_NAME, "storage": f"sqlite:///{out / STUDY_FILE}"},
        "trials": counts,
        "best": best,
        "importances": importances,
        "importances_note": why,
        "files": files,
    }
    atomic_write_json(out / "best.json", {**best, "study": result["study"], "trials": counts})
    (out / "summary.md").write_text(_markdown(result, config, trials))
    return result


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "—" if value is None else str(value)


def _markdown(result: dict[str, Any], config: TuneConfig, trials: list[Any]) -> str:
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    counts, best = result["trials"], result["best"]
    lines = [
        f"# Hyper-parameter search ({config.method}, {config.metric})",
        "",
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed trials; "
        f"TPE seeded with {config.tune_seed}, pruner {config.pruner}. Objective: {config.metric} of each "
        f"trial's best epoch on a patient-level split of `{config.split}` ({config.val_fraction:g} of "
        f"patients, seed {config.split_seed}).",
        "",
        "| Trial | State | " + " | ".join(names) + f" | {config.metric} |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for t in trials:
        params = decode(t.params)
        value = t.value
        if t.state.name == "PRUNED" and t.intermediate_values:
            value = f"{t.intermediate_values[max(t.intermediate_values)]:.4g} (at epoch {max(t.intermediate_values)})"
        cells = [t.number, t.state.name.lower(), *(_fmt(params.get(n)) for n in names), _fmt(value)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    if "number" in best:
        lines.append(
            f"Best: trial {best['number']}, {config.metric} = {best['value']:.4f}; checkpoint "
            f"`{best['checkpoint']}`."
        )
    if result["importances"]:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in result["importances"].items())
        lines.append(f"Parameter importances (fANOVA): {ranked}.")
    elif result["importances_note"]:
        lines.append(f"Parameter importances: not computed ({result['importances_note']}).")
    return "\n".join(lines) + "\n"


def read_best(out: str | Path) -> dict[str, Any]:
    """best.json of a tuning folder (for a worker that publishes the best trial's checkpoint)."""
    best = read_json(Path(out) / "best.json")
    if "checkpoint" not in best:
        raise XrayfmError(f"{out} has no complete trial yet")
    return best


__all__ = [
    "DEFAULT_SPACE",
    "Param",
    "decode",
    "open_study",
    "parse_space",
    "read_best",
    "trial_dir",
    "tune",
    "write_results",
]
