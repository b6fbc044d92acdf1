"""`xrayfm calibrate`: a binary model calibrated to a site, as a new checkpoint
(:mod:`xrayfm.inference.calibrate`)."""

from __future__ import annotations

import argparse

from xrayfm.commands.gate import DATA_HELP
from xrayfm.commands.output import print_json


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate MODEL on the site's images and write the calibrated checkpoint to --out."""
    from xrayfm.inference.calibrate import calibrate_config
    from xrayfm.train.config import CalibrateConfig

    config = CalibrateConfig.from_dict({
        "model": args.model, "data": args.data, "eval_data": args.eval, "eval_fraction": args.eval_fraction,
        "label": args.label, "method": args.method, "rule": args.rule, "seed": args.seed,
        "n_bootstrap": args.n_bootstrap, "batch_size": args.batch_size, "device": args.device,
        "out": args.out, "progress_bar": not args.json,
    })  # fmt: skip
    summary = calibrate_config(config, store=args.store)
    if args.json:
        print_json(summary)
        return 0
    before, after = summary["evaluation"]["before"], summary["evaluation"]["after"]
    op, site = summary["operating_point"], summary["site"]
    print(f"{summary['out']}: {summary['method']} calibration fitted on {site['fit_images']} images, "
          f"evaluated on {site['eval_images']}")  # fmt: skip
    for name, s in (("before", before), ("after", after)):
        print(f"  {name:6s} ECE {s['ece']:.4f} [95% CI {s['ci_low']:.4f}, {s['ci_high']:.4f}]  "
              f"Brier {s['brier']:.4f}  NLL {s['nll']:.4f}")  # fmt: skip
    print(f"  threshold {op['threshold']:.4g} ({op['source']})")
    print(f"  domain gate: {summary['gate'].get('note') or 'extended with the site images'}")
    print(f"  report: {summary['report']}/calibration.md")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `xrayfm calibrate` to the `xrayfm` parser."""
    from xrayfm.train.config import CALIBRATION_METHODS

    p = subparsers.add_parser(
        "calibrate", help="calibrate a binary model to a site: a new checkpoint",
        description="Fit a probability calibration of MODEL (one label) on a site's labelled images, set its "
        "operating point on the calibrated probabilities, add the site's images to its domain gate, and "
        "write all of it as a NEW checkpoint folder --out with a report (ECE with 95 % CI, Brier, NLL before "
        "and after, on images not fitted on: --eval sets, or a patient-level share of --data).",
    )  # fmt: skip
    p.add_argument("model", help="checkpoint folder, shipped model name (xrayfm/...), or store:NAME/VERSION")
    p.add_argument("--data", action="append", required=True, help=f"the site's labelled images: {DATA_HELP}")
    p.add_argument("--out", required=True, help="folder of the new, calibrated checkpoint")
    p.add_argument("--eval", action="append",
                   help=f"evaluate on these sets instead of a share of --data: {DATA_HELP}")  # fmt: skip
    p.add_argument("--eval-fraction", type=float, default=0.3,
                   help="without --eval: the share of --data's patients kept out for evaluation (default 0.3)")  # fmt: skip
    p.add_argument("--label", help="the dataset class that is the model's label (default: the label's name, "
                   "matched case-insensitively)")  # fmt: skip
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="auto",
                   help="calibration map; auto chooses by cross-validated NLL on the fit part (default auto)")  # fmt: skip
    p.add_argument("--rule", default="youden",
                   help="operating point: youden, sensitivity>=S or specificity>=T (default youden)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the patient split, the cross-validation and the bootstraps (default 0)")  # fmt: skip
    p.add_argument(
        "--n-bootstrap", type=int, default=1000, help="bootstrap resamples of the CIs (default 1000)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--store", help="the model store, for store:NAME/VERSION")
    p.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu, cuda")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_calibrate)


__all__ = ["cmd_calibrate", "register"]
