"""Calibration to a site, on real data: which post-hoc method should the shipped pneumonia model use?

The shipped model ``xrayfm/cxr-vit-tiny-mae-pneumonia-lora`` was trained at 64 px on Kermany's train split
with a positive-class weight, so its probabilities need not be calibrated on another "site". Here the site
is PneumoniaMNIST (28 px images, upscaled): a seeded sample of ``--site-n`` labelled images plays the
site's calibration set, every method (temperature, platt, isotonic, and ``auto`` = ``choose_calibration``)
is fitted on it, and all are scored on held-out images: ECE (15 bins) with a 95 % bootstrap CI, Brier, NLL,
AUROC with its CI and sensitivity / specificity at the served threshold 0.5, before and after.

- ``--site-split val`` (default): the sample comes from PneumoniaMNIST *val* and the scores are on the
  full *test* split (624 images). Caveat: MedMNIST's val comes from Kermany's *train* split, so most of
  these images are 28 px copies of images the adapter was trained on (at 64 px).
- ``--site-split test``: the sample comes from *test* (which neither the adapter nor its foundation saw)
  and the scores are on the rest of test: smaller, but independent of training.

The draw is repeated for ``--repeats`` seeds (mean ± std of ECE / NLL after, per method, and how often
``auto`` chose each method) so the choice is not one lucky draw. Probabilities come from
``Predictor.predict`` as the stack serves them (rounded to 6 decimals). AUROC is unchanged by a strictly
increasing map (temperature, platt); isotonic maps are non-decreasing and may tie scores, which can move
AUROC a little.

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/calibration_study.py [--site-split test]

Writes ``results.json``, ``results.md``, ``reliability.png`` (uncalibrated vs. auto) and
``reliability-all.png`` (every method) under ``--out`` (refused inside the repository).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from xrayfm.errors import XrayfmError
from xrayfm.evaluate.calibration import (
    METHODS,
    Calibration,
    choose_calibration,
    ece_with_ci,
    fit_calibration,
)
from xrayfm.evaluate.metrics import auroc_with_ci, expected_calibration_error, threshold_metrics
from xrayfm.evaluate.plots import plot_reliability
from xrayfm.utils import atomic_write, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
MODEL = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
LABEL = "Pneumonia"
ARMS = (*METHODS, "auto")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_data = os.environ.get("XRAYFM_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--data",
        default=default_data,
        help="real-data folder holding pneumoniamnist-full/ (default: %(default)s)",
    )
    parser.add_argument("--model", default=MODEL, help="model to calibrate (default: %(default)s)")
    parser.add_argument(
        "--site-split",
        choices=("val", "test"),
        default="val",
        help="where the site sample is drawn: val (scored on all of test) or test (scored on the rest of "
        "test) (default: %(default)s)",
    )
    parser.add_argument(
        "--site-n", type=int, default=300, help="images in the site sample (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the main site draw (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="site draws (seeds seed..seed+N-1) for mean ± std (default: %(default)s)",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds of auto (default: %(default)s)"
    )
    parser.add_argument(
        "--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default: %(default)s)"
    )
    parser.add_argument("--n-bins", type=int, default=15, help="ECE bins (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per predict call (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        default="/tmp/calibration-study",
        help="output folder, outside the repository (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out == REPO or out.is_relative_to(REPO):
        parser.error(f"--out {out} is inside the repository {REPO}; write results elsewhere")
    if args.site_n < 20 or args.repeats < 1:
        parser.error("--site-n must be at least 20 and --repeats at least 1")
    return args


def predict_probabilities(predictor: Any, images: np.ndarray, batch_size: int, what: str) -> np.ndarray:
    """The served probability of the positive label for each uint8 2-D image, in batches."""
    out = []
    for first in tqdm(range(0, len(images), batch_size), desc=f"predict {what}", unit="batch"):
        batch = [np.ascontiguousarray(img) for img in images[first : first + batch_size]]
        out += [r.probabilities[LABEL] for r in predictor.predict(batch, explain_maps=False)]
    return np.asarray(out, dtype=np.float64)


def score(y: np.ndarray, p: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """ECE with CI, Brier, NLL, AUROC with CI and the decisions at 0.5 of probabilities `p`."""
    ece = ece_with_ci(y, p, n_bins=args.n_bins, n_bootstrap=args.n_bootstrap, seed=0)
    auc = auroc_with_ci(y, p, n_bootstrap=args.n_bootstrap, seed=0)
    at_half = threshold_metrics(y, p, 0.5)
    return {
        "ece": ece["ece"],
        "ece_ci": [ece["ci_low"], ece["ci_high"]],
        "brier": ece["brier"],
        "nll": ece["nll"],
        "auroc": auc["auroc"],
        "auroc_ci": [auc["ci_low"], auc["ci_high"]],
        "sensitivity@0.5": at_half["sensitivity"],
        "specificity@0.5": at_half["specificity"],
        "mean_p": float(p.mean()),
    }


def split_site(pool_n: int, site_n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded site sample of `site_n` from `pool_n`, and of the rest."""
    if site_n >= pool_n:
        raise XrayfmError(f"--site-n {site_n} must be smaller than the pool of {pool_n} images")
    order = np.random.default_rng(seed).permutation(pool_n)
    return np.sort(order[:site_n]), np.sort(order[site_n:])


