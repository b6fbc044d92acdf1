"""The stack's serving figures per runtime, and scale-out, measured on the Docker Compose stack itself.

    .venv/bin/python bench/bench_fleet.py --json                    # onnxruntime and torch, 1 and 2 workers
    .venv/bin/python bench/bench_fleet.py --runtimes onnxruntime --scales 1 --seconds 20   # quicker

For each runtime in ``--runtimes`` it starts the compose stack from the images ``make images`` built (its
own project name and ports; the default first start serves the shipped model), then measures:

- **cold start**: the inference container stopped, then started; seconds until ``/ready`` lists its worker
  ready again (container start, Python, the model, its graphs, the batch-size probe);
- **worker memory**: the inference container's RSS (cgroup ``rss``) after 10 s idle, and its peak sampled
  every 0.5 s under load;
- **latency**: one client posting real paediatric chest radiographs in turn (``--requests``), p50 and p95
  of the 200 answers (attention map included, the default request);
- **throughput**: ``--clients`` clients (16) for ``--seconds``, the first 3 s not counted; answers/s;
- **CPU per answer**: CPU-seconds the inference container(s) and the gateway spent per answer in that
  window (the Docker engine's counters), which gives the capacity model: answers/s per worker core =
  1 / (worker CPU-seconds per answer);
- for each scale in ``--scales`` above 1: ``--scale inference=N`` and throughput again.

``torch`` runs the torch inference image (``--torch-image``) with ``XRAYFM_RUNTIME=torch`` through a
temporary override file; ``onnxruntime`` is the compose default. Clients, gateway, Redis and workers share
this machine's cores: on a small machine scale-out shows how the stack shares them, not what a second
machine would add; the CPU-per-answer figure is what carries to other hosts. Images: Kermany train
radiographs from ``$XRAYFM_SHARED_DATA`` (in the shipped model's domain; a refused one is counted apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))
PROJECT = "xrayfm-bench-fleet"
KEY = "bench-fleet-key"
WARMUP_S = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def images(count: int) -> list[bytes]:
    """`count` Kermany train radiographs (both classes, evenly over the sorted lists)."""
    root = SHARED / "kermany-pneumonia" / "chest_xray" / "train"
    paths = [p for name in ("NORMAL", "PNEUMONIA") for p in sorted((root / name).glob("*.jpeg"))]
    if not paths:
        sys.exit(f"no Kermany radiographs under {root}: set XRAYFM_SHARED_DATA")
    step = max(1, len(paths) // count)
    return [p.read_bytes() for p in paths[::step][:count]]


class Compose:
    """One compose project: its command line, environment and containers."""

    def __init__(self, override: Path | None) -> None:
        self.port = free_port()
        self.files = ["-f", "docker-compose.yml", *(["-f", str(override)] if override else [])]
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": PROJECT,
            "XRAYFM_BIND": "127.0.0.1",
            "XRAYFM_GATEWAY_PORT": str(self.port),
            "XRAYFM_FRONTEND_PORT": str(free_port()),
            "XRAYFM_API_KEYS": KEY,
            "XRAYFM_DATA_DIR": str(SHARED.resolve()),
        }
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers={"X-API-Key": KEY}, timeout=60
        )

    def run(self, *args: str) -> None:
        command = (
            ["docker-compose", *self.files, *args]
            if shutil.which("docker-compose")
            else ["docker", "compose", *self.files, *args]
        )
        done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: {done.stderr[-2000:]}")

    def containers(self, service: str) -> list[str]:
        filters = [
            f"label=com.docker.compose.project={PROJECT}",
            f"label=com.docker.compose.service={service}",
        ]
        out = subprocess.run(
            ["docker", "ps", "-q", *[x for f in filters for x in ("--filter", f)]],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    def workers_ready(self) -> int:
        try:
            answer = self.http.get("/ready", timeout=5)
        except httpx.HTTPError:
            return 0
        if answer.status_code != 200:
            return 0
        return sum(bool(w.get("ready")) for w in answer.json().get("workers", []))

    def wait_ready(self, workers: int, timeout: float = 900) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.workers_ready() >= workers:
                return time.monotonic() - started
            time.sleep(0.5)
        raise RuntimeError(f"{workers} ready worker(s) not in /ready after {timeout:.0f} s")


def container_stats(ids: list[str]) -> dict[str, dict[str, float]]:
    """Per container: RSS in MB (cgroup v1 ``rss``, else usage minus cache) and CPU-seconds used so far."""
    found = {}
    with httpx.Client(transport=httpx.HTTPTransport(uds="/var/run/docker.sock"), timeout=10) as engine:
        for cid in ids:
            stats = engine.get(f"http://docker/containers/{cid}/stats", params={"stream": "false"}).json()
            memory = stats.get("memory_stats", {})
            detail = memory.get("stats", {})
            rss = detail.get("rss", detail.get("anon", memory.get("usage", 0) - detail.get("cache", 0)))
            cpu = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0) / 1e9
            found[cid] = {"rss_mb": rss / 2**20, "cpu_s": cpu}
    return found


class PeakRss(threading.Thread):
    """Samples the summed RSS of `ids` every 0.5 s until stopped; keeps the peak."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.ids, self.peak, self.done = ids, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, sum(s["rss_mb"] for s in container_stats(self.ids).values()))
            self.done.wait(0.5)


