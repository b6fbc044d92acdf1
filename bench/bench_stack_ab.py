"""The stack's own cost per /predict, for several checkouts of this repository side by side: each gets its
own private stack (Redis, gateway, one worker; the same vit_tiny checkpoint), all running at once, and
single requests go to them in turn, shuffled every round, so that this machine's drifts hit them alike.

    .venv/bin/python bench/bench_stack_ab.py --checkout old=/path/to/worktree --checkout new=. [--requests 300]

Make the other checkout with ``git worktree add ../old COMMIT``. Every stack runs on this .venv's packages
with its checkout's code first on PYTHONPATH (the launcher of that checkout starts it). The figure to
compare is "overhead": the median over requests of the client's time minus the answer's own
``inference_ms``. Also printed: each process's CPU per request. Writes runs/bench/bench_stack_ab.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import httpx
import psutil
from bench_predict import bench_image, cpu_seconds, make_checkpoint, stack_env
from tqdm import tqdm

from xrayfm_local import launcher as stack_lib

REPO = Path(__file__).resolve().parents[1]


def launcher_of(checkout: Path) -> ModuleType:
    """`checkout`'s own launcher (``xrayfm_local.launcher``; ``xrayfm_stack.local`` in older checkouts):
    its Stack puts that checkout's code on PYTHONPATH."""
    places = ("services/local/xrayfm_local/launcher.py", "services/common/xrayfm_stack/local.py")
    path = next((checkout / p for p in places if (checkout / p).is_file()), checkout / places[0])
    spec = importlib.util.spec_from_file_location(f"xrayfm_local_{abs(hash(str(checkout)))}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise SystemExit(f"no launcher ({' or '.join(places)}) under {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_checkouts(values: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs; a name may repeat a path (the same code twice shows the harness's own spread)."""
    found = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not (Path(path) / "services").is_dir():
            raise SystemExit(f"--checkout wants NAME=PATH of a checkout of this repository, got {value!r}")
        found[name] = Path(path).resolve()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a checkout to measure, named (repeat it; default: this one, as 'this')",
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per checkout (default 300)")
    parser.add_argument("--size", type=int, default=224, help="the model's input size, px (default 224)")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/bench_stack_ab.json")
    args = parser.parse_args()
    checkouts = parse_checkouts(args.checkout or [f"this={REPO}"])

    name, data = bench_image(REPO.parent / "shared" / "data")
    results: dict = {"image": name, "size": args.size, "requests": args.requests, "checkouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "model", "vit_tiny_patch16_224", args.size)
        stacks, urls, pids = [], {}, {}
        try:
            for label, checkout in checkouts.items():
                redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
                env = {**stack_env(redis_port, checkpoint, threads=1), "XRAYFM_BATCH_MAX": "8"}
                stack = launcher_of(checkout).Stack(Path(tmp) / label, env=env)
                stacks.append(stack)
                redis_proc = stack.start_redis(redis_port)
                gateway = stack.start_gateway(gateway_port)
                worker = stack.start_worker("worker")
                urls[label] = f"http://127.0.0.1:{gateway_port}"
                pids[label] = {"gateway": gateway.pid, "worker": worker.pid, "redis": redis_proc.pid}
                stack_lib.wait_until(
                    lambda url=urls[label]: stack_lib.http_json(f"{url}/ready")[0] == 200,
                    180,
                    "/ready",
                    worker,
                )
            clients = {label: httpx.Client(base_url=url, timeout=120) for label, url in urls.items()}
            processes = {label: {k: psutil.Process(p) for k, p in ids.items()} for label, ids in pids.items()}
            total = {label: [] for label in urls}
            overhead = {label: [] for label in urls}
            cpu = {label: dict.fromkeys(pids[label], 0.0) for label in urls}
            for client in clients.values():  # warm-up
                for _ in range(20):
                    client.post("/predict", files={"file": (name, data)}).raise_for_status()
            order = list(urls)
            for _ in tqdm(range(args.requests), desc="rounds"):
                random.shuffle(order)
                for label in order:
                    before = cpu_seconds(processes[label])
                    start = time.perf_counter()
                    resp = clients[label].post("/predict", files={"file": (name, data)})
                    elapsed = 1000 * (time.perf_counter() - start)
                    after = cpu_seconds(processes[label])
                    resp.raise_for_status()
                    total[label].append(elapsed)
                    overhead[label].append(elapsed - resp.json()["timings"]["inference_ms"])
                    for key in before:
                        cpu[label][key] += 1000 * (after[key] - before[key]) / args.requests
            for client in clients.values():
                client.close()
        finally:
            for stack in stacks:
                stack.stop_all()

    print(f"\n/predict, vit_tiny @ {args.size}px, {name}, {args.requests} requests each, interleaved\n")
    print("| checkout | client p50 ms | overhead p50 ms | CPU ms per request (gateway / worker / redis) |")
    print("|---|---|---|---|")
    for label in urls:
        row = {
            "path": str(checkouts[label]),
            "client_p50_ms": statistics.median(total[label]),
            "overhead_p50_ms": statistics.median(overhead[label]),
            "cpu_ms_per_request": cpu[label],
        }
        results["checkouts"][label] = row
        spent = " / ".join(f"{cpu[label][k]:.1f}" for k in ("gateway", "worker", "redis"))
        print(f"| {label} | {row['client_p50_ms']:.1f} | {row['overhead_p50_ms']:.2f} | {spent} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
