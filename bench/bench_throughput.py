"""Throughput under load: N concurrent clients posting real radiographs to /predict on a running stack
(Redis, one inference worker, the gateway), side by side with the bare model in-process at its best batch.

    .venv/bin/python bench/bench_throughput.py --smoke                        # tiny model, 2 s steps, N=1,4
    .venv/bin/python bench/bench_throughput.py --runtime onnxruntime --quantize int8   # vit_tiny @ 224
    .venv/bin/python bench/bench_throughput.py --runtime torch --clients 1,16 --seconds 30 --json
    .venv/bin/python bench/bench_throughput.py --url http://127.0.0.1:8000 --api-key KEY \
        --checkpoint xrayfm/cxr-vit-tiny-mae-pneumonia-lora --runtime torch --threads 2   # a running stack

What it does, in one run:

1. starts a private stack like `bench/bench_predict.py` (`xrayfm_local.launcher.Stack`): redis-server, one
   inference worker (`XRAYFM_RUNTIME` / `XRAYFM_QUANTIZE` from the flags, `XRAYFM_BATCH_MAX`,
   `XRAYFM_BATCH_WAIT_MS`, `--concurrency` Celery threads) and the gateway, with a random-init
   checkpoint of `--model` (default `vit_tiny_patch16_224`, all 12 blocks, 224 px, one label: a
   realistic small serving model; the weights do not change the speed);
2. the bare model in the bench process, with the worker's runtime and threads: preprocessed batch ->
   logits + rollout maps (`Predictor.run`, what the worker's batch costs without decoding, queueing,
   packing the maps or HTTP), at batch 1, 2, 4, 8, 16, 32 once; the best images/s is the reference;
3. for each N in `--clients`: N asyncio clients post the images in turn for `--seconds` (the first
   quarter, at most 3 s, is warm-up and not counted), then the bare model again at its best batch for a
   few seconds, so each step has a bare figure measured next to it. Per step: images/s, p50/p99 latency,
   errors, the batch sizes the worker formed (`xrayfm_worker_batch_size` from the worker's Prometheus
   endpoint, before/after), the worker's busy share (`xrayfm_worker_inference_seconds`), and the ratio to
   the bare batched throughput (adjacent and from the sweep).

With ``--url`` it drives a stack that runs already (``make up``, Docker Compose) instead of step 1, and
measures the bare model from ``--checkpoint`` (give ``--runtime``, ``--quantize`` and ``--threads`` as
the deployment's worker runs); the worker's batches and busy share need ``--worker-metrics``.

Images: CheXpert v1.0-small valid JPEGs from `$XRAYFM_SHARED_DATA` or ../shared/data; generated chest
phantoms (`xrayfm.data.synth`) when that is absent. Client, gateway, Redis and worker share this
machine's cores (the clients' CPU counts against the stack), while the bare model runs alone: on a small
machine this is a pessimistic setting for the stack. The goal: >= 70% of the bare batched
throughput at 16 clients and more, on CPU with the best runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xrayfm_local import launcher as stack_lib

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.70  # of the bare batched throughput, at GOAL_CLIENTS clients and more
GOAL_CLIENTS = 16
BUCKETS = ("1", "2", "4", "8", "16", "32", "64")  # xrayfm_worker_batch_size's upper bounds


def shared_data_dir() -> Path:
    """$XRAYFM_SHARED_DATA, else ../shared/data next to the repository (as tests/helpers.py)."""
    return Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_images(n: int, tmp: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """Up to `n` real CheXpert valid JPEGs (frontal and lateral), else `n` generated chest phantoms."""
    root = shared_data_dir() / "chexpert-small-valid/CheXpert-v1.0-small/valid"
    found = sorted(root.glob("*/study*/view*.jpg"))[:n]
    if found:
        return f"CheXpert-v1.0-small valid ({root})", [(p.name, p.read_bytes()) for p in found]
    from xrayfm.data.synth import synth_chest

    synth_chest(tmp / "phantoms", n=max(n, 10), size=320, valid_fraction=0.5, progress=False)
    found = sorted((tmp / "phantoms").rglob("*.jpg"))[:n]
    return "generated chest phantoms (no shared data found)", [(p.name, p.read_bytes()) for p in found]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile


@contextlib.contextmanager
def on_cpus(cpus: set[int]) -> Iterator[None]:
    """Run this thread (the bare model: 1 thread, on the calling thread) on `cpus` for a while."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def make_checkpoint(folder: Path, model: str, size: int, depth: int | None) -> Path:
    from xrayfm.models.backbones import create_model
    from xrayfm.models.checkpoint import save_checkpoint

    spec = {"name": model, "num_classes": 1, "img_size": size}
    if depth:
        spec["depth"] = depth
    meta = {
        "model": spec,
        "labels": ["Abnormal"],
        "preprocessing": {"size": size, "mean": [0.5], "std": [0.25]},
    }
    return save_checkpoint(folder, create_model(**spec), meta)


