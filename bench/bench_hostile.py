"""The gateway under hostile input, on a real stack (Redis, uvicorn gateway, one worker serving the
shipped model, with its domain gate): how it answers, how fast it stays for everyone else, and how much memory it takes.

    nice .venv/bin/python bench/bench_hostile.py [--seconds 15] [--clients 4] [--skip-memory]

1. Latency under decode load. /health and a normal /predict (a real chest radiograph), alone, then while
   `--clients` clients loop each hostile upload for `--seconds`: a DICOM whose 64 x 64 header holds a
   15000 x 15000 JPEG 2000 frame, and the largest image the limits allow (a black 7740 x 7740 JPEG, 60 M
   pixels). Prints p50/p95 and the loaded/unloaded ratios, measured side by side in this one run.
2. Memory. 8 clients upload the largest allowed file at once (a ~60 MB noise PNG of 7740 x 7740 pixels):
   the peak and settled RSS of the gateway's processes (uvicorn and its decoder children), sampled at
   20 Hz, and the answers' codes.
3. Inputs by category. The hostile inputs of tests/hostile_files.py and more (bombs, corrupt JPEGs, not
   images, malformed multipart, oversize, hostile job specs), and encapsulated DICOMs mutated by the fuzz
   target (tests/services/upload_fuzz.py): the codes per category, the 5xx count, and the tracebacks
   in the gateway's log afterwards (there should be none).

Writes runs/bench/bench_hostile.json.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from bench_predict import bench_image, percentiles, stack_env
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]  # the tests' builders of hostile files (the tests package)

from openjpeg.utils import encode_array  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit  # noqa: E402
from tests.hostile_files import cut_with_eoi, dicom, j2k_with_siz_size, scan_zeroed, with_sof_size  # noqa: E402

from xrayfm.registry import pretrained_dir  # noqa: E402
from xrayfm_local import launcher as stack_lib  # noqa: E402
from xrayfm_stack.settings import GatewaySettings  # noqa: E402

ADMIN_KEY = "bench-admin-key"
SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
LARGEST_SIDE = 7740  # 59.9 M pixels: under XRAYFM_MAX_PIXELS (60 M)


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A grey radiograph-like picture: a bright ellipse on a noisy dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ellipse = ((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2 < 1
    return np.clip(40 + 150 * ellipse + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def in_domain_image(shared: Path) -> tuple[str, bytes]:
    """A radiograph inside the shipped model's domain (a Kermany paediatric chest film), else
    bench_predict's image (an adult CheXpert film, which the shipped gate refuses)."""
    found = sorted(shared.glob("kermany-pneumonia/chest_xray/train/NORMAL/*.jpeg"))
    return (found[0].name, found[0].read_bytes()) if found else bench_image(shared)


def frame_bomb() -> bytes:
    """A 1 KB DICOM: a 64 x 64 header, a JPEG 2000 frame that says 15000 x 15000."""
    return dicom(j2k_with_siz_size(encode_array(picture(64, 64)), 15000, 15000), JPEG2000Lossless, 64, 64)


def largest_jpeg() -> bytes:
    return encoded(np.zeros((LARGEST_SIDE, LARGEST_SIDE), np.uint8), "JPEG")


def largest_upload() -> bytes:
    """The largest file the limits allow in every dimension: ~60 MB of noise, 60 M pixels."""
    rng = np.random.default_rng(1)
    return encoded(
        rng.integers(0, 256, (LARGEST_SIDE, LARGEST_SIDE), dtype=np.uint8), "PNG", compress_level=1
    )


# -- 1. latency under load ------------------------------------------------------------------------------


def timed(call: Callable[[], httpx.Response]) -> tuple[float, int]:
    start = time.perf_counter()
    resp = call()
    return time.perf_counter() - start, resp.status_code


def probe(url: str, seconds: float, image: tuple[str, bytes]) -> dict:
    """/health every 20 ms and a normal /predict in a loop, for `seconds`, from two threads."""
    health, predict, codes = [], [], Counter()
    stop = time.monotonic() + seconds

    def health_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                elapsed, code = timed(lambda: client.get("/health"))
                health.append(elapsed)
                codes[f"health {code}"] += 1
                time.sleep(0.02)

    def predict_loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                elapsed, code = timed(lambda: client.post("/predict", files={"file": image}))
                predict.append(elapsed)
                codes[f"predict {code}"] += 1

    threads = [threading.Thread(target=health_loop), threading.Thread(target=predict_loop)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"health": percentiles(health), "predict": percentiles(predict), "codes": dict(codes)}


