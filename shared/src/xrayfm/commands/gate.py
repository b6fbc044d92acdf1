"""`xrayfm gate fit` and `xrayfm gate check`: a model version's domain gate (:mod:`xrayfm.domain`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from xrayfm.commands.output import print_json
from xrayfm.errors import XrayfmError

DATA_HELP = "KIND:ROOT[:SPLIT], e.g. folder:/data/chest_xray/train or mura:/data/MURA-v1.1:valid (repeatable)"


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit the gate on the model's features of the data named, and store it with the model."""
    import numpy as np

    from xrayfm.data import open_sources
    from xrayfm.domain import DeclaredDomain
    from xrayfm.domain.fitting import fit_gate_from_features, split_rows
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.registry import is_registry_name, resolve_model_ref

    folder = resolve_model_ref(args.model, args.store)
    if is_registry_name(args.model) and not args.out:
        raise XrayfmError("a shipped model's folder is part of the package: give --out for its gate")
    out = Path(args.out) if args.out else folder
    predictor = Predictor(load_served_model(folder, args.device))
    paths, groups, opened = open_sources(args.data)
    counts = {spec: len(ds.csv) for spec, ds in opened}
    features, probs = predictor.features_of_files(paths, args.batch_size, progress=not args.json)
    if args.held_out:
        held_paths, held_groups, held_opened = open_sources(args.held_out)
        held_counts = {spec: len(ds.csv) for spec, ds in held_opened}
        held, held_p = predictor.features_of_files(held_paths, args.batch_size, progress=not args.json)
        reference = features
    else:
        ref_rows, held_rows = split_rows(groups, args.held_out_fraction, args.seed)
        reference, held, held_p = features[ref_rows], features[held_rows], probs[held_rows]
        held_groups, held_counts = [groups[i] for i in held_rows], {}
    domain = DeclaredDomain.from_dict(  # normalised as stored: upper case, stripped
        {"description": args.description, "modalities": args.modalities.split(",") if args.modalities else (),
         "body_parts": args.body_parts.split(",") if args.body_parts else (),
         "views": args.views.split(",") if args.views else ()}
    )  # fmt: skip
    gate = fit_gate_from_features(
        reference, held, held_groups, held_p, seed=args.seed, method=args.method, pass_rate=args.pass_rate,
        domain=domain, k=args.k,
        sources={"data": counts, "held_out": held_counts or f"{args.held_out_fraction:g} of the patients"},
    )  # fmt: skip
    path = gate.save(out)
    summary = {"gate": str(path), **gate.describe()}
    summary.pop("reference", None)
    if args.json:
        print_json(summary)
    else:
        print(f"{path}: {gate.method} gate on {len(reference)} images, threshold {gate.threshold:.4g} "
              f"(passes {gate.pass_rate:.0%} of {gate.facts['held_out_images']} held-out images)")  # fmt: skip
        if "validation_pass_rate" in gate.facts:
            print(f"pass rate on {gate.facts['validation_images']} held-out images it was not set on: "
                  f"{gate.facts['validation_pass_rate']:.1%}")  # fmt: skip
        print(f"mean score of the fit's own images {float(np.mean(gate.score(reference))):.4g}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Judge image files (or whole datasets: their share passed, by reason) with the model's gate."""
    from collections import Counter

    from xrayfm.data import open_sources
    from xrayfm.data.images import read_image
    from xrayfm.domain.checks import upload_facts
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.registry import resolve_model_ref

    if not args.images and not args.data:
        raise XrayfmError("give image files, or --data datasets")
    folder = resolve_model_ref(args.model, args.store)
    predictor = Predictor(load_served_model(folder, args.device))

    def judge(paths: list[Path]) -> list[dict[str, Any]]:
        rows = []
        for path in paths:
            data = Path(path).read_bytes()
            [result] = predictor.predict([read_image(data)], explain_maps=False, facts=[upload_facts(data)])
            verdict = result.domain.to_dict()
            rows.append({"image": str(path), **verdict,
                         "prediction": result.prediction if verdict["in_domain"] else None})  # fmt: skip
        return rows

    rows = judge([Path(p) for p in args.images])
    datasets = {}
    for spec in args.data or []:
        judged = judge(open_sources([spec])[0])
        reasons = Counter(r["code"] for row in judged for r in row["reasons"])
        passed = sum(row["in_domain"] for row in judged)
        datasets[spec] = {"images": len(judged), "passed": passed, "pass_rate": round(passed / len(judged), 4),
                          "reasons": dict(sorted(reasons.items()))}  # fmt: skip
    if args.json:
        print_json({"model": str(folder), "images": rows, "datasets": datasets})
    else:
        for row in rows:
            reasons = "; ".join(r["message"] for r in row["reasons"]) or "in domain"
            print(f"{row['image']}: {'IN' if row['in_domain'] else 'OUT'} ({reasons})")
        for spec, d in datasets.items():
            why = ", ".join(f"{k} {v}" for k, v in d["reasons"].items()) or "none refused"
            print(
                f"{spec}: {d['passed']} of {d['images']} in domain ({d['pass_rate']:.1%}); refused for: {why}"
            )
    return 0 if all(r["in_domain"] for r in rows) else 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `xrayfm gate fit` and `xrayfm gate check` to the `xrayfm` parser."""
    from xrayfm.domain.gate import DEFAULT_K, DEFAULT_METHOD, DEFAULT_PASS_RATE, GATE_METHODS

    p = subparsers.add_parser(
        "gate", help="a model's domain gate: which images it can judge",
        description="Every model version has a domain gate: input checks (colour, blank, noise, DICOM header) "
        "and a score of the model's own features against its training images, with a threshold that passes "
        "a stated share of held-out in-domain images. Stored with the model as domain_gate.json + "
        "domain_gate.safetensors.",
    )  # fmt: skip
    sub = p.add_subparsers(dest="gate_command", required=True)
    f = sub.add_parser(
        "fit", help="fit a model's gate from its training images",
        description="Fit MODEL's domain gate on the model's features of --data (its training images) and set "
        "the threshold on held-out in-domain images: --held-out sources, or a patient-level share of --data. "
        "Half of the held-out patients set the threshold; the pass rate on the other half is recorded.",
    )  # fmt: skip
    f.add_argument("model", help="checkpoint folder, shipped model name (xrayfm/...), or store:NAME/VERSION")
    f.add_argument("--data", action="append", required=True, help=f"the model's training images: {DATA_HELP}")
    f.add_argument(
        "--held-out", action="append", help=f"in-domain images not in --data, for the threshold: {DATA_HELP}"
    )
    f.add_argument("--held-out-fraction", type=float, default=0.2,
                   help="without --held-out: the share of --data's patients held out (default 0.2)")  # fmt: skip
    f.add_argument(
        "--method", choices=GATE_METHODS, default=DEFAULT_METHOD, help=f"score (default {DEFAULT_METHOD})"
    )
    f.add_argument("--pass-rate", type=float, default=DEFAULT_PASS_RATE,
                   help=f"share of held-out in-domain images that pass (default {DEFAULT_PASS_RATE})")  # fmt: skip
    f.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"neighbour for --method knn (default {DEFAULT_K})"
    )
    f.add_argument("--description", default="radiographs like the model's training images",
                   help="the model's domain in words (shown when an image is refused)")  # fmt: skip
    f.add_argument(
        "--modalities",
        default="CR,DX",
        help="DICOM Modality values accepted, comma-separated (default CR,DX)",
    )
    f.add_argument(
        "--body-parts", default="", help="DICOM BodyPartExamined values accepted, e.g. CHEST (default any)"
    )
    f.add_argument("--views", default="", help="DICOM ViewPosition values accepted, e.g. AP,PA (default any)")
    f.add_argument("--out", help="folder to write the gate into (default: the model's own folder)")
    f.add_argument("--store", help="the model store, for store:NAME/VERSION")
    f.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    f.add_argument("--seed", type=int, default=0, help="seed of the patient-level splits (default 0)")
    f.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    f.add_argument("--json", action="store_true", help="print the gate's facts as one JSON object")
    f.set_defaults(func=cmd_fit)
    c = sub.add_parser(
        "check", help="judge images with a model's gate",
        description="For each image: in the model's domain or not, and every reason; for each --data "
        "dataset: the share in domain and the reasons. Exit code 3 when any IMAGE is out of domain.",
    )  # fmt: skip
    c.add_argument("model", help="checkpoint folder, shipped model name (xrayfm/...), or store:NAME/VERSION")
    c.add_argument("images", nargs="*", metavar="IMAGE", help="image files (.png, .jpg, .dcm)")
    c.add_argument(
        "--data", action="append", help=f"also judge a whole dataset and print its pass rate: {DATA_HELP}"
    )
    c.add_argument("--store", help="the model store, for store:NAME/VERSION")
    c.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    c.add_argument("--json", action="store_true", help="print the verdicts as one JSON object")
    c.set_defaults(func=cmd_check)


__all__ = ["cmd_check", "cmd_fit", "register"]
