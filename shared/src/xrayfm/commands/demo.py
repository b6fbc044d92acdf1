"""`xrayfm demo --out DIR`: the whole chain on SYNTHETIC phantoms (see :mod:`xrayfm.train.demo`)."""

from __future__ import annotations

import argparse
import dataclasses


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (:func:`xrayfm.train.demo.run_demo`) and print where its report is."""
    from xrayfm.train.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings = dataclasses.replace(settings, seed=args.seed)
    summary = run_demo(args.out, settings)
    print(f"demo finished in {summary['seconds']} s (SYNTHETIC data)")
    print(f"report: {summary['report']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `xrayfm demo` to the `xrayfm` parser."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole chain on SYNTHETIC phantoms (a few minutes on a CPU)",
        description="Generate synthetic chest and bone phantoms, pre-train a small ViT on the chest images, "
        "adapt it with LoRA (and a linear probe) to the bone images, evaluate, and write DEMO_REPORT.md. "
        "The data are synthetic: the numbers say nothing about real radiographs.",
    )
    p.add_argument("--out", required=True, help="folder for data, caches, runs and DEMO_REPORT.md")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the training runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the chain in seconds")
    p.set_defaults(func=cmd_demo)
