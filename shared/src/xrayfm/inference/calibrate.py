"""Calibrating a binary model to a site: a new checkpoint whose probabilities, threshold and domain gate fit
the site's labelled images (``xrayfm calibrate``; a ``calibrate`` job of the stack).

From the model's UNCALIBRATED probabilities and features of the site's images:

1. keep a patient-level share of the site out for evaluation (or evaluate on separate ``eval_data``);
2. fit the calibration on the rest (:func:`~xrayfm.evaluate.calibration.choose_calibration` for ``auto``);
3. set the operating point by ``rule`` on the calibrated probabilities of that fit part;
4. add the fit part's features to the domain gate (threshold set again on the evaluation part);
5. write a new checkpoint folder: a copy of the model (an adapter's foundation path made absolute),
   ``calibration.json``, ``operating_point.json``, the extended gate, ``meta.json["calibration"]`` (lineage,
   site counts, method, evidence, ECE / Brier / NLL before and after on the evaluation images) and
   ``report/`` (``calibration.json``, ``calibration.md``, ``reliability.png``).

The folder is loaded once before it replaces ``out``, so a broken result never lands there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.data import open_sources
from xrayfm.domain.fitting import split_rows
from xrayfm.domain.gate import GATE_JSON, GATE_TENSORS
from xrayfm.errors import XrayfmError
from xrayfm.evaluate.calibration import (
    CALIBRATION_FILE,
    MIN_IMAGES,
    Calibration,
    choose_calibration,
    ece_with_ci,
    fit_calibration,
    write_calibration,
)
from xrayfm.evaluate.metrics import expected_calibration_error, operating_points, threshold_metrics
from xrayfm.inference import Predictor, load_served_model
from xrayfm.operating_point import FILE as OPERATING_POINT_FILE
from xrayfm.operating_point import write_operating_point
from xrayfm.registry import is_registry_name, resolve_model_ref, store_ref
from xrayfm.train.config import CALIBRATION_METHODS, CalibrateConfig, parse_operating_rule
from xrayfm.utils import atomic_dir, atomic_write, atomic_write_json, read_json, to_jsonable

REPORT_DIR = "report"
# Left out of the copy: the store's facts about the source version, its evaluations (of other
# probabilities), and what this command writes anew.
NOT_COPIED = frozenset({"version.json", "evaluations", REPORT_DIR, CALIBRATION_FILE, OPERATING_POINT_FILE,
                        GATE_JSON, GATE_TENSORS})  # fmt: skip


# ------------------------------------------------------------------------------------------------ the site
def _describe(specs: list[str]) -> str:
    """The data specs in a line short enough for an answer's source (first one and a count beyond 160)."""
    text = ", ".join(specs)
    return text if len(text) <= 160 else f"{specs[0][:120]} and {len(specs) - 1} more"


def _class_column(classes: list[str], label: str | None, model_label: str, spec: str) -> int:
    """The column of the class that is the model's positive label: `label` when given (exact, then
    case-insensitive), else the model's label name matched case-insensitively."""
    wanted = label or model_label
    if label in classes:
        return classes.index(label)
    folded = [c.casefold() for c in classes]
    if wanted.casefold() in folded:
        return folded.index(wanted.casefold())
    raise XrayfmError(
        f"{spec}: no class {wanted!r} among its classes {classes}; name the class that is the model's "
        f"{model_label!r} with label (--label)"
    )


def _load_site(
    specs: list[str], label: str | None, model_label: str
) -> tuple[list[Path], list[str], np.ndarray, dict[str, Any]]:
    """Image paths, patient groups (as ``xrayfm gate`` groups them) and 1/0 labels of the datasets named
    (rows without a label dropped), and the facts: images and class used per source."""
    paths, groups, opened = open_sources(specs)
    counts, columns, ys = {}, {}, []
    for spec, ds in opened:
        k = _class_column(list(ds.pathologies), label, model_label, spec)
        counts[spec], columns[spec] = len(ds.csv), ds.pathologies[k]
        ys.append(np.asarray(ds.labels, dtype=np.float64)[:, k])
    y = np.concatenate(ys)
    keep = ~np.isnan(y)
    facts = {"images": counts, "class": columns, "unlabelled_dropped": int((~keep).sum())}
    rows = np.flatnonzero(keep)
    return [paths[i] for i in rows], [groups[i] for i in rows], y[rows], facts


