"""The domain gate measured on real images: which score separates the model's domain from the rest, and
what the shipped model's gate passes and refuses.

Part 1 (method choice): the shipped pneumonia model's features of its in-domain images (Kermany train,
PneumoniaMNIST) and of out-of-domain sets (MURA humerus, the tibia DICOM, adult chests, synthetic bone
phantoms, generated non-radiographs). Gates of each method are fitted on the same reference and
threshold images (those `xrayfm gate fit` uses for the shipped gate: ``--fit-sources``) and scored against
in-domain *test* images they never saw (PneumoniaMNIST test, 624 images = Kermany's test split at 28 px,
and a patient-level share of Kermany held out of the fit): AUROC (in vs out) per out-of-domain set, and
the in-domain pass rate at each gate's threshold. The model's own energy score and its confidence
(max(p, 1 - p)) are scored too, as the baselines that need no fitting.

Part 2 (what is served): the shipped gate as it is stored, judged through ``ServedModel.judge`` (input
checks + feature score) on every set, as the inference worker does: pass and refusal rates, and the
reasons. Also the time the gate adds per image (p50, the judge alone beside the forward pass).

    .venv/bin/python bench/domain_gate.py --out /tmp/domain-gate      # ~5 minutes on 2 cores

Writes ``results.json`` and ``results.md`` under --out (never into the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from xrayfm.data import open_dataset
from xrayfm.data.images import read_image
from xrayfm.data.synth import synth_bone
from xrayfm.data.synth.nonradiographs import non_radiograph
from xrayfm.domain import DomainGate, InputFacts
from xrayfm.domain.checks import upload_facts
from xrayfm.domain.fitting import split_rows
from xrayfm.inference import Predictor, load_served_model

MODEL = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
# (kind, count) of the 100 generated non-radiographs
NON_RADIOGRAPHS = (
    ("photo", 40),
    ("screenshot", 30),
    ("document", 10),
    ("noise", 10),
    ("blank", 5),
    ("constant", 5),
)


def shared_data() -> Path:
    return Path(
        os.environ.get("XRAYFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
    )


def from_files(paths: list[Path]) -> tuple[list[np.ndarray], list[InputFacts]]:
    """Grey pixels and upload facts of image files, as the gateway reads them."""
    images, facts = [], []
    for path in paths:
        data = path.read_bytes()
        images.append(read_image(data))
        facts.append(upload_facts(data))
    return images, facts


def dataset_files(kind: str, root: Path, split: str | None = None) -> tuple[list[Path], list[str]]:
    ds = open_dataset(kind, root, split=split)
    return [Path(p) for p in ds.csv["path"]], [f"{kind}:{g}" for g in ds.csv["patient_id"]]


def load_sets(data: Path, seed: int) -> dict[str, dict]:
    """Every set: images, facts, groups, and whether it is in domain."""
    sets: dict[str, dict] = {}

    def add(name: str, paths: list[Path], groups: list[str] | None, in_domain: bool, role: str) -> None:
        images, facts = from_files(paths)
        sets[name] = {"images": images, "facts": facts, "groups": groups or [str(i) for i in range(len(paths))],
                      "in_domain": in_domain, "role": role}  # fmt: skip

    kermany, k_groups = dataset_files("folder", data / "kermany-pneumonia/chest_xray/train")
    add("kermany", kermany, k_groups, True, "fit")
    for split in ("train", "val", "test"):
        paths, groups = dataset_files("folder", data / "pneumoniamnist/png", split)
        add(f"pneumoniamnist-{split}", paths, groups, True, "fit" if split != "test" else "test")
    npz = np.load(data / "pneumoniamnist-full/pneumoniamnist.npz")
    full = [np.ascontiguousarray(a) for a in npz["test_images"]]
    sets["pneumoniamnist-full-test"] = {"images": full, "facts": [InputFacts()] * len(full),
                                        "groups": [str(i) for i in range(len(full))], "in_domain": True,
                                        "role": "test"}  # fmt: skip
    mura = data / "mura-humerus-64/MURA-v1.1"
    for split in ("valid", "train"):
        paths, groups = dataset_files("mura", mura, split)
        add(f"mura-humerus-{split}", paths, groups, False, "out")
    dicoms = data / "dicom-radiographs"
    add("tibia-dicom", sorted(dicoms.glob("RG3_*.dcm")), None, False, "out")
    add("adult-chest-dicom", sorted(dicoms.glob("RG1_*.dcm")), None, False, "adult")
    add("mhh-adult-chest", sorted((data / "mhh-covid19-cxr/png").glob("*.png")), None, False, "adult")
    nih, n_groups = dataset_files("nih", data / "nih-cxr14-1000-64")
    add("nih-adult-chest-64", nih, n_groups, False, "adult")
    with tempfile.TemporaryDirectory() as tmp:
        synth_bone(Path(tmp) / "bone", n=200, seed=seed, size=128, progress=False)
        add("bone-phantoms", sorted((Path(tmp) / "bone").rglob("*.jpg")) + sorted((Path(tmp) / "bone").rglob("*.png")),
            None, False, "out")  # fmt: skip
    uploads = [non_radiograph(kind, seed * 1000 + i, fmt="JPEG" if i % 2 else "PNG")
               for kind, count in NON_RADIOGRAPHS for i in range(count)]  # fmt: skip
    sets["non-radiographs"] = {"images": [read_image(u) for u in uploads], "facts": [upload_facts(u) for u in uploads],
                               "groups": [str(i) for i in range(len(uploads))], "in_domain": False, "role": "out"}  # fmt: skip
    return sets


def energy(logits: np.ndarray) -> np.ndarray:
    """Free energy of a one-output sigmoid head (logits [N, 1] read as the two logits 0 and z): -log(1 + e^z);
    higher = less in domain (Liu et al. 2020)."""
    z = logits[:, 0].astype(np.float64)
    return -np.logaddexp(0.0, z)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "domain-gate", help="results folder"
    )
    parser.add_argument("--model", default=MODEL, help="checkpoint folder or shipped model name")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the generated images")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="share of Kermany patients held out of the method comparison's fit, as its test")  # fmt: skip
    parser.add_argument("--pass-rate", type=float, default=0.97, help="the gates' target in-domain pass rate")
    args = parser.parse_args()
    data = shared_data()
    if not data.is_dir():
        raise SystemExit(f"no shared data at {data} (set XRAYFM_SHARED_DATA)")
    args.out.mkdir(parents=True, exist_ok=True)
    served = load_served_model(args.model, "cpu")
    predictor = Predictor(served)
    t0 = time.perf_counter()
    sets = load_sets(data, args.seed)
    print(f"loaded {sum(len(s['images']) for s in sets.values())} images in {time.perf_counter() - t0:.0f} s")
    for s in sets.values():
        s["features"], s["probs"] = predictor.features(s["images"], progress=True)
        s["logits"] = np.log(np.clip(s["probs"], 1e-7, 1 - 1e-7) / np.clip(1 - s["probs"], 1e-7, 1))

    # -- part 1: methods, on one split ------------------------------------------------------------------
    k = sets["kermany"]
    k_fit, k_test = split_rows(k["groups"], args.test_fraction, args.seed)
    k_ref, k_thr = k_fit[split_rows([k["groups"][i] for i in k_fit], 0.1, args.seed + 1)[0]], None
    k_thr = np.setdiff1d(k_fit, k_ref)
    reference = np.concatenate([k["features"][k_ref], sets["pneumoniamnist-train"]["features"]])
    threshold = np.concatenate([k["features"][k_thr], sets["pneumoniamnist-val"]["features"]])
    tests = {
        "kermany-held-out": k["features"][k_test],
        "pneumoniamnist-full-test": sets["pneumoniamnist-full-test"]["features"],
    }
    test_logits = np.concatenate([k["logits"][k_test], sets["pneumoniamnist-full-test"]["logits"]])
    in_test = np.concatenate(list(tests.values()))
    outs = [n for n, s in sets.items() if s["role"] in ("out", "adult")]
    gates = {f"knn k={kk}": DomainGate.fit(reference, threshold, method="knn", k=kk, pass_rate=args.pass_rate)
             for kk in (1, 5, 10, 50)}  # fmt: skip
    gates["mahalanobis"] = DomainGate.fit(
        reference, threshold, method="mahalanobis", pass_rate=args.pass_rate
    )
    comparison = {}
    for name, gate in gates.items():
        row = {f"pass {t}": float(gate.pass_rate_of(f)) for t, f in tests.items()}
        s_in = gate.score(in_test)
        for o in outs:
            s_out = gate.score(sets[o]["features"])
            row[f"auroc {o}"] = float(
                roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])
            )
            row[f"refuse {o}"] = float(np.mean(s_out > gate.threshold))
        comparison[name] = row
    for name, fn in (
        ("energy", energy),
        ("confidence", lambda z: np.maximum(1 / (1 + np.exp(-z[:, 0])), 1 / (1 + np.exp(z[:, 0])))),
    ):
        s_in = fn(test_logits) if name == "energy" else -fn(test_logits)
        row = {}
        for o in outs:
            s_out = fn(sets[o]["logits"]) if name == "energy" else -fn(sets[o]["logits"])
            row[f"auroc {o}"] = float(
                roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])
            )
        comparison[name] = row

    # -- part 2: the shipped gate through ServedModel.judge -----------------------------------------------
    served_rows = {}
    if served.gate is not None:
        for name, s in sets.items():
            verdicts = [
                served.judge(img, f, fa)
                for img, f, fa in zip(s["images"], s["features"], s["facts"], strict=True)
            ]
            reasons: dict[str, int] = {}
            for v in verdicts:
                for r in v.reasons:
                    reasons[r.code] = reasons.get(r.code, 0) + 1
            passed = float(np.mean([v.in_domain for v in verdicts]))
            served_rows[name] = {"images": len(verdicts), "in_domain": s["in_domain"], "role": s["role"],
                                 "passed": passed, "refused": 1 - passed, "reasons": reasons}  # fmt: skip
        sample = sets["pneumoniamnist-full-test"]
        times = []
        for img, f, fa in zip(
            sample["images"][:300], sample["features"][:300], sample["facts"][:300], strict=True
        ):
            t = time.perf_counter()
            served.judge(img, f, fa)
            times.append(1000 * (time.perf_counter() - t))
        on, off = [], []  # the whole predict with the gate and without, interleaved image by image
        for img, fa in zip(sample["images"][:200], sample["facts"][:200], strict=True):
            for judge, out in ((True, on), (False, off)):
                t = time.perf_counter()
                predictor.predict([img], explain_maps=True, judge=judge, facts=[fa])
                out.append(1000 * (time.perf_counter() - t))
        timing = {"judge_p50_ms": float(np.median(times)), "predict_p50_ms": float(np.median(on)),
                  "predict_gate_off_p50_ms": float(np.median(off))}  # fmt: skip
    else:
        timing = {}

    results = {"model": args.model, "gate": served.gate.describe() if served.gate else None,
               "split": {"reference": int(len(reference)), "threshold": int(len(threshold)),
                         **{t: int(len(f)) for t, f in tests.items()}},
               "comparison": comparison, "served": served_rows, "timing": timing}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["# Domain gate", "", f"Model `{args.model}`; splits {results['split']}", "",
             "## Methods: AUROC (in-domain test vs each set) and in-domain pass rate at the threshold", ""]  # fmt: skip
    cols = [f"auroc {o}" for o in outs] + [f"pass {t}" for t in tests]
    lines += [
        "| method | " + " | ".join(c.replace("auroc ", "") for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, row in comparison.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "—" for c in cols) + " |")
    if served_rows:
        lines += ["", "## The shipped gate (input checks + feature score), as served", "",
                  "| set | images | in domain? | passed | refused | reasons |", "|---|---:|---|---:|---:|---|"]  # fmt: skip
        for name, row in served_rows.items():
            lines.append(f"| {name} | {row['images']} | {'yes' if row['in_domain'] else 'no'} | "
                         f"{100 * row['passed']:.1f} % | {100 * row['refused']:.1f} % | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(row['reasons'].items()))} |")  # fmt: skip
        lines += ["", f"The gate's verdict alone: p50 {timing['judge_p50_ms']:.2f} ms per image. One image's "
                      f"predict (torch, rollout), interleaved: p50 {timing['predict_p50_ms']:.1f} ms with the "
                      f"gate, {timing['predict_gate_off_p50_ms']:.1f} ms without."]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
