"""``--method auto``: train lora, full and linear at the same budget, keep the best, retrain it as the run.

Which method adapts a foundation best depends on the task and the number of labels (LoRA at its defaults
sometimes loses to full fine-tuning), so ``auto`` measures it:

1. **Candidates.** lora, full and linear each run as a normal adaptation in ``OUT/auto/<method>/``, with
   the run's settings (epochs, max_steps, batch size, seed, label subsampling...) and each method's own
   learning rate (:data:`~xrayfm.train.config.METHOD_LR`; ``--lr`` is not used). All three validate
   on the same **patient split of the training data** (``val_fraction``, ``split_seed``: no patient on
   both sides), never on the user's own validation split (``val_split`` / ``val_cache``), which therefore
   stays an honest check of the result. With ``label_fraction`` / ``max_studies`` the choice split comes
   from that share of the labels, like the candidates' training side (no label beyond it is used). They
   share one training cache and fit no domain gate (they are never published).
2. **Choice.** The candidate with the best ``metric`` (mean AUROC, or the lowest val_loss) at its best
   epoch wins; a tie goes to the first of lora, full, linear. A candidate whose metric is undefined
   cannot win. A choice split of a few patients cannot tell the candidates apart, and a choice made on
   its noise does worse than the default on average (docs/foundation.md, "Choosing the LoRA defaults"),
   so when another candidate beats lora, its **lead** is measured: the difference of the two candidates'
   AUROC on the choice split (study AUROC for one label with studies, else mean AUROC; their best
   weights), with a 95 % paired bootstrap CI over patients. When the CI reaches 0 the lead is within
   the split's noise, and lora, the default, is kept; so it is when the split has fewer than 10 patients
   (the bootstrap of a handful says nothing). ``"kept_default"`` says so, and the lead its ``reason``.
   With ``metric val_loss`` the argmax stands.
3. **Result.** The winner is **retrained** in ``OUT`` exactly as ``adapt --method <winner>`` would run
   it, at its learning rate. That is simple and honest: ``OUT/best``, ``report/``, the domain gate and
   ``merged/`` are a normal run's; with a separate validation split the result trains on all of the
   training data (a candidate saw ``1 - val_fraction`` of its patients) and is reported on data the
   choice never saw. Without one, the result validates on the choice split and repeats the winning
   candidate's run (same data, seed and settings): one extra run, kept so that a single code path
   makes what is published.

The choice, ``{"chosen", "best", "lead", "kept_default", "metric", "scores", "lr", "split", "runs"}``,
is written to ``OUT/auto/choice.json`` and recorded under ``"auto"`` in the returned summary,
``OUT/summary.json`` and the checkpoint's ``meta.json`` (so a store version published from ``best/``
carries it).

Resume: each candidate folder holds ``candidate.json`` (its settings and, once finished, its score) next
to its ``best/`` and ``summary.json``. A rerun skips a finished candidate whose settings are unchanged,
continues an unfinished one from its ``last/`` state, and retrains one whose settings changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrayfm.errors import XrayfmError
from xrayfm.evaluate.metrics import paired_auroc_difference
from xrayfm.evaluate.reports import study_level
from xrayfm.train.adaptation import run_adaptation
from xrayfm.train.config import METHOD_LR, AdaptConfig
from xrayfm.train.distributed import env_from_environ
from xrayfm.utils import atomic_write_json, read_json, to_jsonable

CANDIDATES = ("lora", "full", "linear")
DEFAULT = "lora"  # kept unless another candidate's lead is outside the choice split's noise
LEAD_BOOTSTRAP = 2000  # resamples of the lead's CI (a small split: cheap)
MIN_UNITS = 10  # patients (else studies, else images) the choice split needs before a lead can count
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
        report_on="best",
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


def lead(out: str | Path, winner: str, other: str, n_bootstrap: int, seed: int) -> dict[str, Any] | None:
    """``winner``'s lead over ``other`` on the choice split, from their reports' predictions: the AUROC
    difference with its paired bootstrap CI (:func:`~xrayfm.evaluate.metrics.paired_auroc_difference`),
    at study level for one label with studies. None when either candidate has no predictions on the
    same rows."""
    files = [candidate_dir(out, m) / "report" / "predictions.csv" for m in (winner, other)]
    if not all(f.is_file() for f in files):
        return None
    a, b = (pd.read_csv(f) for f in files)
    if "path" not in a or not a["path"].equals(b["path"]):
        return None
    names = [c.removeprefix("label/") for c in a.columns if c.startswith("label/")]
    y = a[[f"label/{n}" for n in names]].to_numpy(np.float64)
    pa, pb = (f[[f"prob/{n}" for n in names]].to_numpy(np.float64) for f in (a, b))
    clusters = a["patient_id"].astype(str).to_numpy() if "patient_id" in a else None
    level = "image"
    if len(names) == 1 and "study_id" in a and not np.isnan(y).any():
        studies = a["study_id"].astype(str).to_numpy()
        ids, ys, qa = study_level(y[:, 0], pa[:, 0], studies)
        qb = study_level(y[:, 0], pb[:, 0], studies)[2]
        if clusters is not None:  # the patient of each study, in study_level's order
            clusters = pd.Series(clusters, index=studies).groupby(level=0).first().reindex(ids).to_numpy()
        y, pa, pb, level = ys[:, None], qa[:, None], qb[:, None], "study"
    result = paired_auroc_difference(y, pa, pb, n_bootstrap=n_bootstrap, seed=seed, clusters=clusters)
    units = len(np.unique(clusters)) if clusters is not None else len(y)
    return {"of": winner, "over": other, "level": level, "units": units, **to_jsonable(result)}


def decide(
    out: Path, scores: dict[str, float | None], config: AdaptConfig
) -> tuple[str, str, dict[str, Any] | None]:
    """(chosen, best by score, the best's lead over the default or None). The default is kept when the
    lead's CI reaches 0, or when the choice split has fewer than :data:`MIN_UNITS` patients (a bootstrap
    over a handful of patients says nothing); the lead then carries the ``reason``."""
    best = choose(scores, config.metric)
    if best == DEFAULT or config.metric == "val_loss" or scores.get(DEFAULT) is None:
        return best, best, None
    margin = lead(out, best, DEFAULT, LEAD_BOOTSTRAP, config.seed)
    if margin is None:
        return best, best, None
    if margin["units"] < MIN_UNITS:
        reason = f"the choice split has {margin['units']} patients, fewer than {MIN_UNITS}: too few to judge"
    elif margin["ci_low"] is None or margin["ci_low"] <= 0:
        reason = "the lead's 95 % CI reaches 0: within the choice split's noise"
    else:
        return best, best, {**margin, "reason": "the lead's 95 % CI is above 0"}
    return DEFAULT, best, {**margin, "reason": reason}


def _agreed_choice(out: Path, scores: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """On a rank other than the main one: the choice the main rank wrote for these scores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        choice = read_json(out / AUTO_DIR / CHOICE, {})
        if choice.get("scores") == to_jsonable(scores):
            return choice
        time.sleep(0.5)
    raise XrayfmError(f"--method auto: the main rank wrote no choice in {out / AUTO_DIR / CHOICE}")


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
    if is_main:  # the lead is read from the main rank's reports; the other ranks take its choice
        chosen, best, margin = decide(out, scores, config)
        choice = to_jsonable(
            {
                "chosen": chosen,
                "best": best,
                "lead": margin,
                "kept_default": chosen != best,
                "metric": config.metric,
                "scores": scores,
                "lr": {m: METHOD_LR[m] for m in CANDIDATES},
                "split": records[chosen]["split"],
                "runs": {m: records[m]["run"] for m in CANDIDATES},
                "result": "retrained",
            }
        )
        atomic_write_json(out / AUTO_DIR / CHOICE, choice)
    else:
        choice = _agreed_choice(out, scores)
        chosen = choice["chosen"]
    final = dataclasses.replace(config, method=chosen, lr=METHOD_LR[chosen])
    tag = {"phase": "final", "method": chosen}
    result = run_adaptation(final, _tagged(progress, tag), should_cancel, extra_meta={"auto": choice})
    result["auto"] = choice
    summary_file = out / "summary.json"
    if is_main and summary_file.is_file():  # fit's summary of the run, with the choice beside it
        atomic_write_json(summary_file, {**json.loads(summary_file.read_text()), "auto": choice})
    return result


__all__ = [
    "AUTO_DIR",
    "CANDIDATES",
    "DEFAULT",
    "MIN_UNITS",
    "adapt_auto",
    "candidate_config",
    "candidate_dir",
    "choose",
    "lead",
]
