"""``--method auto``: train lora, full and linear at the same budget, keep the best, retrain it as the run.

Which method adapts a foundation best depends on the task and the number of labels (LoRA at its defaults
sometimes loses to full fine-tuning), so ``auto`` measures it:

1. **Candidates.** lora, full and linear each run as a normal adaptation in ``OUT/auto/<method>/``, with
   the run's settings (epochs, max_steps, batch size, seed, label subsampling...) and each method's own
   learning rate (:data:`~xrayfm.train.config.METHOD_LR`; ``--lr`` is not used). All three validate
   on the same **patient split of the training data** (``val_fraction``, ``split_seed``: no patient on
   both sides), never on the user's own validation split (``val_split`` / ``val_cache``), which therefore
   stays an honest check of the result. They share one training cache and fit no domain gate (they are
   never published).
2. **Choice.** The candidate with the best ``metric`` (mean AUROC, or the lowest val_loss) at its best
   epoch wins; a tie goes to the first of lora, full, linear. A candidate whose metric is undefined
   cannot win.
3. **Result.** The winner is **retrained** in ``OUT`` exactly as ``adapt --method <winner>`` would run
   it, at its learning rate. That is simple and honest: ``OUT/best``, ``report/``, the domain gate and
   ``merged/`` are a normal run's; with a separate validation split the result trains on all of the
   training data (a candidate saw ``1 - val_fraction`` of its patients) and is reported on data the
   choice never saw. Without one, the result validates on the choice split and repeats the winning
   candidate's run (same data, seed and settings): one extra run, kept so that a single code path
   makes what is published.

The choice, ``{"chosen", "metric", "scores", "lr", "split", "runs"}``, is written to
``OUT/auto/choice.json`` and recorded under ``"auto"`` in the returned summary, ``OUT/summary.json`` and
the checkpoint's ``meta.json`` (so a store version published from ``best/`` carries it).

Resume: each candidate folder holds ``candidate.json`` (its settings and, once finished, its score) next
to its ``best/`` and ``summary.json``. A rerun skips a finished candidate whose settings are unchanged,
continues an unfinished one from its ``last/`` state, and retrains one whose settings changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.train.adaptation import run_adaptation
from xrayfm.train.config import METHOD_LR, AdaptConfig
from xrayfm.train.distributed import env_from_environ
from xrayfm.utils import atomic_write_json, read_json, to_jsonable

CANDIDATES = ("lora", "full", "linear")
AUTO_DIR = "auto"
RECORD = "candidate.json"
CHOICE = "choice.json"
FINISHED = ("completed", "early_stopped")
# Settings that do not change what a candidate trains (a rerun may change them and keep its candidates).
_NOT_THE_RUN = ("resume", "progress_bar", "num_workers", "device", "log_every", "tensorboard")

Progress = Callable[[dict[str, Any]], None]


def candidate_dir(out: str | Path, method: str) -> Path:
    """The run folder of one candidate."""
    return Path(out) / AUTO_DIR / method


def candidate_config(config: AdaptConfig, method: str) -> AdaptConfig:
    """The settings of ``method``'s candidate: the run's, at the method's learning rate, validated on a
    patient split of the training data (no separate validation split), on the run's training cache."""
    out = Path(config.out)
    return dataclasses.replace(
        config,
        method=method,
        lr=METHOD_LR[method],
        out=str(candidate_dir(out, method)),
        cache=config.cache or str(out / "cache" / config.split),
        val_split=None,
        val_cache=None,
        merge=False,
        resume=False,
    )


def _settings(config: AdaptConfig) -> dict[str, Any]:
    """What a candidate trains, as JSON (compared with a finished candidate's before reusing it)."""
    return to_jsonable({k: v for k, v in config.to_dict().items() if k not in _NOT_THE_RUN})


def _finished(record: dict[str, Any], settings: dict[str, Any], run: Path) -> bool:
    return (
        record.get("settings") == settings
        and record.get("status") in FINISHED
        and (run / "best" / "meta.json").is_file()
        and (run / "summary.json").is_file()
    )


