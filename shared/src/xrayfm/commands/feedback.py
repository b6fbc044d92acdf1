"""`xrayfm feedback export`: staff feedback (a stack's XRAYFM_FEEDBACK_DIR) as a label CSV for `adapt`."""

from __future__ import annotations

import argparse

from xrayfm.commands.output import print_json


def cmd_export(args: argparse.Namespace) -> int:
    """Write the CSV (:func:`xrayfm.feedback.export_csv`) and say how many rows it has."""
    from xrayfm.feedback import agreement, export_csv, load_records

    summary = export_csv(args.dir, args.model, args.out)
    rates = {f"{n}/{v}": row for (n, v), row in agreement(load_records(args.dir)).items() if n == args.model}
    summary["agreement"] = rates
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['csv']}: {summary['rows']} images with labels {summary['labels']} "
              f"({summary['without_image']} feedback records had no kept image)")  # fmt: skip
        for version, row in rates.items():
            print(f"  {version}: {row['agree']} agree, {row['disagree']} disagree ({row['agreement']:.0%})")
        print(f"train on it: xrayfm adapt --kind csv --root {summary['csv']} --foundation ... --method lora")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `xrayfm feedback export` to the `xrayfm` parser."""
    p = subparsers.add_parser(
        "feedback",
        help="staff feedback on the stack's answers: export it as a training set",
        description="Staff feedback recorded by the gateway (POST /feedback) in XRAYFM_FEEDBACK_DIR.",
    )
    sub = p.add_subparsers(dest="feedback_command", required=True)
    e = sub.add_parser(
        "export",
        help="the feedback on one model as a label CSV (path + one 1/0 column per label) for adapt",
        description="Write the feedback records of MODEL whose image was kept (XRAYFM_FEEDBACK_KEEP_IMAGES=1) "
        "as a label CSV in the layout `xrayfm adapt --kind csv` reads; the last verdict on an answer wins.",
    )
    e.add_argument("--dir", required=True, help="the feedback folder (the stack's XRAYFM_FEEDBACK_DIR)")
    e.add_argument("--model", required=True, help="the model name (every version of it)")
    e.add_argument("--out", help="where to write the CSV (default DIR/export.csv)")
    e.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    e.set_defaults(func=cmd_export)
