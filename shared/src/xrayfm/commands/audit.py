"""`xrayfm audit verify` and `xrayfm audit export`: the gateway's audit log (:mod:`xrayfm.audit`)."""

from __future__ import annotations

import argparse
import sys

from xrayfm.commands.output import print_json


def _anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (what ``verify --json`` prints as its head) as a (seq, hash) pair."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise argparse.ArgumentTypeError(
            f"expected SEQ:HASH (a record number and its 64-digit hash), got {text!r}"
        )
    return int(seq), digest.lower()


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the chain; exit 0 when intact, 1 naming the first broken line."""
    from xrayfm.audit import verify

    check = verify(args.path, anchor=args.anchor)
    if args.json:
        print_json(check.to_dict())
    elif check.intact:
        head = check.head
        anchor = (
            f"; head {head['seq']}:{head['hash']} (keep it elsewhere, check with --anchor)" if head else ""
        )
        print(f"{args.path}: intact, {check.records} records{anchor}")
    else:
        print(f"{args.path}: BROKEN after {check.records} good records: {check.problem}", file=sys.stderr)
    return 0 if check.intact else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Print every record of an intact log: as a FHIR Bundle of AuditEvents, or as a JSON array."""
    from xrayfm.audit import fhir_bundle, load

    records = load(args.path)  # refuses a broken log, naming the first broken line
    if args.fhir:
        print(fhir_bundle(records).model_dump_json(indent=2))
    else:
        print_json(records)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `xrayfm audit verify` and `xrayfm audit export` to the `xrayfm` parser."""
    p = subparsers.add_parser(
        "audit",
        help="the gateway's audit log: check its hash chain, export it (FHIR AuditEvents)",
        description="The gateway appends one hash-chained JSON line per admin action and prediction to "
        "XRAYFM_AUDIT_LOG (with a PATH.head sidecar). No patient data: who (a key's hash), what, on which "
        "model or job, and how it ended.",
    )
    sub = p.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser(
        "verify",
        help="check the chain: exit 0 when intact, 1 with the first broken line",
        description="Walk the chain of PATH: an edited, deleted, inserted or moved line, lines deleted from "
        "the start, and lines cut from the end (by PATH.head, and by --anchor) are found. Exit 1 names the "
        "first broken line.",
    )
    v.add_argument("path", metavar="PATH", help="the audit log (the gateway's XRAYFM_AUDIT_LOG)")
    v.add_argument(
        "--anchor",
        type=_anchor,
        metavar="SEQ:HASH",
        help="a head printed earlier and kept elsewhere: the log must still hold that record, unchanged",
    )
    v.add_argument("--json", action="store_true", help="print the result (and the head) as one JSON object")
    v.set_defaults(func=cmd_verify)
    e = sub.add_parser(
        "export",
        help="print the records of an intact log (a FHIR Bundle with --fhir)",
        description="Verify PATH, then print its records on stdout: a JSON array, or with --fhir a FHIR R4B "
        "Bundle (type collection) of AuditEvents, the R4 resource EHRs read. A broken log is refused (exit 1).",
    )
    e.add_argument("path", metavar="PATH", help="the audit log (the gateway's XRAYFM_AUDIT_LOG)")
    e.add_argument("--fhir", action="store_true", help="a FHIR Bundle of AuditEvents (needs fhir.resources)")
    e.set_defaults(func=cmd_export)


__all__ = ["cmd_export", "cmd_verify", "register"]