def choose(scores: dict[str, float | None], metric: str) -> str:
    """The best candidate by ``metric`` (lowest val_loss, else highest); ties go to the earliest of
    :data:`CANDIDATES`. XrayfmError when no candidate has a defined score."""
    defined = {m: s for m, s in scores.items() if s is not None and math.isfinite(s)}
    if not defined:
        raise XrayfmError(
            f"--method auto: no candidate has a {metric} on the choice split (e.g. its validation "
            "patients hold one class only): raise --val-fraction or choose a method"
        )
    sign = -1.0 if metric == "val_loss" else 1.0
    order = {m: i for i, m in enumerate(CANDIDATES)}
    return max(defined, key=lambda m: (sign * defined[m], -order.get(m, len(order))))


def _tagged(progress: Progress | None, tag: dict[str, Any]) -> Progress | None:
    """``progress`` with where auto stands added to every report."""
    if progress is None:
        return None
    return lambda info: progress({**info, "auto": tag})


def _split(data: dict[str, Any]) -> dict[str, Any]:
    """The choice split as a candidate's data description tells it: counts of each side and the seed."""
    keys = ("validation", "val_fraction", "seed", "train", "val")
    return {k: data.get(k) for k in keys}


def adapt_auto(
    config: AdaptConfig, progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Run (or reuse) the candidates, choose, retrain the winner in ``config.out``; returns its summary
    with ``"auto"`` (see the module's docstring). A cancelled candidate or retrain returns a summary with
    status ``cancelled`` (its state is kept: a rerun continues it)."""
    config.validate()
    if config.method != "auto":
        raise XrayfmError(f"adapt_auto is --method auto, not {config.method}")
    out, is_main = Path(config.out), env_from_environ().is_main
    candidates = {m: candidate_config(config, m) for m in CANDIDATES}
    # Every record is read before anything is written (all processes of a torchrun see the same state).
    found = {m: read_json(candidate_dir(out, m) / RECORD, {}) for m in CANDIDATES}
    records: dict[str, dict[str, Any]] = {}
    for i, (method, candidate) in enumerate(candidates.items()):
        run, settings = Path(candidate.out), _settings(candidate)
        if _finished(found[method], settings, run):
            records[method] = found[method]
            continue
        same = found[method].get("settings") == settings  # an interrupted candidate: continue it
        if is_main:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run / RECORD, {"method": method, "settings": settings, "status": "running"})
        tag = {"phase": "candidate", "method": method, "candidate": i + 1, "of": len(CANDIDATES)}
        result = run_adaptation(
            dataclasses.replace(candidate, resume=same),
            _tagged(progress, tag),
            should_cancel,
            gate=False,
        )
        if result["status"] == "cancelled":
            scores = {m: r.get("score") for m, r in records.items()}
            return {**result, "out": str(out), "method": "auto",
                    "auto": {"phase": "candidate", "running": method, "scores": scores}}  # fmt: skip
        records[method] = {
            "method": method,
            "settings": settings,
            "status": result["status"],
            "score": result["best_metric"],
            "best_epoch": result["best_epoch"],
            "run": str(run),
            "split": _split(result["data"]),
            "report": {k: result.get("report", {}).get(k) for k in ("metric", "value")},
        }
        if is_main:
            atomic_write_json(run / RECORD, records[method])

    scores = {m: records[m]["score"] for m in CANDIDATES}
    chosen = choose(scores, config.metric)
    choice = to_jsonable(
        {
            "chosen": chosen,
            "metric": config.metric,
            "scores": scores,
            "lr": {m: METHOD_LR[m] for m in CANDIDATES},
            "split": records[chosen]["split"],
            "runs": {m: records[m]["run"] for m in CANDIDATES},
            "result": "retrained",
        }
    )
    if is_main:
        atomic_write_json(out / AUTO_DIR / CHOICE, choice)
    final = dataclasses.replace(config, method=chosen, lr=METHOD_LR[chosen])
    tag = {"phase": "final", "method": chosen}
    result = run_adaptation(final, _tagged(progress, tag), should_cancel, extra_meta={"auto": choice})
    result["auto"] = choice
    summary_file = out / "summary.json"
    if is_main and summary_file.is_file():  # fit's summary of the run, with the choice beside it
        atomic_write_json(summary_file, {**json.loads(summary_file.read_text()), "auto": choice})
    return result


__all__ = ["AUTO_DIR", "CANDIDATES", "adapt_auto", "candidate_config", "candidate_dir", "choose"]
