"""/predict latency through the stack (gateway + Redis/Celery + worker) vs. the bare in-process
forward + rollout of the same image, side by side on this machine; then throughput under concurrency
with and without worker-side batching.

    .venv/bin/python bench/bench_predict.py [--model vit_tiny_patch16_224] [--requests 40] [--seconds 8]

Prints a Markdown table and writes runs/bench/bench_predict.json. The goal: the stack adds at
most 25% to the bare forward + rollout at p50 (CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from tqdm import tqdm

from xrayfm_local import launcher as stack_lib

REPO = Path(__file__).resolve().parents[1]


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds."""
    arr = np.asarray(samples) * 1000
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
    }


def bench_image(shared: Path) -> tuple[str, bytes]:
    """A real chest radiograph when ../shared/data is there, else a synthetic grey PNG."""
    found = sorted(shared.glob("chexpert-small-valid/CheXpert-v1.0-small/valid/*/study1/view1_frontal.jpg"))
    if found:
        return found[0].name, found[0].read_bytes()
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (390, 320), dtype=np.uint8)).save(buf, format="PNG")
    return "synthetic.png", buf.getvalue()


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


def stack_env(redis_port: int, checkpoint: Path, threads: int) -> dict[str, str]:
    """The environment of a private benchmark stack: its own Redis and queue, the checkpoint, no worker
    metrics port, `threads` torch threads, and OpenMP threads that sleep when idle."""
    return {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"bench-{uuid.uuid4().hex[:6]}",
        "XRAYFM_MODEL_PATH": str(checkpoint),
        "XRAYFM_WORKER_METRICS_PORT": "0",
        "XRAYFM_TORCH_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds used so far by each named process."""
    return {key: sum(proc.cpu_times()[:2]) for key, proc in processes.items()}


def side_by_side(
    checkpoint: Path, url: str, name: str, data: bytes, n: int, transport_side: int, pids: dict[str, int]
) -> dict:
    """Interleaved, one request at a time: the bare forward + rollout of the preprocessed tensor, the
    worker's whole predict() in this process, and /predict through the stack, so that load from other
    processes on the machine hits the three alike. Also the CPU time each stack process (`pids`) spent
    per /predict, read around each request: on a small machine that CPU is latency (and caps throughput)."""
    from xrayfm.data.images import read_image
    from xrayfm.explain import predict_with_rollout
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm_gateway.uploads import fit_within

    served = load_served_model(checkpoint, device="cpu", name="bench", version="1")
    predictor = Predictor(served)
    image = fit_within(read_image(data), transport_side)
    batch = predictor.preprocess([image])
    samples: dict[str, list[float]] = {
        "bare_forward_rollout": [],
        "worker_predict_in_process": [],
        "stack_predict": [],
    }
    stages: dict[str, list[float]] = {}  # the answers' own timings: where the stack's time went
    processes = {key: psutil.Process(pid) for key, pid in pids.items()}
    cpu_used = dict.fromkeys(pids, 0.0)
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(3):  # warm-up of every path
            predict_with_rollout(served.model, batch)
            predictor.predict([image])
            http.post("/predict", files={"file": (name, data)}).raise_for_status()
        for _ in tqdm(range(n), desc="side by side", leave=False):
            start = time.perf_counter()
            predict_with_rollout(served.model, batch)
            samples["bare_forward_rollout"].append(time.perf_counter() - start)
            start = time.perf_counter()
            predictor.predict([image])
            samples["worker_predict_in_process"].append(time.perf_counter() - start)
            before = cpu_seconds(processes)
            start = time.perf_counter()
            resp = http.post("/predict", files={"file": (name, data)})
            samples["stack_predict"].append(time.perf_counter() - start)
            after = cpu_seconds(processes)
            cpu_used = {key: cpu_used[key] + after[key] - before[key] for key in cpu_used}
            resp.raise_for_status()
            for stage, ms in resp.json()["timings"].items():
                stages.setdefault(stage, []).append(ms)
    results: dict = {key: percentiles(values) for key, values in samples.items()}
    results["stack_stages_p50_ms"] = {stage: float(np.median(ms)) for stage, ms in sorted(stages.items())}
    results["stack_cpu_ms_per_request"] = {key: 1000 * used / n for key, used in cpu_used.items()}
    return results


def throughput(url: str, name: str, data: bytes, clients: int, seconds: float) -> dict[str, float]:
    """Requests per second with `clients` concurrent callers for `seconds`; mean batch size seen."""
    done, batches, errors = [0] * clients, [], []
    stop = threading.Event()

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                resp = http.post("/predict", files={"file": (name, data)})
                if resp.status_code != 200:
                    errors.append(resp.status_code)
                    continue
                done[i] += 1
                batches.append(resp.json()["batch_size"])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.perf_counter() - start
    return {
        "requests_per_s": sum(done) / elapsed,
        "mean_batch_size": statistics.fmean(batches) if batches else 0.0,
        "errors": len(errors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the worker")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/bench_predict.json")
    args = parser.parse_args()

    name, data = bench_image(REPO.parent / "shared" / "data")
    # The same thread count in both processes; 1 by default so that neither process's idle OpenMP
    # threads spin on the cores the other one is measuring on (that distorts a 2-core machine badly).
    threads = args.threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "model", args.model, args.size)
        redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
        env = stack_env(redis_port, checkpoint, threads)  # the same threads as the in-process measurement
        launcher = stack_lib.Stack(Path(tmp) / "stack", env=env)
        url = f"http://127.0.0.1:{gateway_port}"
        results: dict = {
            "model": args.model,
            "size": args.size,
            "image": name,
            "torch_threads": threads,
        }
        try:
            redis_proc = launcher.start_redis(redis_port)
            gateway = launcher.start_gateway(gateway_port)
            for batch_max in (8, 1):
                worker = launcher.start_worker(
                    f"w{batch_max}", extra_env={"XRAYFM_BATCH_MAX": str(batch_max)}
                )
                stack_lib.wait_until(
                    lambda: stack_lib.http_json(f"{url}/ready")[0] == 200, 180, "/ready", worker
                )
                if batch_max == 8:
                    results.update(
                        side_by_side(
                            checkpoint,
                            url,
                            name,
                            data,
                            args.requests,
                            transport_side=512,
                            pids={"gateway": gateway.pid, "worker": worker.pid, "redis": redis_proc.pid},
                        )  # fmt: skip
                    )
                key = "batching" if batch_max > 1 else "no_batching"
                results[f"throughput_{key}"] = throughput(url, name, data, args.clients, args.seconds)
                launcher.stop(worker)
        finally:
            launcher.stop_all()
    bare, stack_p = results["bare_forward_rollout"], results["stack_predict"]
    results["stack_over_bare_p50"] = stack_p["p50_ms"] / bare["p50_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    print(f"\n{args.model} @ {args.size}px, image {name}, CPU, torch threads {threads}\n")
    print("| path | p50 ms | p95 ms |\n|---|---|---|")
    for key in ("bare_forward_rollout", "worker_predict_in_process", "stack_predict"):
        print(f"| {key} | {results[key]['p50_ms']:.1f} | {results[key]['p95_ms']:.1f} |")
    stages = ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in results["stack_stages_p50_ms"].items())
    print(f"\nstack stages, p50 ms (the answers' timings): {stages}")
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in results["stack_cpu_ms_per_request"].items())
    print(f"CPU ms per /predict, by process: {cpu}")
    goal = "meets" if results["stack_over_bare_p50"] <= 1.25 else "MISSES"
    print(f"\nstack / bare at p50: {results['stack_over_bare_p50']:.2f}x ({goal} the <= 1.25x goal)")
    for key in ("batching", "no_batching"):
        t = results[f"throughput_{key}"]
        print(
            f"throughput, {args.clients} clients, {key.replace('_', ' ')}: {t['requests_per_s']:.1f} req/s "
            f"(mean batch {t['mean_batch_size']:.2f}, errors {t['errors']})"
        )
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
