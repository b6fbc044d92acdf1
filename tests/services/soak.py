"""A soak of the stack as local processes: concurrent clients sending mixed real images and junk for a
bounded time while an inference worker is killed and restarted and both Redis servers are restarted once,
with small training jobs running on the training side.

Every request must get an answer: 200, a 4xx for junk, or 503/504 carrying a retry hint (Retry-After, or
the job to poll). Every training job must finish and publish once. It prints the table: requests by code,
p50/p99 latency, gateway and worker memory at start and end. test_soak.py runs it for a minute in CI; by
hand, for ten minutes:

    .venv/bin/python -m tests.services.soak --seconds 600 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from xrayfm_local import launcher as stack_lib

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    """What the clients saw."""

    codes: Counter[int] = field(default_factory=Counter)
    latencies_ok: list[float] = field(default_factory=list)
    sent_ok: list[float] = field(default_factory=list)  # when each request answered 200 was sent (monotonic)
    lost: list[str] = field(default_factory=list)  # no answer, a 5xx other than 503/504, or no retry hint
    retry: list[str] = field(default_factory=list)  # the first 503s and 504s: why they came
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, code: int, sent: float, problem: str | None, detail: str = "") -> None:
        with self.lock:
            self.codes[code] += 1
            if code == 200:
                self.latencies_ok.append(time.monotonic() - sent)
                self.sent_ok.append(sent)
            if problem:
                self.lost.append(problem)
            elif code in (503, 504) and sum(r.startswith(f"{code} ") for r in self.retry) < 3:
                self.retry.append(f"{code} after {time.monotonic() - sent:.1f} s: {detail[:160]}")


def inputs(per_kind: int = 4) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, is_image) for the clients: real files from ../shared/data when present, images made
    here, and junk (random bytes, truncated images, a decompression bomb)."""
    from tests.helpers import shared_data_dir
    from tests.services.svc_helpers import dicom_bytes, jpeg_bytes, phantom, png_bytes, png_with_header_size

    shared = shared_data_dir()
    real = []
    for pattern in ("chexpert-small-valid/CheXpert-v1.0-small/valid/*/*/*.jpg",
                    "mura-humerus-64/MURA-v1.1/valid/XR_HUMERUS/*/*/*.jpg",
                    "kermany-pneumonia/chest_xray/train/PNEUMONIA/*.jpeg",
                    "nih-cxr14-1000-64/images/*.png", "dicom-radiographs/*_UNCR.dcm"):  # fmt: skip
        real += sorted(shared.glob(pattern))[:per_kind]
    items = [(p.name, p.read_bytes(), True) for p in real]
    image = phantom(400, 300)
    items += [("made.png", png_bytes(image), True), ("made.jpg", jpeg_bytes(image), True),
              ("made.dcm", dicom_bytes(image), True)]  # fmt: skip
    rng = random.Random(0)
    junk = png_bytes(image)
    items += [("junk.bin", rng.randbytes(2048), False), ("cut.png", junk[: len(junk) // 3], False),
              ("bomb.png", png_with_header_size(60_000, 60_000), False), ("empty.png", b"", False)]  # fmt: skip
    return items


def _problem(resp: httpx.Response, is_image: bool) -> str | None:
    code = resp.status_code
    if code == 200:
        return None
    if code == 503 and "Retry-After" in resp.headers:
        return None
    if code == 504 and "/jobs/" in resp.text:  # the job goes on: poll it
        return None
    if 400 <= code < 500 and not is_image:
        return None
    return f"HTTP {code} for {'an image' if is_image else 'junk'}: {resp.text[:200]}"


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run(seconds: float, clients: int, home: Path, say=print) -> dict[str, Any]:
    """Start a stack under `home`, soak it for `seconds`, stop it; returns the figures."""
    from tests.helpers import make_tiny_checkpoint
    from tests.services.svc_helpers import require_redis_server, stack_env
    from xrayfm.data.synth import synth_chest

    require_redis_server()
    model = make_tiny_checkpoint(home / "model", ["Abnormal"], size=64)
    chest = home / "data" / "CheXpert-synth"
    synth_chest(chest, n=48, seed=1, size=32, progress=False)
    redis_port, training_port, gateway_port = (stack_lib.free_port() for _ in range(3))
    env = stack_env(redis_port, model, XRAYFM_TRAINING_REDIS_URL=f"redis://127.0.0.1:{training_port}/0",
                    XRAYFM_TRAINING_QUEUE=f"xrayfm-training-soak-{uuid.uuid4().hex[:6]}",
                    XRAYFM_MODEL_STORE=str(home / "store"), XRAYFM_TRAINING_RUNS=str(home / "runs"),
                    XRAYFM_TRAINING_LOCK_TTL="10", XRAYFM_BOOTSTRAP="off", XRAYFM_DATA_DIRS=str(home / "data"),
                    XRAYFM_PREDICT_TIMEOUT="20", XRAYFM_TASK_TIME_LIMIT="10",
                    XRAYFM_VISIBILITY_TIMEOUT="12")  # fmt: skip
    stack = stack_lib.Stack(home / "stack", env=env)
    outcome, stop = Outcome(), threading.Event()
    items = inputs()
    try:
        redis_proc = stack.start_redis(redis_port)
        training_redis = stack.start_redis(training_port, data_dir=home / "training-redis")
        worker = stack.start_worker()
        stack.start_training_worker()
        gateway = stack.start_gateway(gateway_port)
        url = f"http://127.0.0.1:{gateway_port}"
        stack_lib.wait_until(lambda: stack_lib.http_json(f"{url}/ready")[0] == 200, 120, "/ready", worker)
        http = httpx.Client(base_url=url, timeout=60)
        tiny = {"model": "vit_tiny_patch16_224", "size": 32, "labels": ["Cardiomegaly", "Lung Opacity"],
                "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
                "progress_bar": False, "tensorboard": False, "batch_size": 8, "val_fraction": 0.25}  # fmt: skip
        jobs = [
            http.post("/training/jobs", json={"kind": "pretrain", "name": f"soak-{i}", "config": {
                "kind": "chexpert", "root": str(chest), "epochs": 3, "save_every": 2, **tiny}}).json()["job_id"]
            for i in range(2)
        ]  # fmt: skip
        memory = {"gateway": [rss_mb(gateway.pid)], "worker": [rss_mb(worker.pid)]}

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=90) as own:
                while not stop.is_set():
                    name, data, is_image = rng.choice(items)
                    start = time.monotonic()
                    try:
                        resp = own.post("/predict", files={"file": (name, data)})
                    except httpx.HTTPError as exc:
                        outcome.record(0, start, f"no answer: {type(exc).__name__}")
                        continue
                    outcome.record(resp.status_code, start, _problem(resp, is_image), resp.text)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        happened: dict[str, float] = {}
        events = [(seconds / 3, "kill the inference worker (SIGKILL) and start another"),
                  (2 * seconds / 3, "restart both Redis servers")]  # fmt: skip
        while time.monotonic() - started < seconds:
            if events and time.monotonic() - started >= events[0][0]:
                _, what = events.pop(0)
                happened[what] = time.monotonic()
                say(f"  t={time.monotonic() - started:.0f}s: {what}")
                if what.startswith("kill"):
                    stack.stop(worker, signal.SIGKILL)
                    stack.procs.remove(worker)
                    worker = stack.start_worker(name=f"worker-{uuid.uuid4().hex[:6]}")
                    memory["worker"] = [rss_mb(worker.pid)]  # a new process: its memory starts here
                else:
                    for proc in (redis_proc, training_redis):
                        stack.stop(proc, signal.SIGTERM)
                        stack.procs.remove(proc)
                    redis_proc = stack.start_redis(redis_port)
                    training_redis = stack.start_redis(training_port, data_dir=home / "training-redis")
            if worker.popen.poll() is not None:  # nothing here stops it: say why it did, and stop
                raise RuntimeError(
                    f"the inference worker exited ({worker.popen.returncode}):\n{worker.log_tail()}"
                )
            memory["gateway"].append(rss_mb(gateway.pid))
            memory["worker"].append(rss_mb(worker.pid))
            time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        hung = sum(t.is_alive() for t in threads)
        deadline, states = time.monotonic() + 300, []
        while time.monotonic() < deadline:  # the training jobs: all must finish, each published once
            states = [http.get(f"/training/jobs/{j}").json().get("status") for j in jobs]
            if all(s in ("done", "failed", "cancelled") for s in states):
                break
            time.sleep(1.0)
        versions = http.get("/models").json()["models"]
        published = Counter(v["job_id"] for v in versions)
        http.close()
    finally:
        stop.set()
        stack.stop_all()
    latencies = sorted(outcome.latencies_ok)
    # After each disruption: seconds until a request sent after it was answered 200 (the stack serves again)
    recovered = {
        what: round(min((t for t in outcome.sent_ok if t > at), default=float("inf")) - at, 1)
        for what, at in happened.items()
    }
    warm = min(10, len(memory["gateway"]) - 1)  # the gateway's memory once warm (imports, first decodes)
    return {
        "seconds": seconds,
        "clients": clients,
        "requests": sum(outcome.codes.values()),
        "by_code": {str(k): v for k, v in sorted(outcome.codes.items())},
        "lost": len(outcome.lost) + hung,
        "lost_examples": outcome.lost[:5],
        "retry_examples": outcome.retry,
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
        "recovered_s": recovered,
        "gateway_rss_mb": [
            round(memory["gateway"][warm]),
            round(memory["gateway"][-1]),
            round(max(memory["gateway"])),
        ],
        "worker_rss_mb": [
            round(memory["worker"][min(10, len(memory["worker"]) - 1)]),
            round(memory["worker"][-1]),
        ],
        "training_jobs": {j: s for j, s in zip(jobs, states, strict=True)},
        "published_once": all(published.get(j) == 1 for j in jobs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600, help="how long the clients send")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--home", help="keep the stack's folder (logs, store) here; default: a temporary one")
    args = parser.parse_args(argv)
    if args.home:
        figures = run(args.seconds, args.clients, Path(args.home))
    else:
        with tempfile.TemporaryDirectory(prefix="xrayfm-soak-") as tmp:
            figures = run(args.seconds, args.clients, Path(tmp))
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:16s} {value}")
    ok = figures["lost"] == 0 and figures["published_once"]
    ok = ok and all(s == "done" for s in figures["training_jobs"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("XRAYFM_TORCH_THREADS", "1")
    raise SystemExit(main())