def _positive(forward: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(features, probabilities [N, L]) -> (features, the positive label's probabilities [N] as float64)."""
    features, probabilities = forward
    return features, probabilities[:, 0].astype(np.float64)


def _check_part(y: np.ndarray, what: str, classes: bool) -> None:
    """Refuse a part with fewer than MIN_IMAGES labelled images or, when `classes`, a single class."""
    if len(y) < MIN_IMAGES:
        raise XrayfmError(
            f"the {what} part has {len(y)} labelled images; calibration needs at least {MIN_IMAGES} "
            "(give more site images, or change eval_fraction)"
        )
    positives = int(y.sum())
    if classes and positives in (0, len(y)):
        only = "positive" if positives else "negative"
        raise XrayfmError(f"the {what} part has one class only (all {len(y)} images {only}): need both")


# --------------------------------------------------------------------------------------------- the steps
def _fit(p: np.ndarray, y: np.ndarray, method: str, seed: int, source: str) -> Calibration:
    if method == "auto":
        return choose_calibration(p, y, seed=seed, source=source)
    return fit_calibration(p, y, method, source=source)


def _served(cal: Calibration, p: np.ndarray) -> np.ndarray:
    """Calibrated probabilities exactly as the served model rounds them (float32)."""
    return cal.apply(p).astype(np.float32).astype(np.float64)


def _compact_evidence(cal: Calibration) -> dict[str, Any]:
    """What decided the method, without the per-fold rows (those are in calibration.json)."""
    ev = cal.evidence
    if not ev:
        return {"rule": f"method {cal.method} given, not chosen"}
    return {
        "rule": ev.get("rule"),
        "chosen": ev.get("chosen"),
        "lowest_nll": ev.get("lowest_nll"),
        "folds": ev.get("folds"),
        "cv_nll_mean": {m: ev["cv"][m]["nll_mean"] for m in ev.get("cv", {})},
        "margins": ev.get("margins"),
    }


def _operating_point(y: np.ndarray, p: np.ndarray, rule: str, n_bootstrap: int, seed: int) -> dict[str, Any]:
    name, level = parse_operating_rule(rule)
    points = operating_points(
        y, p, sensitivity=level or 0.95, specificity=level or 0.95, n_bootstrap=n_bootstrap, seed=seed
    )
    wanted = "youden" if level is None else f"{name}>={level:g}"
    found = [pt for pt in points if pt["rule"] == wanted]
    if not found:
        raise XrayfmError(f"rule {rule!r}: no threshold reaches it on the fit part of the site")
    return found[0]


def _decisions(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    m = threshold_metrics(y, p, threshold)
    return {k: m[k] for k in ("threshold", "sensitivity", "specificity", "confusion")}


def _scores(y: np.ndarray, p: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, Any]:
    s = ece_with_ci(y, p, n_bootstrap=n_bootstrap, seed=seed)
    return {k: s[k] for k in ("ece", "ci_low", "ci_high", "brier", "nll", "n", "n_pos", "n_bins")}


# ---------------------------------------------------------------------------------------------- writing
def _resolve_model(model: str, store: str | Path | None) -> tuple[Path, str | None, str | None]:
    """(folder, store name, store version) of a checkpoint folder, ``xrayfm/<name>`` or
    ``store:NAME/VERSION`` in `store`."""
    folder = resolve_model_ref(model, store).resolve()
    ref = store_ref(model)
    if ref is not None:
        return folder, *ref
    return folder, model if is_registry_name(model) else None, None


def _check_out(out: Path, source: Path) -> None:
    """Refuse an `out` that is, holds or lies in the model folder, or is another non-empty folder."""
    if out == source or source in out.parents or out in source.parents:
        raise XrayfmError(f"out {out} overlaps the model folder {source}: write the new checkpoint elsewhere")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        meta = read_json(out / "meta.json", default={}) if out.is_dir() else {}
        if not (isinstance(meta, dict) and "calibration" in meta):  # an earlier calibrate output is replaced
            raise XrayfmError(f"out {out} exists and is not an earlier calibrated checkpoint: choose another")


def _copy_model(source: Path, target: Path) -> None:
    """The model's files into `target` (an existing empty folder), readable by the services' users."""
    for entry in source.iterdir():
        if entry.name in NOT_COPIED or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(entry, target / entry.name)
    for root, dirs, files in os.walk(target):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)


def _meta(source: Path, calibration: dict[str, Any]) -> dict[str, Any]:
    """The source's meta.json with the foundation path absolute and the calibration's facts added."""
    meta = dict(read_json(source / "meta.json"))
    lineage = meta.get("foundation")
    if isinstance(lineage, dict) and lineage.get("path"):  # relative to the source folder: make it absolute
        meta["foundation"] = {**lineage, "path": str((source / lineage["path"]).resolve())}
    meta["calibration"] = calibration
    return to_jsonable(meta, strict=True, where="meta")


def _markdown(summary: dict[str, Any]) -> str:
    ev, op = summary["evaluation"], summary["operating_point"]
    rows = []
    for name in ("before", "after"):
        s = ev[name]
        rows.append(f"| {name} | {s['ece']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}] | "
                    f"{s['brier']:.4f} | {s['nll']:.4f} |")  # fmt: skip
    site, model = summary["site"], summary["source_model"]
    dec_before, dec_after = op["previous"]["on_eval"], op["on_eval"]
    return "\n".join([
        f"# Calibration of {model['name']} {model['version']}",
        "",
        f"- source model: `{model['model']}` (sha256 {model['sha256'][:16]}...)",
        f"- site: {site['fit_images']} fit images ({site['fit_positives']} positive), "
        f"{site['eval_images']} evaluation images ({site['eval_positives']} positive); {site['evaluation']}",
        f"- method: **{summary['method']}** {summary['params']} ({summary['evidence']['rule']})",
        f"- operating point: {op['threshold']:.4g} ({op['source']})",
        "",
        f"On the {ev['before']['n']} evaluation images (ECE with {ev['before']['n_bins']} bins, 95 % "
        "bootstrap CI):",
        "",
        "| probabilities | ECE [95 % CI] | Brier | NLL |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Decisions there: before (threshold {dec_before['threshold']:.4g}) sensitivity "
        f"{_pct(dec_before['sensitivity'])}, specificity {_pct(dec_before['specificity'])}; after (threshold "
        f"{dec_after['threshold']:.4g}) sensitivity {_pct(dec_after['sensitivity'])}, specificity "
        f"{_pct(dec_after['specificity'])}.",
        "",
        f"Domain gate: {_gate_line(summary['gate'])}.",
        "",
        "![reliability](reliability.png)",
        "",
    ])  # fmt: skip


def _gate_line(gate: dict[str, Any]) -> str:
    if "note" in gate:
        return gate["note"]
    return (f"{gate['method']}, threshold {gate['threshold_before']:.4g} -> {gate['threshold']:.4g} "
            f"({gate['reference_images']} reference images); evaluation images passing "
            f"{_pct(gate['site_pass_rate_before']['eval'])} before, {_pct(gate['eval_pass_rate'])} after "
            "(the new threshold is set on them)")  # fmt: skip


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _write_report(folder: Path, summary: dict[str, Any], curves: dict[str, Any], n: int) -> None:
    from xrayfm.evaluate.plots import plot_reliability

    folder.mkdir()
    atomic_write_json(folder / "calibration.json", to_jsonable(summary))
    atomic_write(folder / "calibration.md", _markdown(summary))
    plot_reliability(curves, folder / "reliability.png", title=f"Reliability on {n} evaluation images")


# ------------------------------------------------------------------------------------------------ the API
def calibrate_checkpoint(
    model: str,
    data: list[str],
    out: str | Path,
    *,
    label: str | None = None,
    method: str = "auto",
    eval_data: list[str] | None = None,
    eval_fraction: float = 0.3,
    rule: str = "youden",
    seed: int = 0,
    store: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Calibrate the one-label `model` (folder, ``xrayfm/<name>`` or ``store:NAME/VERSION`` in `store`) to
    the site's labelled images `data` (``KIND:ROOT[:SPLIT]``) and write the new checkpoint to `out`.

    Returns the summary (also ``meta.json["calibration"]`` and ``report/calibration.json``). XrayfmError,
    naming the problem, for a multi-label model, a label not among a dataset's classes, fewer than 20
    images in the fit or evaluation part, a single class in the fit part, a bad method or rule.
    """
    if method not in CALIBRATION_METHODS:
        raise XrayfmError(f"method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    parse_operating_rule(rule)
    if not eval_data and not 0.0 < eval_fraction < 1.0:
        raise XrayfmError(f"eval_fraction={eval_fraction}: must lie in (0, 1)")
    if not data:
        raise XrayfmError("data: name at least one KIND:ROOT[:SPLIT] of labelled site images")
    folder, name, version = _resolve_model(model, store)
    out = Path(out).resolve()
    _check_out(out, folder)
    served = load_served_model(folder, device, name=name, version=version)
    if len(served.labels) != 1 or served.multiclass:
        raise XrayfmError(
            f"calibration maps one probability: {served.name} has {len(served.labels)} labels "
            f"{served.labels} (multi-label models are not calibrated)"
        )
    previous = {"threshold": served.threshold, "source": served.threshold_source}
    earlier, served.calibration = served.calibration, None  # the raw probabilities are what is calibrated

    # -- the site: fit part and evaluation part, checked before any forward pass
    model_label = served.labels[0]
    paths, groups, y, facts = _load_site(data, label, model_label)
    if eval_data:
        e_paths, _, y_eval, e_facts = _load_site(eval_data, label, model_label)
        fit_rows, evaluation = np.arange(len(paths)), f"evaluated on {_describe(eval_data)}"
    else:
        fit_rows, eval_rows = split_rows(groups, eval_fraction, seed)
        e_paths, y_eval, e_facts = [paths[i] for i in eval_rows], y[eval_rows], None
        evaluation = f"evaluated on {eval_fraction:g} of the site's patients (seed {seed}), not fitted on"
    y_fit = y[fit_rows]
    _check_part(y_fit, "fit", classes=True)
    _check_part(y_eval, "evaluation", classes=False)

    # -- forward passes, calibration, operating point
    predictor = Predictor(served)
    feats, p_all = _positive(predictor.features_of_files(paths, batch_size, progress))
    feat_fit, p_fit = feats[fit_rows], p_all[fit_rows]
    if eval_data:
        feat_eval, p_eval = _positive(predictor.features_of_files(e_paths, batch_size, progress))
    else:
        feat_eval, p_eval = feats[eval_rows], p_all[eval_rows]
    p_before = p_eval if earlier is None else _served(earlier, p_eval)  # as the source model serves them
    site = f"{len(y_fit)} site images of {_describe(data)}"
    cal = _fit(p_fit, y_fit, method, seed, site)
    c_fit, c_eval = _served(cal, p_fit), _served(cal, p_eval)
    point = _operating_point(y_fit, c_fit, rule, n_bootstrap, seed)
    op_source = f"{rule} on {site} (calibrated {cal.method}, {served.name} {served.version})"[:300]

    # -- the domain gate: the site's fit images join its reference, threshold set on the evaluation part
    gate = None
    if served.gate is None:
        gate_facts: dict[str, Any] = {
            "note": "the model has no domain gate: none added (see xrayfm gate fit)"
        }
    else:
        gate = served.gate.extend(feat_fit, feat_eval, f"calibration site {_describe(data)}", c_eval)
        gate_facts = {
            "method": gate.method,
            "threshold_before": served.gate.threshold,
            "threshold": gate.threshold,
            "reference_images": gate.facts.get("reference_images"),
            "site_pass_rate_before": {"fit": served.gate.pass_rate_of(feat_fit),
                                      "eval": served.gate.pass_rate_of(feat_eval)},
            "eval_pass_rate": gate.pass_rate_of(feat_eval),
        }  # fmt: skip

    summary: dict[str, Any] = {
        "source_model": {"model": model, "name": served.name, "version": served.version,
                         "sha256": served.sha256, "path": str(folder)},
        "label": model_label,
        "site": {"data": facts, "eval_data": e_facts, "evaluation": evaluation,
                 "fit_images": len(y_fit), "fit_positives": int(y_fit.sum()),
                 "eval_images": len(y_eval), "eval_positives": int(y_eval.sum())},
        "method": cal.method,
        "params": cal.params,
        "evidence": _compact_evidence(cal),
        "evaluation": {"before": _scores(y_eval, p_before, n_bootstrap, seed),
                       "after": _scores(y_eval, c_eval, n_bootstrap, seed)},
        "operating_point": {"threshold": point["threshold"], "rule": rule, "source": op_source,
                            "sensitivity_fit": point["sensitivity"], "specificity_fit": point["specificity"],
                            "on_eval": _decisions(y_eval, c_eval, point["threshold"]),
                            "previous": {**previous, "on_eval": _decisions(y_eval, p_before, previous["threshold"])}},
        "gate": gate_facts,
        "replaced_calibration": None if earlier is None else earlier.to_dict(),
        "seed": seed,
    }  # fmt: skip
    summary = to_jsonable(summary)
    curves = {
        "before": expected_calibration_error(y_eval, p_before),
        f"after ({cal.method})": expected_calibration_error(y_eval, c_eval),
    }

    # -- the new checkpoint, loaded once before it replaces `out`
    with atomic_dir(out) as tmp:
        _copy_model(folder, tmp)
        atomic_write_json(tmp / "meta.json", _meta(folder, summary))
        write_calibration(tmp, cal)
        write_operating_point(tmp, {"threshold": point["threshold"], "source": op_source, "rule": rule,
                                    "label": model_label, "sensitivity": point["sensitivity"],
                                    "specificity": point["specificity"], "set_by": "xrayfm calibrate"})  # fmt: skip
        if gate is not None:
            gate.save(tmp)
        _write_report(tmp / REPORT_DIR, summary, curves, len(y_eval))
        check = load_served_model(tmp, "cpu")
        if check.calibration is None or check.threshold != point["threshold"]:
            raise XrayfmError(f"the calibrated checkpoint written to {tmp} does not load as written")
    return {**summary, "out": str(out), "report": str(out / REPORT_DIR)}


def calibrate_config(config: CalibrateConfig, store: str | Path | None = None) -> dict[str, Any]:
    """:func:`calibrate_checkpoint` with the settings of a :class:`CalibrateConfig` (the CLI's and a job's)."""
    if not config.out:
        raise XrayfmError("out: the folder of the calibrated checkpoint is required")
    return calibrate_checkpoint(
        config.model, list(config.data), config.out, label=config.label, method=config.method,
        eval_data=list(config.eval_data) if config.eval_data else None, eval_fraction=config.eval_fraction,
        rule=config.rule, seed=config.seed, store=store, device=config.device, batch_size=config.batch_size,
        n_bootstrap=config.n_bootstrap, progress=config.progress_bar,
    )  # fmt: skip


__all__ = ["calibrate_checkpoint", "calibrate_config"]