# -- the worker's Prometheus endpoint ------------------------------------------------------------------

_SAMPLE = re.compile(r'^(xrayfm_worker_\w+?)(?:\{le="([^"]+)"\})?\s+([0-9.eE+-]+)$')


def scrape(url: str | None) -> dict[str, float]:
    """The worker's batch-size histogram (buckets, sum, count) and inference seconds, as flat keys ({}
    without a URL: a stack whose worker metrics this machine cannot reach)."""
    if url is None:
        return {}
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name, le, value = m.groups()
        if name == "xrayfm_worker_batch_size_bucket" and le is not None:
            out[f"le_{le.removesuffix('.0')}"] = float(value)
        elif name in (
            "xrayfm_worker_batch_size_sum",
            "xrayfm_worker_batch_size_count",
            "xrayfm_worker_inference_seconds_sum",
        ):
            out[name] = float(value)
    return out


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict:
    """Batches formed between two scrapes: count per size range, mean size."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    counts, below, low = {}, 0.0, 1
    for bound in BUCKETS:
        cumulative = diff.get(f"le_{bound}", 0.0)
        label = bound if int(bound) == low else f"{low}-{bound}"
        if cumulative - below:
            counts[label] = int(round(cumulative - below))
        below, low = cumulative, int(bound) + 1
    n = diff.get("xrayfm_worker_batch_size_count", 0.0)
    return {
        "batches": int(n),
        "mean": round(diff.get("xrayfm_worker_batch_size_sum", 0.0) / n, 2) if n else 0.0,
        "histogram": counts,
        "inference_s": diff.get("xrayfm_worker_inference_seconds_sum", 0.0),
    }


# -- the bare model ------------------------------------------------------------------------------------


def worker_batch_rate(predictor, images: list[np.ndarray], seconds: float) -> float:
    """Images/s of what the worker runs per batch, in-process: preprocess, logits + rollout, each map
    packed for the wire (``xrayfm_inference.worker._run_batch`` and ``_answer`` without the answer
    objects; the gateway draws the PNGs)."""
    import torch

    from xrayfm_stack.protocol import ModelMap

    pre = predictor.served.preprocessing

    def once() -> None:
        for r in predictor.predict(images, explain_maps=True, method="rollout", draw=False):
            ModelMap.from_array(r.model_map, pre.size, pre.mode, (256, 256))

    with torch.inference_mode():
        once()
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds:
            once()
            runs += 1
    return runs * len(images) / (time.perf_counter() - start)


# -- the clients ---------------------------------------------------------------------------------------


async def drive(
    url: str, images: list[tuple[str, bytes]], clients: int, seconds: float, headers: dict | None = None
) -> dict:
    """`clients` callers post in turn for `seconds`; the first quarter (at most 3 s) is warm-up.
    Throughput counts answers finished inside the measured window; latencies are those of requests
    started inside it (the ones still running at the end are awaited)."""
    import httpx

    warmup = min(3.0, seconds / 4)
    t0 = time.perf_counter()
    t_warm, t_end = t0 + warmup, t0 + seconds
    finished_in_window, latencies, errors, stages = [0], [], {}, []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = i
        while time.perf_counter() < t_end:
            name, data = images[k % len(images)]
            k += clients
            start = time.perf_counter()
            try:
                resp = await http.post("/predict", files={"file": (name, data)})
                status = resp.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            end = time.perf_counter()
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                continue
            if t_warm <= end <= t_end:
                finished_in_window[0] += 1
            if start >= t_warm:
                latencies.append(end - start)
                answer = resp.json()
                stages.append((answer.get("timings", {}), answer.get("batch_size") or 1))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    drained = time.perf_counter() - t0
    window = seconds - warmup
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    per_image = {}  # the worker's batch stages per image, gateway decode and queue wait per request
    for key in ("preprocess_ms", "inference_ms", "postprocess_ms"):
        values = [t[key] / b for t, b in stages if key in t]
        per_image[key.replace("_ms", "_ms_per_image")] = (
            round(statistics.median(values), 1) if values else None
        )
    for key in ("decode_ms", "queue_wait_ms", "worker_ms", "render_ms"):
        values = [t[key] for t, _ in stages if key in t]
        per_image[key] = round(statistics.median(values), 1) if values else None
    return {
        "clients": clients,
        "stage_medians": per_image,
        "window_s": round(window, 2),
        "step_s": round(drained, 2),
        "images_per_s": finished_in_window[0] / window,
        "answers": finished_in_window[0],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


# -- the stack under test -------------------------------------------------------------------------------


@contextlib.contextmanager
def private_stack(
    args: argparse.Namespace, tmp: Path, checkpoint: Path, quantize: str, result: dict
) -> Iterator[tuple[str, str, set[int]]]:
    """Redis, the gateway and one worker serving `checkpoint`, started here (pinned with ``--pin``);
    yields (gateway URL, worker metrics URL, the worker's CPUs), and stops them afterwards."""
    redis_port, gateway_port, metrics_port = (stack_lib.free_port() for _ in range(3))
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"bench-{uuid.uuid4().hex[:6]}",
        "XRAYFM_MODEL_PATH": str(checkpoint),
        "XRAYFM_WORKER_METRICS_PORT": str(metrics_port),
        "XRAYFM_WORKER_METRICS_ADDR": "127.0.0.1",
        "XRAYFM_TORCH_THREADS": str(args.threads),
        "XRAYFM_RUNTIME": args.runtime,
        "XRAYFM_QUANTIZE": quantize,
        "XRAYFM_RUNTIME_CACHE": str(tmp / "onnx"),
        "XRAYFM_MODEL_POLL_S": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    if args.batch_max is not None:
        env["XRAYFM_BATCH_MAX"] = str(args.batch_max)
    if args.batch_wait_ms is not None:
        env["XRAYFM_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
    env["XRAYFM_GATEWAY_WORKERS"] = str(args.gateway_workers)
    launcher = stack_lib.Stack(tmp / "stack", env=env)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        launcher.start_redis(redis_port)
        launcher.start_gateway(gateway_port)
        worker = launcher.start_worker("worker", concurrency=args.concurrency)
        stack_lib.wait_until(lambda: stack_lib.http_json(f"{url}/ready")[0] == 200, 300, "/ready", worker)
        worker_cpus = set(os.sched_getaffinity(0))
        if args.pin:
            cpus = sorted(worker_cpus)
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least 2 CPUs")
            worker_cpus, others = {cpus[-1]}, set(cpus[:-1])
            pin(worker.popen.pid, worker_cpus)
            for proc in launcher.procs:
                if proc is not worker:
                    pin(proc.popen.pid, others)
            pin(os.getpid(), others)
            result["pinned"] = {"worker_and_bare": sorted(worker_cpus), "others": sorted(others)}
        yield url, f"http://127.0.0.1:{metrics_port}/metrics", worker_cpus
    finally:
        launcher.stop_all()


@contextlib.contextmanager
def running_stack(args: argparse.Namespace) -> Iterator[tuple[str, str | None, set[int]]]:
    """A stack running already (``--url``: ``make up``, Docker Compose); nothing is started or stopped."""
    status, body = stack_lib.http_json(f"{args.url}/ready", timeout=10)
    if status != 200:
        raise SystemExit(f"{args.url}/ready answered {status or 'nothing'}: {body.get('detail', body)}")
    yield args.url, args.worker_metrics, set(os.sched_getaffinity(0))


# -- main ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtime", default="onnxruntime", choices=("torch", "onnxruntime"))
    parser.add_argument("--quantize", default=None, choices=("none", "int8"), help="default: int8 for ORT")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=0, help="blocks (0 = the model's own)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="per step (warm-up included)")
    parser.add_argument("--bare-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--bare-seconds", type=float, default=2.0, help="per batch size in the sweep")
    parser.add_argument(
        "--batch-max",
        type=int,
        default=None,
        help="XRAYFM_BATCH_MAX (default: auto, the worker measures its model at load)",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="XRAYFM_BATCH_WAIT_MS")
    parser.add_argument("--concurrency", type=int, default=16, help="worker threads (the compose image's 16)")
    parser.add_argument(
        "--gateway-workers", type=int, default=1, help="gateway processes (XRAYFM_GATEWAY_WORKERS), default 1"
    )
    parser.add_argument("--threads", type=int, default=1, help="model threads, in the worker and here")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the worker on the last CPU, the clients, gateway and Redis on the others, and the bare model "
        "measured on the worker's CPU: both get the same compute, and the load generator does not take "
        "the worker's (Linux, >= 2 CPUs)",
    )
    parser.add_argument("--smoke", action="store_true", help="2-block vit_tiny @ 64 px, 2 s steps, N=1,4")
    parser.add_argument(
        "--url",
        help="drive a stack that runs already (make up: http://127.0.0.1:8000; Docker Compose) instead of "
        "starting one; give --checkpoint, and --runtime/--quantize/--threads as the deployment's worker",
    )
    parser.add_argument(
        "--checkpoint",
        help="with --url: the served model (a checkpoint folder or a shipped name), for the bare model",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("XRAYFM_API_KEY"), help="with --url: default $XRAYFM_API_KEY"
    )
    parser.add_argument(
        "--worker-metrics", help="with --url: a worker's /metrics URL, for its batches and busy share"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.url and not args.checkpoint:
        parser.error("--url needs --checkpoint (the served model, for the bare comparison)")
    headers = {"X-API-Key": args.api_key} if args.api_key else None
    if args.smoke:
        args.size, args.depth, args.seconds, args.clients = 64, 2, 2.0, "1,4"
        args.bare_sizes, args.bare_seconds, args.images = "1,4,16", 0.5, 16
    quantize = args.quantize or ("int8" if args.runtime == "onnxruntime" else "none")
    clients = [int(c) for c in args.clients.split(",")]
    sizes = [int(b) for b in args.bare_sizes.split(",")]
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, file=sys.stderr))

    import torch

    from xrayfm.data.images import read_image
    from xrayfm.inference import batching, load_served_model
    from xrayfm.inference.runtime import make_predictor

    torch.set_num_threads(args.threads)
    result: dict = {
        "model": args.model + (f" (depth {args.depth})" if args.depth else ""),
        "size": args.size,
        "runtime": args.runtime if quantize == "none" else f"{args.runtime}-{quantize}",
        "threads": args.threads,
        "worker_concurrency": args.concurrency,
        "load_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source, images = load_images(args.images, tmp)
        result["images"] = f"{len(images)} from {source}"
        if args.url:
            from xrayfm.registry import resolve_checkpoint_dir

            checkpoint, cache = resolve_checkpoint_dir(args.checkpoint), None
            result.update(model=f"{checkpoint.name} (the stack at {args.url})", worker_concurrency="its own")
            stack = running_stack(args)
        else:
            checkpoint = make_checkpoint(tmp / "model", args.model, args.size, args.depth or None)
            cache = tmp / "onnx"
            stack = private_stack(args, tmp, checkpoint, quantize, result)
        with stack as (url, metrics_url, worker_cpus):
            workers = stack_lib.http_json(f"{url}/ready")[1].get("workers") or [{}]
            batch_max = int(workers[0].get("batch_max") or 1)  # with auto: what the worker measured
            result["batch_max"] = batch_max if args.batch_max else f"{batch_max} (auto)"
            result["batch_wait_ms"] = (
                args.batch_wait_ms if args.batch_wait_ms is not None else "worker default"
            )
            say(f"stack ready ({result['runtime']}); bare sweep at batches {sizes} ...")
            # the bare model: the worker's runtime and threads, reading the export the worker cached
            served = load_served_model(checkpoint, device="cpu")
            result["size"] = served.preprocessing.size
            predictor = make_predictor(
                served, args.runtime, quantize=quantize, cache_dir=cache, threads=args.threads
            )
            pixels = [read_image(data) for _, data in images]
            with on_cpus(worker_cpus):
                sweep = batching.sweep(predictor, pixels, sizes, args.bare_seconds)
            best = max(sweep, key=sweep.get)
            result["bare_sweep_images_per_s"] = {str(b): round(v, 2) for b, v in sweep.items()}
            result["bare_best_batch"] = best
            best_batch = predictor.preprocess([pixels[i % len(pixels)] for i in range(best)])
            say(f"bare: {', '.join(f'b{b} {v:.1f}' for b, v in sweep.items())} img/s; best batch {best}")
            # the worker's whole batch (preprocessing, decisions, maps packed) in-process, at the best bare batch and
            # at the worker's largest batch: what the worker could do with no queue, HTTP or decoding
            from xrayfm_gateway.uploads import fit_within
            from xrayfm_stack.settings import GatewaySettings

            side = GatewaySettings.from_env({}).transport_side
            sent = [fit_within(p, side) for p in pixels]
            with on_cpus(worker_cpus):
                result["worker_batch_in_process_images_per_s"] = {
                    str(b): round(
                        worker_batch_rate(
                            predictor, [sent[i % len(sent)] for i in range(b)], args.bare_seconds
                        ),
                        2,
                    )
                    for b in sorted({best, batch_max})
                }
            say(f"worker batch in-process: {result['worker_batch_in_process_images_per_s']} img/s")
            # a few requests through every path before measuring
            asyncio.run(drive(url, images, 2, 2.0 if not args.smoke else 1.0, headers))
            steps = []
            for n in clients:
                say(f"{n} clients for {args.seconds:g} s ...")
                before = scrape(metrics_url)
                step = asyncio.run(drive(url, images, n, args.seconds, headers))
                step["worker_batches"] = batch_sizes(before, scrape(metrics_url))
                busy = step["worker_batches"].pop("inference_s") / step["step_s"]
                step["worker_busy_share"] = round(busy, 3) if metrics_url else None
                with on_cpus(worker_cpus):
                    bare_now = batching.throughput(
                        predictor, best_batch, max(args.bare_seconds, min(4.0, args.seconds / 5))
                    )
                step["bare_adjacent_images_per_s"] = round(bare_now, 2)
                step["ratio_adjacent"] = round(step["images_per_s"] / bare_now, 3)
                step["ratio_sweep"] = round(step["images_per_s"] / sweep[best], 3)
                step["images_per_s"] = round(step["images_per_s"], 2)
                step["p50_ms"], step["p99_ms"] = round(step["p50_ms"], 1), round(step["p99_ms"], 1)
                say(
                    f"  {step['images_per_s']} img/s, p50 {step['p50_ms']} ms, batches "
                    f"{step['worker_batches']['histogram']}, x{step['ratio_adjacent']} bare"
                )
                steps.append(step)
            result["steps"] = steps
    result["load_after"] = os.getloadavg()
    goal_steps = [s for s in result["steps"] if s["clients"] >= GOAL_CLIENTS]
    if goal_steps:
        met = all(s["ratio_adjacent"] >= GOAL for s in goal_steps)
        result["goal"] = f">= {GOAL:.0%} of bare at {GOAL_CLIENTS}+ clients: {'met' if met else 'MISSED'}"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"\n{result['model']} @ {result['size']}px, {result['runtime']}, {args.threads} thread(s), worker "
        f"concurrency {result['worker_concurrency']}, gateway processes {args.gateway_workers}, "
        f"batch max {result['batch_max']}, wait "
        f"{args.batch_wait_ms if args.batch_wait_ms is not None else 'default'} ms; images: {result['images']}"
    )
    print(
        "bare (logits + rollout, in-process): "
        + ", ".join(f"b{b} {v}" for b, v in result["bare_sweep_images_per_s"].items())
        + f" img/s; best batch {best}"
    )
    print(
        "worker's whole batch in-process (+ preprocessing, decisions, maps packed): "
        + ", ".join(f"b{b} {v}" for b, v in result["worker_batch_in_process_images_per_s"].items())
        + " img/s"
    )
    load = ", ".join(f"{x:.2f}" for x in result["load_before"])
    print(f"load average before: {load}\n")
    print(
        "| clients | img/s | p50 ms | p99 ms | worker batches (size: count) | mean batch | worker busy "
        "| bare img/s (adjacent) | ratio | ratio to sweep best | errors |\n"
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"
    )
    for s in result["steps"]:
        hist = " ".join(f"{k}:{v}" for k, v in s["worker_batches"]["histogram"].items()) or "n/a"
        busy = "n/a" if s["worker_busy_share"] is None else f"{s['worker_busy_share']:.0%}"
        print(
            f"| {s['clients']} | {s['images_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {hist} | "
            f"{s['worker_batches']['mean']} | {busy} | {s['bare_adjacent_images_per_s']} "
            f"| **{s['ratio_adjacent']:.2f}** | {s['ratio_sweep']:.2f} | {s['errors'] or ''} |"
        )
    print(
        "\nWhere the time goes (medians from the answers' timings; the worker's batch stages divided by "
        "the batch size):\n\n| clients | gateway decode ms | queue wait ms | worker ms | preprocess ms/img "
        "| model + rollout ms/img | decisions + maps ms/img | gateway heatmap PNG ms |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for s in result["steps"]:
        m = s["stage_medians"]
        print(
            f"| {s['clients']} | {m['decode_ms']} | {m['queue_wait_ms']} | {m['worker_ms']} | "
            f"{m['preprocess_ms_per_image']} | {m['inference_ms_per_image']} | {m['postprocess_ms_per_image']} | "
            f"{m['render_ms']} |"
        )
    if "goal" in result:
        print(f"\ngoal: {result['goal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