def fit_arm(
    arm: str, p: np.ndarray, y: np.ndarray, source: str, args: argparse.Namespace, seed: int
) -> Calibration:
    """One arm fitted on the site sample: a named method, or auto (choose_calibration)."""
    if arm == "auto":
        return choose_calibration(p, y, folds=args.folds, seed=seed, source=source)
    return fit_calibration(p, y, arm, source=source)


def draw(
    seed: int, probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], args: argparse.Namespace
) -> dict[str, Any]:
    """Site sample and held-out evaluation set for one seed, with every arm fitted on the sample."""
    pool = args.site_split
    site, rest = split_site(len(probs[pool]), args.site_n, seed)
    p_site, y_site = probs[pool][site], labels[pool][site]
    if pool == "val":
        p_eval, y_eval, eval_name = probs["test"], labels["test"], "PneumoniaMNIST test (all)"
    else:
        p_eval, y_eval = probs["test"][rest], labels["test"][rest]
        eval_name = f"PneumoniaMNIST test minus the site sample ({rest.size})"
    source = f"site sample: {args.site_n} images of pneumoniamnist {pool} (seed {seed})"
    cals = {arm: fit_arm(arm, p_site, y_site, source, args, seed) for arm in ARMS}
    return {
        "seed": seed,
        "site_index": site,
        "p_site": p_site,
        "y_site": y_site,
        "p_eval": p_eval,
        "y_eval": y_eval,
        "eval_name": eval_name,
        "calibrations": cals,
    }


