"""`xrayfm inspect`, `xrayfm prepare` and `xrayfm synth`: thin CLI layers over :mod:`xrayfm.data`."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from xrayfm.commands.output import print_json
from xrayfm.data import DATASET_KINDS

if TYPE_CHECKING:
    from xrayfm.data.base import XrayDataset


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that pick and configure a dataset reader (shared by inspect, prepare and training)."""
    parser.add_argument("kind", choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument(
        "root",
        help="dataset root (CheXpert-v1.0[-small]/, MURA-v1.1/, the NIH folder, a class-folder root) or, "
        "for chexpert and csv, a label CSV file",
    )
    parser.add_argument("--split", help="split to read: train/valid (chexpert, mura), train/test/all (nih)")
    parser.add_argument(
        "--policy",
        help="uncertainty/blank policy: u-ones | u-zeros | u-ignore, per label overrides and blank rule, "
        "e.g. 'u-zeros;Atelectasis=u-ones;Edema=u-ones;blank=mask' (default u-ones, blanks negative)",
    )
    parser.add_argument("--frontal-only", action="store_true", help="chexpert: keep frontal views only")
    parser.add_argument(
        "--body-part",
        action="append",
        dest="body_parts",
        metavar="PART",
        help="mura: keep this body part (XR_HUMERUS or HUMERUS); repeatable",
    )
    parser.add_argument("--path-column", help="csv: column with image paths (default: path)")
    parser.add_argument("--label-columns", help="csv: comma-separated label columns (default: all others)")
    parser.add_argument("--patient-column", help="csv: column with patient ids (for patient-level splits)")


def dataset_from_args(args: argparse.Namespace) -> XrayDataset:
    """Open the dataset the `add_dataset_arguments` options describe."""
    from xrayfm.data import open_dataset

    options: dict[str, Any] = {}
    if args.kind in ("chexpert", "nih", "csv"):
        options["policy"] = args.policy
    if args.kind == "chexpert":
        options["frontal_only"] = args.frontal_only or None
    if args.kind == "mura":
        options["body_parts"] = args.body_parts
    if args.kind == "csv":
        options.update(
            path_column=args.path_column,
            label_columns=args.label_columns.split(",") if args.label_columns else None,
            patient_column=args.patient_column,
        )
    return open_dataset(args.kind, args.root, split=args.split, **options)


# -- inspect ----------------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a dataset's counts (labels, images, patients, studies, groups)."""
    summary = dataset_from_args(args).summary()
    if args.json:
        print_json(summary)
        return 0
    note = "  [SYNTHETIC phantoms, not medical data]" if summary["synthetic"] else ""
    print(f"{summary['dataset']} {summary['split']} at {summary['root']}{note}")
    print(
        f"images {summary['images']:,}   patients {summary['patients']:,}   studies {summary['studies']:,}   "
        f"policy {summary['policy']}"
    )
    for key in ("views", "projections", "body_parts", "sexes", "classes", "study_labels"):
        if key in summary:
            print(f"{key:12s} " + ", ".join(f"{k}: {v:,}" for k, v in summary[key].items()))
    header = f"{'label':28s} {'positive':>9s} {'negative':>9s} {'uncertain':>9s} {'blank':>9s}  | targets: pos / neg / masked"
    print(header)
    print("-" * len(header))
    for name, c in summary["labels"].items():
        t = summary["targets"][name]
        print(
            f"{name:28s} {c['positive']:9,d} {c['negative']:9,d} {c['uncertain']:9,d} {c['blank']:9,d}  |"
            f" {t['positive']:,} / {t['negative']:,} / {t['masked']:,}"
        )
    if summary["skipped"]["total"]:
        print(f"skipped {summary['skipped']['total']:,}: {summary['skipped']['counts']}")
    return 0


# -- prepare ----------------------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    """Build, resume or check the preprocessing cache of a dataset."""
    from xrayfm.data.cache import prepare_cache

    dataset = dataset_from_args(args)
    summary = prepare_cache(
        dataset,
        args.out,
        size=args.size,
        mode=args.mode,
        workers=args.workers,
        strict=args.strict,
        force=args.force,
        progress=not args.json,
    )
    if args.json:
        print_json(summary)
    else:
        print(json.dumps(summary, indent=2, default=str))
        print(f"cache ready: {args.out}")
    return 0


# -- synth ------------------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic phantom dataset."""
    from xrayfm.data.synth import synth_bone, synth_chest

    make = synth_chest if args.kind == "chest" else synth_bone
    summary = make(args.out, n=args.n, seed=args.seed, size=args.size, progress=not args.json)
    if args.json:
        print_json(summary)
    else:
        print(json.dumps(summary, indent=2, default=str))
        print(f"SYNTHETIC {args.kind} phantoms (not medical data) written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data sub-commands to the `xrayfm` parser."""
    p = subparsers.add_parser(
        "inspect",
        help="count labels, images, patients, studies, views and body parts of a dataset",
        description="Read a dataset in its official layout and print per-label counts "
        "(positive / negative / uncertain / blank, and targets after the policy) and group sizes.",
    )
    add_dataset_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (labels: name -> counts)")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "prepare",
        help="decode and resize every image once into a memory-mapped cache",
        description="Build (or resume, or check) the preprocessing cache: a uint8 memmap of SIZE x SIZE images, "
        "raw labels and a manifest. A second run on an unchanged source is a no-op; a changed source is refused.",
    )
    add_dataset_arguments(p)
    p.add_argument("--out", required=True, help="cache folder to create or resume")
    p.add_argument("--size", type=int, default=224, help="square side in pixels (default 224)")
    p.add_argument(
        "--mode",
        choices=("pad", "crop", "stretch"),
        default="pad",
        help="fit to a square: pad keeps the whole image (default), crop cuts the long side",
    )
    p.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
    p.add_argument(
        "--strict", action="store_true", help="fail on any missing/unreadable image instead of skipping"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if an existing cache does not match")
    p.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object, no progress bar"
    )
    p.set_defaults(func=cmd_prepare)

    p = subparsers.add_parser(
        "synth",
        help="generate SYNTHETIC phantom radiographs with ground-truth masks",
        description="Seeded procedural chest (CheXpert layout) or bone (MURA layout) phantoms with findings "
        "and a mask per finding. They are synthetic, not medical data.",
    )
    p.add_argument("kind", choices=("chest", "bone"), help="chest: CheXpert layout; bone: MURA layout")
    p.add_argument("--out", required=True, help="dataset root to write")
    p.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_synth)