def latency(stack: Compose, bodies: list[bytes], requests: int) -> dict[str, Any]:
    times, refused = [], 0
    for i in range(requests):
        started = time.perf_counter()
        answer = stack.http.post("/predict", files={"file": ("x.jpeg", bodies[i % len(bodies)])})
        if answer.status_code == 200:
            times.append((time.perf_counter() - started) * 1000)
        else:
            refused += 1
    times.sort()
    return {
        "answered": len(times),
        "not_200": refused,
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[max(0, int(round(0.95 * len(times))) - 1)], 1),
    }


async def _clients(url: str, bodies: list[bytes], clients: int, seconds: float) -> tuple[int, int]:
    """Answers (200) and others counted after the warm-up, over `seconds`."""
    counted = {"ok": 0, "other": 0}
    start = time.monotonic()

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=120) as http:
            i = n
            while time.monotonic() - start < seconds:
                answer = await http.post("/predict", files={"file": ("x.jpeg", bodies[i % len(bodies)])})
                i += clients
                if time.monotonic() - start > WARMUP_S:
                    counted["ok" if answer.status_code == 200 else "other"] += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return counted["ok"], counted["other"]


def throughput(stack: Compose, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    workers, gateway = stack.containers("inference"), stack.containers("gateway")
    peak = PeakRss(workers)
    peak.start()
    time.sleep(WARMUP_S)  # the clients' warm-up window is not counted: neither is its CPU
    before = container_stats(workers + gateway)
    window = time.monotonic()
    ok, other = asyncio.run(_clients(stack.http.base_url.__str__(), bodies, clients, seconds + WARMUP_S))
    elapsed = time.monotonic() - window
    after = container_stats(workers + gateway)
    peak.done.set()
    peak.join()
    cpu = {cid: after[cid]["cpu_s"] - before[cid]["cpu_s"] for cid in after}
    answers = max(ok, 1)
    return {
        "clients": clients,
        "answers": ok,
        "not_200": other,
        "answers_per_s": round(ok / elapsed, 2),
        "worker_cpu_s_per_answer": round(sum(cpu[c] for c in workers) / answers, 4),
        "gateway_cpu_s_per_answer": round(sum(cpu[c] for c in gateway) / answers, 4),
        "worker_peak_rss_mb": round(peak.peak),
    }


def measure(runtime: str, args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    override = None
    with tempfile.TemporaryDirectory() as tmp:
        if runtime == "torch":
            override = Path(tmp) / "torch.yml"
            override.write_text(
                "services:\n  inference:\n"
                f"    image: {args.torch_image}\n"
                "    environment:\n      XRAYFM_RUNTIME: torch\n      XRAYFM_DEVICE: cpu\n"
            )
        stack = Compose(override)
        stack.run("down", "-v", "--remove-orphans")
        try:
            stack.run("up", "-d")
            first = stack.wait_ready(1)
            stack.run("stop", "inference")
            while stack.workers_ready():
                time.sleep(0.5)
            stack.run("start", "inference")
            cold = stack.wait_ready(1)
            time.sleep(10)
            rest = sum(s["rss_mb"] for s in container_stats(stack.containers("inference")).values())
            row: dict[str, Any] = {
                "runtime": runtime,
                "first_start_s": round(first, 1),
                "cold_start_s": round(cold, 1),
                "worker_rss_rest_mb": round(rest),
                "latency": latency(stack, bodies, args.requests),
                "load": {1: throughput(stack, bodies, args.clients, args.seconds)},
            }
            for scale in (s for s in args.scales if s > 1):
                stack.run("up", "-d", "--no-recreate", "--scale", f"inference={scale}")
                stack.wait_ready(scale)
                row["load"][scale] = throughput(stack, bodies, args.clients, args.seconds)
            row["load_average_1m"] = round(os.getloadavg()[0], 1)  # the machine's other work, for the record
            return row
        finally:
            stack.http.close()
            stack.run("down", "-v", "--remove-orphans")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtimes", default="onnxruntime,torch", help="comma-separated: onnxruntime, torch")
    parser.add_argument("--scales", default="1,2", help="inference containers to measure throughput with")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for throughput (16)")
    parser.add_argument("--seconds", type=float, default=30.0, help="counted seconds per throughput step")
    parser.add_argument("--requests", type=int, default=60, help="sequential requests for p50/p95 (60)")
    parser.add_argument("--images", type=int, default=48, help="distinct radiographs posted in turn (48)")
    parser.add_argument(
        "--torch-image",
        default="xrayfm/inference-torch:local",
        help="the torch inference image (make images)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    args.scales = sorted({int(s) for s in args.scales.split(",")})
    bodies = images(args.images)
    rows = [measure(runtime.strip(), args, bodies) for runtime in args.runtimes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'runtime':<12} {'cold s':>7} {'RSS rest':>9} {'RSS load':>9} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'ans/s':>6} {'wCPU s/ans':>10} {'gwCPU s/ans':>11}  scale-out"
    )
    for row in rows:
        one = row["load"][1]
        more = ", ".join(f"{n}: {row['load'][n]['answers_per_s']}/s" for n in row["load"] if n > 1)
        print(
            f"{row['runtime']:<12} {row['cold_start_s']:>7} {row['worker_rss_rest_mb']:>9} "
            f"{one['worker_peak_rss_mb']:>9} {row['latency']['p50_ms']:>7} {row['latency']['p95_ms']:>7} "
            f"{one['answers_per_s']:>6} {one['worker_cpu_s_per_answer']:>10} "
            f"{one['gateway_cpu_s_per_answer']:>11}  {more}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