def attack_loop(url: str, filename: str, data: bytes, seconds: float, niceness: int) -> str:
    """One hostile client (in its own process, niced by `niceness`): post the upload in a loop for
    `seconds`; its answers by code and its times, as JSON."""
    os.nice(niceness)
    answers: Counter = Counter()
    times_ms = []
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < stop:
            start = time.perf_counter()
            resp = client.post("/predict", files={"file": (filename, data)})
            times_ms.append(1000 * (time.perf_counter() - start))
            answers[f"{resp.status_code} {resp.json().get('error', '')}".strip()] += 1
    return json.dumps({"answers": answers, "ms": times_ms})


def under_load(url: str, seconds: float, clients: int, image: tuple[str, bytes], niceness: int) -> dict:
    """Probe alone, then while `clients` processes loop each hostile upload."""
    results = {"alone": probe(url, seconds, image), "attack_nice": niceness}
    for name, filename, data in (
        ("frame_bomb", "x.dcm", frame_bomb()),
        ("largest_image", "x.jpg", largest_jpeg()),
    ):
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=clients, mp_context=context) as pool:
            attacks = [
                pool.submit(attack_loop, url, filename, data, seconds + 2.0, niceness) for _ in range(clients)
            ]
            time.sleep(1.5)  # the clients start (spawned interpreters) and warm up
            loaded = probe(url, seconds, image)
            done = [json.loads(a.result()) for a in attacks]
        answers: Counter = Counter()
        for one in done:
            answers.update(one["answers"])
        times_ms = [t for one in done for t in one["ms"]]
        loaded["hostile_answers"] = dict(answers)
        loaded["hostile_p50_ms"] = float(np.percentile(times_ms, 50))
        loaded["hostile_p95_ms"] = float(np.percentile(times_ms, 95))
        for what in ("health", "predict"):
            loaded[f"{what}_p95_ratio"] = loaded[what]["p95_ms"] / results["alone"][what]["p95_ms"]
        results[name] = loaded
    return results