def fmt_ci(value: float | None, ci: list[float | None]) -> str:
    """`value [low, high]` with 3 decimals."""
    if value is None:
        return "—"
    if ci[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def describe(cal: Calibration) -> str:
    """Short text of a calibration's fitted parameters."""
    if cal.method == "temperature":
        return f"T = {cal.params['temperature']:.3f}"
    if cal.method == "platt":
        return f"a = {cal.params['a']:.3f}, b = {cal.params['b']:.3f}"
    return f"{len(cal.params['x'])} breakpoints"


def markdown(results: dict[str, Any]) -> str:
    """results.md: the main table, the site sample's CV evidence and the repeated draws."""
    main = results["main"]
    lines = [
        "# Calibration to a site: the shipped pneumonia model on PneumoniaMNIST",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; {results['wall_s']:.0f} s.  ",
        f"Model: `{results['model']}`. Site sample: {results['site']}; n_pos = {main['site_n_pos']}.  ",
        f"Scored on: {main['eval_name']} ({main['eval_n']} images, {main['eval_n_pos']} pneumonia). "
        f"ECE: {results['n_bins']} equal-width bins; 95 % percentile bootstrap CIs, {results['n_bootstrap']} "
        "resamples. Probabilities as served (rounded to 6 decimals); NLL clips them to [1e-7, 1 - 1e-7].",
        "",
        "| arm | fitted on the site sample | ECE [95 % CI] | Brier | NLL | AUROC [95 % CI] "
        "| sens / spec @ 0.5 | mean p |",
        "|---|---|---|---:|---:|---|---|---:|",
    ]
    for arm, row in main["rows"].items():
        s = row["scores"]
        sens, spec = s["sensitivity@0.5"], s["specificity@0.5"]
        lines.append(
            f"| {arm} | {row['fitted']} | {fmt_ci(s['ece'], s['ece_ci'])} | {s['brier']:.4f} | {s['nll']:.4f} "
            f"| {fmt_ci(s['auroc'], s['auroc_ci'])} | {sens:.3f} / {spec:.3f} | {s['mean_p']:.3f} |"
        )
    lines += [
        "",
        f"Observed pneumonia fraction of the scored set: {main['eval_n_pos'] / main['eval_n']:.3f}. "
        "AUROC is unchanged by temperature and platt (strictly increasing maps); isotonic is non-decreasing "
        "and ties scores within a step, which can move AUROC.",
        "",
        f"## Evidence of `auto` on the site sample ({main['evidence']['folds']}-fold stratified CV, seed "
        f"{main['evidence']['seed']})",
        "",
        f"Rule: {main['evidence']['rule']}. Lowest mean NLL: **{main['evidence']['lowest_nll']}**; "
        f"chosen: **{main['evidence']['chosen']}**.",
        "",
        "| method | CV NLL mean ± std | NLL − lowest (SE) | CV Brier | CV ECE |",
        "|---|---|---|---:|---:|",
    ]
    ev = main["evidence"]
    for name, row in ev["cv"].items():
        margin = ev["margins"].get(name)
        m = f"{margin['nll_minus_lowest']:+.4f} ({margin['standard_error']:.4f})" if margin else "—"
        lines.append(
            f"| {name} | {row['nll_mean']:.4f} ± {row['nll_std']:.4f} | {m} | {row['brier_mean']:.4f} "
            f"| {row['ece_mean']:.4f} |"
        )
    rep = results["repeats"]
    lines += [
        "",
        f"## {len(rep['seeds'])} site draws (seeds {rep['seeds'][0]}..{rep['seeds'][-1]}): after calibration, "
        "mean ± std over draws (uncalibrated: the reference on the same scored sets)",
        "",
        "| arm | ECE | Brier | NLL |",
        "|---|---|---|---|",
    ]
    for arm, row in rep["summary"].items():
        lines.append(
            f"| {arm} | {row['ece_mean']:.4f} ± {row['ece_std']:.4f} | {row['brier_mean']:.4f} ± "
            f"{row['brier_std']:.4f} | {row['nll_mean']:.4f} ± {row['nll_std']:.4f} |"
        )
    chosen = ", ".join(f"{m}: {c}" for m, c in rep["auto_chose"].items() if c)
    lowest = ", ".join(f"{m}: {c}" for m, c in rep["lowest_nll"].items() if c)
    lines += ["", f"`auto` chose — {chosen}. Lowest CV NLL was — {lowest}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Predict, fit every arm on the site draws, score them, write the results and the figures."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    npz = Path(args.data) / "pneumoniamnist-full" / "pneumoniamnist.npz"
    if not npz.is_file():
        raise XrayfmError(f"{npz} not found (set --data or XRAYFM_SHARED_DATA)")
    from xrayfm.inference import Predictor, load_served_model  # torch: only once the arguments are fine

    arrays = np.load(npz)  # plain uint8 arrays; allow_pickle stays False
    predictor = Predictor(load_served_model(args.model, device="cpu"))
    probs, labels = {}, {}
    for split in ("val", "test"):
        labels[split] = arrays[f"{split}_labels"].reshape(-1).astype(np.float64)
        probs[split] = predict_probabilities(predictor, arrays[f"{split}_images"], args.batch_size, split)

    seeds = list(range(args.seed, args.seed + args.repeats))
    draws = [draw(s, probs, labels, args) for s in tqdm(seeds, desc="site draws", unit="draw")]
    first = draws[0]
    y_eval, p_eval = first["y_eval"], first["p_eval"]
    rows: dict[str, Any] = {"uncalibrated": {"fitted": "—", "scores": score(y_eval, p_eval, args)}}
    curves = {"uncalibrated": expected_calibration_error(y_eval, p_eval, args.n_bins)}
    for arm, cal in first["calibrations"].items():
        p_after = cal.apply(p_eval)
        fitted = describe(cal) if arm != "auto" else f"{cal.method}: {describe(cal)}"
        rows[arm] = {"fitted": fitted, "scores": score(y_eval, p_after, args), "calibration": cal.to_dict()}
        curves[arm if arm != "auto" else f"auto ({cal.method})"] = expected_calibration_error(
            y_eval, p_after, args.n_bins
        )

    per_draw = []
    for d in draws:
        arms = {
            "uncalibrated": d["p_eval"],
            **{a: c.apply(d["p_eval"]) for a, c in d["calibrations"].items()},
        }
        for arm, p_after in arms.items():
            ece = ece_with_ci(d["y_eval"], p_after, n_bins=args.n_bins, n_bootstrap=0)
            method = d["calibrations"][arm].method if arm in d["calibrations"] else None
            per_draw.append(
                {
                    "seed": d["seed"],
                    "arm": arm,
                    "method": method,
                    **{m: ece[m] for m in ("ece", "brier", "nll")},
                }
            )
    summary = {}
    for arm in ("uncalibrated", *ARMS):
        vals = [r for r in per_draw if r["arm"] == arm]
        summary[arm] = {
            f"{m}_{stat}": float(fn([v[m] for v in vals]))
            for m in ("ece", "brier", "nll")
            for stat, fn in (("mean", np.mean), ("std", lambda x: np.std(x, ddof=1) if len(x) > 1 else 0.0))
        }
    auto = [d["calibrations"]["auto"] for d in draws]
    results = {
        "command": "OMP_NUM_THREADS=1 nice .venv/bin/python scripts/calibration_study.py"
        + (" " + " ".join(argv) if argv else ""),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch on CPU, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "model": args.model,
        "site": f"{args.site_n} images of pneumoniamnist {args.site_split} (seed {args.seed})",
        "n_bins": args.n_bins,
        "n_bootstrap": args.n_bootstrap,
        "main": {
            "seed": args.seed,
            "site_index": first["site_index"],
            "site_n_pos": int(first["y_site"].sum()),
            "eval_name": first["eval_name"],
            "eval_n": int(y_eval.size),
            "eval_n_pos": int(y_eval.sum()),
            "rows": rows,
            "evidence": first["calibrations"]["auto"].evidence,
        },
        "repeats": {
            "seeds": seeds,
            "per_draw": per_draw,
            "summary": summary,
            "auto_chose": {m: sum(c.method == m for c in auto) for m in METHODS},
            "lowest_nll": {m: sum(c.evidence["lowest_nll"] == m for c in auto) for m in METHODS},
        },
    }
    results["wall_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write(out / "results.md", markdown(results))
    chosen = f"auto ({first['calibrations']['auto'].method})"
    title = f"{args.model.split('/')[-1]} on {first['eval_name']}"
    plot_reliability({k: curves[k] for k in ("uncalibrated", chosen)}, out / "reliability.png", title=title)
    plot_reliability(curves, out / "reliability-all.png", title=title)
    print(markdown(results))
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'reliability.png'}, {out / 'reliability-all.png'}"
    )


if __name__ == "__main__":
    main()
