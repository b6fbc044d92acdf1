"""CPU inference runtimes side by side: torch eager vs ONNX Runtime (fp32, int8), rollout included; the
int8 AUROC change on the shipped model's task and on a real validation set; and the worker's footprint
(start-to-ready, RSS).

    .venv/bin/python bench/bench_inference.py --json                     # vit_base, batch 1, rollout
    .venv/bin/python bench/bench_inference.py --model vit_tiny_patch16_224 --batch 8
    .venv/bin/python bench/bench_inference.py --auroc CHECKPOINT         # int8 vs fp32 on MURA valid
    .venv/bin/python bench/bench_inference.py --footprint                # start-to-ready + RSS table
    .venv/bin/python bench/bench_inference.py --json --openvino          # + OpenVINO (a candidate only)

``--json`` also reports ``shipped_int8``: the shipped model (xrayfm/cxr-vit-tiny-mae-pneumonia-lora) exported
as publishing exports it, its image-level AUROC on the PneumoniaMNIST test split (624 images) in torch, ONNX
Runtime fp32 and int8, ``int8_auroc_delta``, and the int8 verdict on its validation split (501 Kermany
images, when ``$XRAYFM_SHARED_DATA/kermany-pneumonia`` is there; ``--no-shipped`` skips it). Its figures,
with the command and machine: docs/performance.md.

Timings: each repeat runs every runtime once on the same preprocessed batch, interleaved, so that load
from other processes hits them alike; the medians are printed. The goal: the best runtime at
least 1.4x faster than torch eager for vit_base at batch 1 on the CPU, rollout included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_checkpoint(folder: Path, model: str, size: int) -> Path:
    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_checkpoint

    spec = {"name": model, "num_classes": 1, "img_size": size}
    meta = {
        "model": spec,
        "labels": ["Abnormal"],
        "preprocessing": {"size": size, "mean": [0.5], "std": [0.25]},
    }
    return save_checkpoint(folder, create_model(**spec), meta)


def real_images(n: int) -> list:
    """CheXpert valid frontal views (grey uint8), else synthetic noise."""
    import numpy as np

    from xrayfm.data.images import read_image

    found = sorted(SHARED.glob("chexpert-small-valid/CheXpert-v1.0-small/valid/*/study1/view1_frontal.jpg"))[
        :n
    ]
    if found:
        return [read_image(p.read_bytes()) for p in found]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (390, 320), dtype=np.uint8) for _ in range(n)]


def openvino_runner(onnx_path: Path, threads: int):
    """OpenVINO's CPU plugin on the worker's exported graph (logits + rollout), held to fp32 (its
    precision hint; it may otherwise pick bf16 on CPUs that have it) with `threads` threads:
    ``run(pixels) -> (logits, rollout)``. Measured as a candidate runtime only; the worker serves torch
    and ONNX Runtime (docs/performance.md says why)."""
    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("--openvino needs OpenVINO: .venv/bin/pip install openvino") from None

    hints = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", hints)
    request = compiled.create_infer_request()

    def run(pixels):
        out = request.infer({"pixels": pixels})
        return out[compiled.output("logits")], out[compiled.output("rollout")]

    return run


def speed(args: argparse.Namespace, cache: Path) -> dict:
    import torch

    from xrayfm.explain import predict_with_rollout
    from xrayfm.inference import load_served_model
    from xrayfm.inference.runtime import OnnxPredictor

    torch.set_num_threads(args.threads)
    checkpoint = make_checkpoint(cache / "model", args.model, args.size)
    served = load_served_model(checkpoint, device="cpu")
    runtimes = {"onnxruntime": OnnxPredictor(served, cache_dir=cache, threads=args.threads)}
    if not args.no_int8:
        runtimes["onnxruntime-int8"] = OnnxPredictor(
            served, cache_dir=cache, quantize="int8", threads=args.threads
        )
    images = real_images(args.batch)
    batch = runtimes["onnxruntime"].preprocess(images)
    paths = {
        "torch_eager_forward": lambda: served.model(batch),
        "torch_eager": lambda: predict_with_rollout(served.model, batch),
        **{name: (lambda p=p: p.run(batch, True, "rollout")) for name, p in runtimes.items()},
    }
    parity = {}
    if args.openvino:
        import numpy as np

        pixels = batch.numpy().astype(np.float32)
        openvino = openvino_runner(runtimes["onnxruntime"].onnx_path, args.threads)
        paths["openvino"] = lambda: openvino(pixels)
        ov_logits, ov_maps = openvino(pixels)
        ort_logits, ort_maps, _, _ = runtimes["onnxruntime"].run(batch, True, "rollout")
        parity["openvino_vs_onnxruntime"] = {
            "max_abs_logit_diff": float(np.abs(ov_logits - ort_logits).max()),
            "rollout_corr": float(np.corrcoef(ov_maps.ravel(), ort_maps.ravel())[0, 1]),
        }
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for _ in range(2):
            for fn in paths.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                samples[name].append(1000 * (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    candidates = {name: ms for name, ms in medians.items() if name.startswith("onnxruntime")}
    best = min(candidates, key=candidates.get)
    return {
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "rollout_included": True,
        "median_ms": {k: round(v, 2) for k, v in medians.items()},
        "torch_eager_ms": round(medians["torch_eager"], 2),
        "best_runtime": best,
        "best_runtime_ms": round(medians[best], 2),
        "speedup": round(medians["torch_eager"] / medians[best], 3),
        "fp32_speedup": round(medians["torch_eager"] / medians["onnxruntime"], 3),
        **parity,
    }


SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"


def shipped_int8(args: argparse.Namespace, cache: Path) -> dict:
    """The shipped model's int8 AUROC change on its task: its graphs exported as publishing exports them
    (with the int8 verdict on its validation split when the Kermany images are in the data folder), then
    torch, fp32 and int8 image-level AUROC on the PneumoniaMNIST test split (624 images, 28 px, through
    the serving path's preprocessing)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.inference.graphs import GRAPH_FILES, version_graphs
    from xrayfm.inference.runtime import OnnxPredictor
    from xrayfm.registry import pretrained_dir

    torch.set_num_threads(args.threads)
    test = np.load(SHARED / "pneumoniamnist-full" / "pneumoniamnist.npz")
    images, labels = list(test["test_images"]), test["test_labels"].reshape(-1).astype(int)
    folder = cache / "shipped"
    folder.mkdir()
    record = version_graphs(pretrained_dir(SHIPPED), folder, (SHARED,))
    served = load_served_model(SHIPPED, device="cpu")
    predictors = {
        "torch": Predictor(served),
        **{
            ("onnxruntime" if q == "none" else f"onnxruntime-{q}"): OnnxPredictor(
                served, quantize=q, threads=args.threads, onnx_path=folder / name
            )
            for q, name in GRAPH_FILES.items()
        },
    }
    scores = {}
    for name, predictor in predictors.items():
        probs = []
        for i in range(0, len(images), 64):
            probs += [r.probability for r in predictor.predict(images[i : i + 64], explain_maps=False)]
        scores[name] = np.asarray(probs)
    auroc = {name: round(float(roc_auc_score(labels, s)), 5) for name, s in scores.items()}
    return {
        "model": SHIPPED,
        "test": f"PneumoniaMNIST test ({SHARED / 'pneumoniamnist-full'}), {len(labels)} images, "
        f"{int(labels.sum())} pneumonia, image-level, 28 px upscaled by the serving preprocessing",
        "test_auroc": auroc,
        "int8_auroc_delta": round(auroc["onnxruntime-int8"] - auroc["onnxruntime"], 5),
        "max_abs_prob_diff_int8": round(
            float(np.abs(scores["onnxruntime-int8"] - scores["onnxruntime"]).max()), 5
        ),
        "validation_verdict": record["int8"],
    }


def mura_valid(root: Path) -> tuple[list[Path], list[int]]:
    rows = (root / "valid_image_paths.csv").read_text().split()
    paths = [root.parent / row.strip() for row in rows if row.strip()]
    return paths, [int("positive" in str(p.parent.name)) for p in paths]


def auroc(args: argparse.Namespace, cache: Path) -> dict:
    """Image-level AUROC on MURA valid: torch fp32, ONNX Runtime fp32 and int8, and the changes."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from xrayfm.data.images import read_image
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.inference.runtime import OnnxPredictor

    torch.set_num_threads(args.threads)
    root = Path(args.mura)
    paths, labels = mura_valid(root)
    images = [read_image(p.read_bytes()) for p in paths]
    served = load_served_model(args.auroc, device="cpu")
    predictors = {
        "torch": Predictor(served),
        "onnxruntime": OnnxPredictor(served, cache_dir=cache),
        "onnxruntime-int8": OnnxPredictor(served, cache_dir=cache, quantize="int8"),
    }
    scores: dict[str, np.ndarray] = {}
    for name, predictor in predictors.items():
        probs = []
        for i in range(0, len(images), 32):
            probs += [r.probability for r in predictor.predict(images[i : i + 32], explain_maps=False)]
        scores[name] = np.asarray(probs)
    out = {name: round(float(roc_auc_score(labels, s)), 5) for name, s in scores.items()}
    return {
        "checkpoint": str(args.auroc),
        "dataset": f"MURA valid ({root}), {len(labels)} images, {sum(labels)} positive, image-level",
        "auroc": out,
        "int8_change": round(out["onnxruntime-int8"] - out["onnxruntime"], 5),
        "fp32_change": round(out["onnxruntime"] - out["torch"], 5),
        "max_abs_prob_diff_fp32": float(np.abs(scores["onnxruntime"] - scores["torch"]).max()),
        "max_abs_prob_diff_int8": float(np.abs(scores["onnxruntime-int8"] - scores["torch"]).max()),
    }


READY_PROBE = r"""
import os, sys, time, json
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from xrayfm.inference import load_served_model
from xrayfm.inference.runtime import make_predictor
import numpy as np
served = load_served_model(sys.argv[1], device="cpu")
runtime, quantize, cache = sys.argv[2], sys.argv[3], sys.argv[4]
p = make_predictor(served, runtime, quantize=quantize, cache_dir=cache, threads=1)
p.predict([np.zeros((64, 64), np.uint8)])
warm = time.perf_counter() - t0
from xrayfm.inference.batching import auto_batch_max  # XRAYFM_BATCH_MAX=auto, the worker's default
batch, _ = auto_batch_max(p, 16, budget_s=10.0)  # at most the image's 16 Celery threads
ready = time.perf_counter() - t0
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
print(json.dumps({"ready_s": ready, "tune_s": ready - warm, "batch": batch, "rss_mb": rss}))
"""


def footprint(args: argparse.Namespace, cache: Path) -> list[dict]:
    """Fresh interpreters doing what the worker does before it says ready: import, load, build the
    runtime (first start: export; later starts: from the cache), warm up, measure its batch size
    (``XRAYFM_BATCH_MAX=auto``). Median of `rounds`."""
    rows = []
    for model in args.footprint_models.split(","):
        checkpoint = make_checkpoint(cache / model, model, 224)
        for runtime, quantize in (("torch", "none"), ("onnxruntime", "none"), ("onnxruntime", "int8")):
            results = []
            # round 0 exports (first start), the rest read the export from the cache
            for _ in range(args.footprint_rounds + 1):
                out = subprocess.run(
                    [sys.executable, "-c", READY_PROBE, str(checkpoint), runtime, quantize, str(cache / "onnx")],
                    capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                )  # fmt: skip
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            later = results[1:] if len(results) > 1 else results
            rows.append({
                "model": model,
                "runtime": runtime if quantize == "none" else f"{runtime}-{quantize}",
                "first_start_s": round(results[0]["ready_s"], 2),
                "ready_s": round(statistics.median(r["ready_s"] for r in later), 2),
                "of_which_auto_batch_s": round(statistics.median(r["tune_s"] for r in later), 2),
                "auto_batch": [r["batch"] for r in results],
                "rss_mb": round(statistics.median(r["rss_mb"] for r in later), 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a slow machine keeps what it measured
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument(
        "--no-shipped", action="store_true", help="skip the shipped model's int8 AUROC change on its task"
    )
    parser.add_argument("--auroc", type=Path, help="a checkpoint trained on MURA: int8 vs fp32 AUROC")
    parser.add_argument("--mura", default=str(SHARED / "mura-humerus-64/MURA-v1.1"))
    parser.add_argument("--footprint", action="store_true", help="start-to-ready and RSS per runtime")
    parser.add_argument("--footprint-models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    parser.add_argument("--footprint-rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also time OpenVINO on the same exported graph (needs `pip install openvino`; not a served runtime)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        if args.auroc:
            result = auroc(args, cache)
        elif args.footprint:
            result = {"footprint": footprint(args, cache)}
        else:
            result = speed(args, cache)
            if not args.no_shipped:
                result["shipped_int8"] = shipped_int8(args, cache)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "footprint" in result:
        print(
            "| model | runtime | first start (export) s | start-to-ready s | of which batch tuning s "
            "| batch chosen (each start) | RSS MB |\n|---|---|---:|---:|---:|---|---:|"
        )
        for r in result["footprint"]:
            print(
                f"| {r['model']} | {r['runtime']} | {r['first_start_s']} | {r['ready_s']} | "
                f"{r['of_which_auto_batch_s']} | {', '.join(map(str, r['auto_batch']))} | {r['rss_mb']} |"
            )
    elif "auroc" in result:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} @ {args.size}px, batch {args.batch}, {args.threads} thread(s), rollout included")
        print("| path | median ms |\n|---|---:|")
        for name, ms in result["median_ms"].items():
            print(f"| {name} | {ms:.1f} |")
        goal = "meets" if result["speedup"] >= 1.4 else "MISSES"
        print(
            f"\nbest: {result['best_runtime']} {result['speedup']:.2f}x torch eager ({goal} the >= 1.4x goal)"
        )
        if "shipped_int8" in result:
            shipped = result["shipped_int8"]
            print(f"\n{shipped['model']} on {shipped['test']}: AUROC {shipped['test_auroc']}, "
                  f"int8 change {shipped['int8_auroc_delta']:+.5f}; on its validation split: "
                  f"{shipped['validation_verdict']['reason']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