# -- 2. memory ------------------------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants, MB."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def memory(url: str, gateway_pid: int, concurrent: int = 8) -> dict:
    data = largest_upload()
    before = tree_rss_mb(gateway_pid)
    peak, codes, stop = [before], Counter(), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(tree_rss_mb(gateway_pid))
            time.sleep(0.05)

    def upload() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            resp = client.post("/predict", files={"file": ("big.png", data)})
            codes[f"{resp.status_code} {resp.json().get('error', '')}".strip()] += 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    clients = [threading.Thread(target=upload) for _ in range(concurrent)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    seconds = time.perf_counter() - started
    time.sleep(5.0)
    stop.set()
    sampler.join()
    return {
        "upload_mb": len(data) / 2**20,
        "concurrent": concurrent,
        "rss_before_mb": before,
        "rss_peak_mb": max(peak),
        "rss_after_5s_mb": tree_rss_mb(gateway_pid),
        "codes": dict(codes),
        "seconds": seconds,
    }


# -- 3. inputs by category ------------------------------------------------------------------------------


def multipart(boundary: str, name: str, data: bytes) -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode()


def raw(boundary: str, body: bytes, content_type: str | None = None) -> dict:
    return {
        "content": body,
        "headers": {"content-type": content_type or f"multipart/form-data; boundary={boundary}"},
    }


def upload_cases() -> dict[str, list[tuple[str, dict]]]:
    """Category -> (case, httpx keyword arguments of a POST /predict)."""
    small = picture(256, 256)
    jpeg, png = encoded(small, "JPEG", quality=90), encoded(small, "PNG")
    file = lambda name, data: {"files": {"file": (name, data)}}  # noqa: E731
    header_bomb = encoded(np.zeros((64, 64), np.uint8), "PNG")
    ihdr = b"IHDR" + (100000).to_bytes(4, "big") * 2 + header_bomb[24:29]  # 100000 x 100000, CRC right
    header_bomb = header_bomb[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + header_bomb[33:]
    long = "b" * 300
    return {
        "frame bombs (DICOM frame larger than its header)": [
            ("j2k 15000x15000 in 64x64", file("x.dcm", frame_bomb())),
            ("jpeg 15000x15000 in 64x64", file("x.dcm", dicom(with_sof_size(jpeg, 15000, 15000), JPEGBaseline8Bit, 64, 64))),
        ],
        "header bombs": [
            ("png 100000x100000", file("x.png", header_bomb)),
            ("jpeg SOF 60000x60000", file("x.jpg", with_sof_size(jpeg, 60000, 60000))),
        ],
        "corrupt JPEGs": [
            ("scan zeroed", file("x.jpg", scan_zeroed(jpeg))),
            ("SOF 2000x2000", file("x.jpg", with_sof_size(jpeg, 2000, 2000))),
            ("SOF 7000x7000", file("x.jpg", with_sof_size(jpeg, 7000, 7000))),
            ("cut at 60 % + EOI", file("x.jpg", cut_with_eoi(jpeg))),
            ("cut at 60 %", file("x.jpg", jpeg[: len(jpeg) * 6 // 10])),
            ("png cut", file("x.png", png[: len(png) // 2])),
        ],
        "not images": [
            ("empty", file("x.png", b"")),
            ("text", file("x.png", b"hello " * 100)),
            ("zip", file("x.jpg", b"PK\x03\x04" + bytes(200))),
            ("pdf as .pdf", file("x.pdf", b"%PDF-1.4 " + bytes(100))),
        ],
        "out of domain": [
            ("blank 512x512", file("x.png", encoded(np.zeros((512, 512), np.uint8), "PNG"))),
            ("colour photo", file("x.jpg", encoded(np.random.default_rng(2).integers(0, 256, (256, 256, 3), dtype=np.uint8), "JPEG"))),
        ],
        "malformed multipart": [
            ("boundary of 300 characters", raw(long, multipart(long, "x.png", png))),
            ("no boundary", raw("x", b"abc", "multipart/form-data")),
            ("not multipart", raw("x", png, "image/png")),
            ("no closing boundary", raw("zz", multipart("zz", "x.png", png)[:-8])),
            ("two files", {"files": [("file", ("a.png", png)), ("file", ("b.png", png))]}),
            ("no file field", {"files": {"other": ("a.png", png)}}),
        ],
        "oversize": [("65 MiB", file("x.png", png + bytes(65 * 2**20)))],
    }  # fmt: skip


def spec_cases() -> list[tuple[str, dict]]:
    """Hostile training job specs (POST /training/jobs with the admin key)."""
    base = {"kind": "adapt", "name": "bench", "config": {"kind": "folder", "root": "/nonexistent"}}

    def config(**kw) -> dict:
        return {"content": json.dumps({**base, "config": {**base["config"], **kw}}), "headers": {}}

    nested = json.dumps({**base, "config": {"x": 0}}).replace("0}}", "[" * 5000 + "1" + "]" * 5000 + "}}")
    return [
        ("lr NaN", config(lr=float("nan"))),
        ("grad_clip Infinity", config(grad_clip=float("inf"))),
        ("epochs 1e9", config(epochs=10**9)),
        ("batch_size 1e9", config(batch_size=10**9)),
        ("hub model", config(model="hf-hub:attacker/evil-model")),
        ("NUL in root", config(root="/data/\x00x")),
        ("nesting 5000", {"content": nested, "headers": {}}),
        ("10 MB spec", config(note="x" * 10_000_000)),
        ("not JSON", {"content": b"{kind: adapt", "headers": {}}),
    ]


def fuzzed_dicoms(count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Encapsulated DICOMs (each kind of frame, valid and claiming other sizes than its header) mutated by
    the fuzz target's structure-aware mutator, its choices drawn from a seeded generator."""
    from tests.services.upload_fuzz import ENCAPSULATED, mutate_encapsulated

    rng = random.Random(seed)

    class SeededChoices:
        def integer(self, lo: int, hi: int) -> int:
            return rng.randint(lo, hi)

        def binary(self, most: int) -> bytes:
            return rng.randbytes(rng.randint(0, most))

    cases = []
    for k in range(count):
        _, case, _ = ENCAPSULATED[rng.randrange(len(ENCAPSULATED))]
        data = mutate_encapsulated(case, SeededChoices()).dicom()
        cases.append((f"mutant {k}", {"files": {"file": ("x.dcm", data)}}))
    return cases


def categories(url: str, fuzz: int) -> dict:
    table: dict[str, dict] = {}
    admin = {"X-API-Key": ADMIN_KEY, "content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=120) as client:
        groups = {**{k: ("/predict", v) for k, v in upload_cases().items()}}
        groups["hostile job specs"] = ("/training/jobs", spec_cases())
        groups["fuzzed encapsulated DICOMs"] = ("/predict", fuzzed_dicoms(fuzz))
        for category, (path, cases) in tqdm(groups.items(), desc="categories"):
            codes: Counter = Counter()
            each = {}
            for name, kwargs in cases:
                if path == "/training/jobs":
                    kwargs = {**kwargs, "headers": {**admin, **kwargs["headers"]}}
                resp = client.post(path, **kwargs)
                error = (
                    resp.json().get("error")
                    if resp.headers.get("content-type", "").startswith("application/json")
                    else None
                )
                codes[resp.status_code] += 1
                each[name] = f"{resp.status_code} {error or ''}".strip()
            table[category] = {
                "inputs": len(cases),
                "codes": dict(codes),
                "cases": each if len(cases) <= 12 else {},
            }
    return table


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="seconds of each loaded phase (default 15)"
    )
    parser.add_argument("--clients", type=int, default=4, help="clients looping a hostile upload (default 4)")
    parser.add_argument(
        "--attack-nice",
        type=int,
        default=0,
        help="niceness of the hostile clients' processes (default 0; 19 approximates clients on other "
        "machines, whose CPU a real server does not share)",
    )
    parser.add_argument(
        "--fuzz", type=int, default=300, help="mutated encapsulated DICOMs sent (default 300)"
    )
    parser.add_argument(
        "--phases",
        default="latency,memory,categories",
        help="which of latency,memory,categories to run (default all)",
    )
    parser.add_argument(
        "--decoders",
        type=int,
        default=None,
        help="XRAYFM_DECODE_CONCURRENCY (default: the gateway's, 4; compose sets 2)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs/bench/bench_hostile.json", help="JSON output"
    )
    args = parser.parse_args()

    image = in_domain_image(REPO.parent / "shared" / "data")
    results: dict = {"image": image[0], "cpus": psutil.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = pretrained_dir(SHIPPED)  # with its domain gate: out-of-domain inputs are refused
        redis_port, port = stack_lib.free_port(), stack_lib.free_port()
        env = {**stack_env(redis_port, checkpoint, threads=1), "XRAYFM_ADMIN_KEYS": ADMIN_KEY,
               "XRAYFM_DATA_DIRS": tmp, "XRAYFM_TRAINING_REDIS_URL": f"redis://127.0.0.1:{redis_port}/1"}  # fmt: skip
        if args.decoders:
            env["XRAYFM_DECODE_CONCURRENCY"] = str(args.decoders)
        results["decoders"] = args.decoders or GatewaySettings().decode_concurrency
        stack = stack_lib.Stack(Path(tmp) / "stack", env=env)
        try:
            stack.start_redis(redis_port)
            gateway = stack.start_gateway(port)
            worker = stack.start_worker("worker")
            url = f"http://127.0.0.1:{port}"
            stack_lib.wait_until(lambda: stack_lib.http_json(f"{url}/ready")[0] == 200, 180, "/ready", worker)
            with httpx.Client(base_url=url, timeout=120) as client:
                for _ in range(10):  # warm-up: the worker's first batches, the decoders' start
                    client.post("/predict", files={"file": image}).raise_for_status()
            phases = args.phases.split(",")
            if "latency" in phases:
                results["latency"] = under_load(url, args.seconds, args.clients, image, args.attack_nice)
            if "memory" in phases:
                results["memory"] = memory(url, gateway.pid)
            if "categories" in phases:
                results["categories"] = categories(url, args.fuzz)
            results["tracebacks_in_gateway_log"] = gateway.log.read_text(errors="replace").count("Traceback")
        finally:
            stack.stop_all()

    for line in report(results):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict) -> list[str]:
    """The figures as Markdown lines."""
    lines = [f"decoder processes: {results['decoders']}, CPUs: {results['cpus']}, image: {results['image']}"]
    lat = results.get("latency")
    if lat:
        lines += [
            "",
            "| phase | /health p50 / p95 ms | /predict p50 / p95 ms | hostile answers | hostile p50 / p95 ms |",
            "|---|---|---|---|---|",
        ]
        lines.insert(1, f"hostile clients: separate processes at niceness {lat['attack_nice']}")
        for phase, row in lat.items():
            if not isinstance(row, dict):
                continue
            hostile = row.get("hostile_answers", "")
            times = f"{row['hostile_p50_ms']:.0f} / {row['hostile_p95_ms']:.0f}" if hostile else ""
            lines.append(
                f"| {phase} | {row['health']['p50_ms']:.1f} / {row['health']['p95_ms']:.1f} | "
                f"{row['predict']['p50_ms']:.0f} / {row['predict']['p95_ms']:.0f} | {hostile} | {times} |"
            )
        for phase in ("frame_bomb", "largest_image"):
            row = lat[phase]
            lines.append(
                f"{phase}: /health p95 x{row['health_p95_ratio']:.2f}, /predict p95 x{row['predict_p95_ratio']:.2f} of alone"
            )
    if "memory" in results:
        m = results["memory"]
        lines.append(
            f"\nmemory, {m['concurrent']} concurrent {m['upload_mb']:.0f} MB uploads: gateway RSS "
            f"{m['rss_before_mb']:.0f} MB before, {m['rss_peak_mb']:.0f} MB peak, {m['rss_after_5s_mb']:.0f} MB "
            f"5 s after; answers {m['codes']}"
        )
    if "categories" in results:
        lines.append("\n| category | inputs | answers by code |\n|---|---|---|")
        fivexx = 0
        for category, row in results["categories"].items():
            fivexx += sum(n for code, n in row["codes"].items() if int(code) >= 500)
            codes = ", ".join(f"{c}: {n}" for c, n in sorted(row["codes"].items()))
            lines.append(f"| {category} | {row['inputs']} | {codes} |")
        lines.append(
            f"\n5xx answers: {fivexx}; tracebacks in the gateway log: {results['tracebacks_in_gateway_log']}"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
