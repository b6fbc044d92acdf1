"""GPU serving, in one prepared run (one call on a machine with a GPU, a few minutes):

- the bare model, batched, in bf16 (torch autocast) with and without ``torch.compile``: forward and
  forward + rollout (attention captured on the GPU, rollout maths on the GPU);
- ONNX Runtime with the TensorRT / CUDA providers when the installed onnxruntime has them (the export
  carries the rollout outputs, so rollout runs there too);
- the worker's whole predict() (preprocess + runtime + heatmaps on the image's geometry) at the same batch
  sizes, and its ratio to the bare model;
- the batch size the worker's ``XRAYFM_BATCH_MAX=auto`` would choose there, with the rates it measured.

    .venv/bin/python bench/gpu_serving.py                  # on a GPU: vit_base, batches 1, 8, 32, 64
    .venv/bin/python bench/gpu_serving.py --smoke          # on the CPU: tiny model, tiny sizes (a check)

Prints a Markdown table and the JSON (runs/bench/gpu_serving.json). Every figure is a median over
interleaved repeats after warm-up, with the device synchronised around each timed call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the script runs")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/gpu_serving.json")
    args = parser.parse_args()

    import numpy as np
    import torch

    from xrayfm.explain import predict_with_rollout
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_checkpoint

    if args.smoke:
        device, size, batches, repeats = torch.device("cpu"), 64, [1, 4], 2
        spec = {"name": "vit_tiny_patch16_224", "num_classes": 1, "img_size": size, "depth": 2}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
            return 2
        device, size, repeats = torch.device("cuda"), 224, args.repeats
        batches = [int(b) for b in args.batches.split(",")]
        spec = {"name": args.model, "num_classes": 1, "img_size": size}
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": str(device), "model": spec["name"], "size": size, "rows": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (512, 420), dtype=np.uint8) for _ in range(max(batches))]
    with tempfile.TemporaryDirectory() as tmp:
        meta = {
            "model": spec,
            "labels": ["Abnormal"],
            "preprocessing": {"size": size, "mean": [0.5], "std": [0.25]},
        }
        checkpoint = save_checkpoint(Path(tmp) / "model", create_model(**spec), meta)
        served = load_served_model(checkpoint, device=str(device))
        model = served.model
        predictor = Predictor(served)
        compiled = None
        if not args.no_compile and not args.smoke:
            try:
                compiled = torch.compile(model, mode="max-autotune-no-cudagraphs")
            except Exception as exc:  # noqa: BLE001 (report and go on)
                results["compile_error"] = repr(exc)
        ort_sessions = {}
        try:
            import onnxruntime as ort

            from xrayfm.inference.runtime import cached_onnx, ort_session

            available = ort.get_available_providers()
            results["ort_providers"] = available
            path = cached_onnx(load_served_model(checkpoint, device="cpu"), Path(tmp) / "onnx")
            for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"):
                if provider in available and (provider != "CPUExecutionProvider" or args.smoke):
                    try:
                        ort_sessions[provider] = ort_session(
                            path, providers=[provider, "CPUExecutionProvider"]
                        )
                    except Exception as exc:  # noqa: BLE001
                        results[f"ort_{provider}_error"] = repr(exc)
        except ImportError as exc:
            results["ort_error"] = repr(exc)

        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        for b in batches:
            batch = predictor.preprocess(images[:b])
            paths = {
                "bare_fp32_forward": lambda batch=batch: model(batch),
                "bare_bf16_forward": lambda batch=batch: _amp(autocast, model, batch),
                "bare_bf16_rollout": lambda batch=batch: _amp(autocast, predict_with_rollout, model, batch),
                "worker_predict_fp32_rollout": lambda b=b: predictor.predict(images[:b]),
            }
            if compiled is not None:
                paths["compiled_bf16_forward"] = lambda batch=batch: _amp(autocast, compiled, batch)
            pixels = batch.detach().float().cpu().numpy()
            for provider, session in ort_sessions.items():
                name = provider.replace("ExecutionProvider", "").lower()
                paths[f"ort_{name}_rollout"] = lambda s=session, p=pixels: s.run(
                    ["logits", "rollout"], {"pixels": p}
                )
            samples: dict[str, list[float]] = {name: [] for name in paths}
            with torch.inference_mode():
                for name, fn in list(paths.items()):
                    try:
                        for _ in range(2):
                            fn()
                    except Exception as exc:  # noqa: BLE001 (one path failing must not lose the run)
                        results[f"{name}_error"] = repr(exc)[:500]
                        del paths[name], samples[name]
                for _ in range(repeats):
                    for name, fn in paths.items():
                        samples[name].append(timed(fn, device))
            bare = statistics.median(samples["bare_bf16_rollout"])
            for name, values in samples.items():
                med = statistics.median(values)
                results["rows"].append({
                    "batch": b,
                    "path": name,
                    "median_ms": round(1000 * med, 3),
                    "images_per_s": round(b / med, 1),
                    "vs_bare_bf16_rollout": round(bare / med, 3),
                })  # fmt: skip
        # what the worker's XRAYFM_BATCH_MAX=auto would choose on this device (the image's 16 threads)
        from xrayfm.inference.batching import auto_batch_max

        chosen, rates = auto_batch_max(predictor, 4 if args.smoke else 16, budget_s=10.0)
        results["auto_batch_max"] = {
            "chosen": chosen,
            "images_per_s": {str(b): round(r, 1) for b, r in rates.items()},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['model']} @ {size}px on {results.get('gpu', device)}\n")
    print(
        "| batch | path | median ms | images/s | throughput vs bare bf16 + rollout |\n|---:|---|---:|---:|---:|"
    )
    for r in results["rows"]:
        print(
            f"| {r['batch']} | {r['path']} | {r['median_ms']:.2f} | {r['images_per_s']} | {r['vs_bare_bf16_rollout']} |"
        )
    print(f"\nXRAYFM_BATCH_MAX=auto would choose {results['auto_batch_max']}")
    for key, value in results.items():
        if key.endswith("error"):
            print(f"{key}: {value}")
    print(f"\nwritten: {args.out}")
    return 0


def _amp(autocast, fn, *args):
    with autocast:
        return fn(*args)


if __name__ == "__main__":
    sys.exit(main())
