"""The PACS path end to end: studies pushed into Orthanc with dcmtk's storescu, the router sending each
stable study to the gateway (STOW-RS), the SR and heatmap Secondary Captures stored back into the study.

    nice .venv/bin/python bench/bench_pacs.py [--studies 50] [--dicom-dir DIR] [--json]

By default it starts a private stack on free ports: a local Orthanc (``Stack.start_orthanc``, StableAge
``--stable-age`` seconds), Redis, one inference worker serving the shipped model with its domain gate
(XRAYFM_DOMAIN_POLICY=refuse), the gateway with an API key, and the router. With ``--orthanc-url`` it uses a
running stack instead (Orthanc's password from XRAYFM_ORTHANC_PASSWORD; its router must be running).

The studies: every study in ``--dicom-dir`` (its subfolders, one study each, or its files grouped by Study
Instance UID), else ``--studies`` made from ../shared/data: 2-4 Kermany paediatric chest JPEGs per study
(dcmtk's img2dcm; inside the shipped model's domain), and every ``--tibia-every``-th study with the real
RG3 tibia as an extra series (outside it: the gate skips it).

Measured: studies pushed; SRs and SCs written (queried from Orthanc); series skipped by the gate (the audit
log's ``series_skipped`` records when it is readable, and the source series that got no SC); dciodvfy's
errors and warnings over every SR and SC; push-to-SR seconds (from storescu's return to the SR's series in
Orthanc's changes feed) at p50 and p95. The studies are pushed one after the other as fast as storescu
goes (``--interval`` to pace them), so later studies wait for earlier ones: the router answers one study
at a time. Writes runs/bench/bench_pacs.json; ``--json`` prints the same JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]  # the tests' study builder (tests/dicom_studies.py, the tests package)

from tests.dicom_studies import TIBIA, dciodvfy, kermany_images, make_study, storescu  # noqa: E402

from xrayfm.hospital.result import MANUFACTURER  # noqa: E402
from xrayfm.registry import pretrained_dir  # noqa: E402
from xrayfm_local import launcher as stack_lib  # noqa: E402

SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
API_KEY = "bench-pacs-key"


@dataclass
class Study:
    """One pushed study: its files, UID, Orthanc id, and when it was pushed and answered (monotonic s)."""

    files: list[Path]
    uid: str
    tibia: bool = False
    orthanc_id: str = ""
    pushed_at: float = 0.0
    sr_at: float | None = None


@dataclass
class Pacs:
    """The Orthanc the bench pushes to and reads from."""

    url: str
    dicom_host: str
    dicom_port: int
    password: str
    stable_age_s: float | None  # None: a running Orthanc's own setting, unknown here
    audit_log: Path | None = None  # the stack's audit log, when readable from here
    router_log: Path | None = None

    def client(self) -> httpx.Client:
        # No kept-alive connections: behind Docker's port proxy, one Orthanc closed when idle stays open.
        return httpx.Client(base_url=self.url, auth=(stack_lib.ORTHANC_USER, self.password), timeout=60,
                            limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip


# -- studies ------------------------------------------------------------------------------------------------
def made_studies(shared: Path, folder: Path, n: int, tibia_every: int, seed: int) -> list[Study]:
    """`n` studies of 2-4 Kermany chest images each (never one image twice), every `tibia_every`-th with the
    RG3 tibia as an extra series."""
    rng = random.Random(seed)
    pool = kermany_images(shared)
    rng.shuffle(pool)
    studies = []
    for k in tqdm(range(n), desc="making studies (img2dcm)", leave=False):
        jpegs = [pool.pop() for _ in range(rng.randint(2, 4))]
        tibia = tibia_every > 0 and k % tibia_every == tibia_every - 1
        files = make_study(folder / f"study{k:03d}", jpegs, tibia=shared / TIBIA if tibia else None,
                           patient=(f"BENCH^PATIENT{k:03d}", f"BENCH-{k:03d}"), accession=f"B{k:05d}")  # fmt: skip
        studies.append(
            Study(files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), tibia)
        )
    return studies


def folder_studies(folder: Path) -> list[Study]:
    """The DICOM files under `folder` (recursively), grouped by Study Instance UID."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        except Exception:  # not DICOM, or no study: not pushed
            continue
        groups.setdefault(uid, []).append(path)
    return [Study(files, uid) for uid, files in groups.items()]


# -- the stack ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def private_stack(home: Path, stable_age: int, threads: int) -> Iterator[Pacs]:
    """Orthanc, Redis, one worker (the shipped model), the gateway and the router, on free ports."""
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    http_port, dicom_port = stack_lib.free_port(), stack_lib.free_port()
    password = os.urandom(12).hex()
    audit_log = home / "audit" / "audit.jsonl"
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_TRAINING_REDIS_URL": f"redis://127.0.0.1:{redis_port}/1",
        "XRAYFM_QUEUE": f"bench-pacs-{os.urandom(3).hex()}",
        "XRAYFM_MODEL_PATH": str(pretrained_dir(SHIPPED)),  # with its domain gate
        "XRAYFM_DOMAIN_POLICY": "refuse",
        "XRAYFM_API_KEYS": API_KEY,
        "XRAYFM_ADMIN_KEYS": f"{API_KEY}-admin",
        "XRAYFM_AUDIT_LOG": str(audit_log),
        "XRAYFM_DATA_DIRS": str(home),
        "XRAYFM_FEEDBACK_DIR": str(home / "feedback"),
        "XRAYFM_WORKER_METRICS_PORT": "0",
        "XRAYFM_TORCH_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    stack = stack_lib.Stack(home / "stack", env=env)
    try:
        stack.start_orthanc(home / "orthanc", http_port, dicom_port, password, stable_age=stable_age)
        stack.start_redis(redis_port)
        worker = stack.start_worker("worker")
        stack.start_gateway(gateway_port)
        url = f"http://127.0.0.1:{gateway_port}"
        stack_lib.wait_until(lambda: stack_lib.http_json(f"{url}/ready")[0] == 200, 300, "/ready", worker)
        router = stack.start_router({
            "XRAYFM_ORTHANC_URL": f"http://127.0.0.1:{http_port}", "XRAYFM_ORTHANC_PASSWORD": password,
            "XRAYFM_GATEWAY_URL": url, "XRAYFM_ROUTER_API_KEY": API_KEY,
            "XRAYFM_ROUTER_REDIS_URL": env["XRAYFM_TRAINING_REDIS_URL"], "XRAYFM_ROUTER_POLL_S": "0.5",
            "XRAYFM_ROUTER_BACKFILL": "1",
        })  # fmt: skip
        yield Pacs(f"http://127.0.0.1:{http_port}", "127.0.0.1", dicom_port, password, stable_age,
                   audit_log, router.log)  # fmt: skip
    finally:
        stack.stop_all()


# -- measuring ----------------------------------------------------------------------------------------------
class SrWatcher(threading.Thread):
    """Follows Orthanc's changes feed from `since`: the first time each study gets an SR series of the
    stack's (Manufacturer xrayfm, Modality SR), keyed by the study's Orthanc id."""

    def __init__(self, pacs: Pacs, since: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pacs, self.since, self.every = pacs, since, every
        self.sr_at: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.pacs.client() as http:
            while not self.stopping.is_set():
                page = http.get("/changes", params={"since": self.since, "limit": 1000}).json()
                seen = time.monotonic()
                for change in page["Changes"]:
                    self.since = int(change["Seq"])
                    if change["ChangeType"] != "NewSeries":
                        continue
                    series = http.get(f"/series/{change['ID']}").json()
                    tags = series.get("MainDicomTags", {})
                    if tags.get("Manufacturer") == MANUFACTURER and tags.get("Modality") == "SR":
                        self.sr_at.setdefault(series["ParentStudy"], seen)
                if page["Done"]:
                    self.stopping.wait(self.every)


def results_of(http: httpx.Client, study: Study) -> dict[str, list[str]]:
    """The stack's result instances in a study: ``SR`` and ``SC`` (Orthanc instance ids)."""
    found: dict[str, list[str]] = {"SR": [], "SC": []}
    if not study.orthanc_id:
        return found
    for series_id in http.get(f"/studies/{study.orthanc_id}").json()["Series"]:
        series = http.get(f"/series/{series_id}").json()
        tags = series["MainDicomTags"]
        if tags.get("Manufacturer") == MANUFACTURER:
            found["SR" if tags.get("Modality") == "SR" else "SC"] += series["Instances"]
    return found


def router_done(router_log: Path | None) -> set[str]:
    """The Orthanc ids of the studies the router is done with, by its log (``study <id>: <outcome>``,
    ``study <id> not answered``); empty when its log is not readable here."""
    if router_log is None or not router_log.is_file():
        return set()
    return set(
        re.findall(r"study ([0-9a-f-]{44})(?::| not answered)", router_log.read_text(errors="replace"))
    )


def series_tag(series_uid: str) -> str:
    """A series as the audit log names it: the first 16 hex digits of its UID's SHA-256."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def measure(pacs: Pacs, studies: list[Study], interval: float, wait_s: float, tmp: Path) -> dict:
    """Push the studies, wait for their SRs, then count and check what came back."""
    with pacs.client() as http:
        since = int(http.get("/changes", params={"last": ""}).json()["Last"])
        watcher = SrWatcher(pacs, since)
        watcher.start()
        started = time.monotonic()
        for study in tqdm(studies, desc="storescu", leave=False):
            storescu(study.files, pacs.dicom_port, pacs.dicom_host)
            study.pushed_at = time.monotonic()
            [found] = http.post("/tools/lookup", content=study.uid).json()
            study.orthanc_id = found["ID"]
            time.sleep(interval)
        pushed_s = time.monotonic() - started
        # Wait until every study has its SR or the router says it is done with it (a study whose every
        # series the gate refused gets no SR), or nothing new came for `wait_s` seconds.
        bar, last_new, answered = (
            tqdm(total=len(studies), desc="studies answered", leave=False),
            time.monotonic(),
            0,
        )
        while answered < len(studies) and time.monotonic() - last_new < wait_s:
            finished = router_done(pacs.router_log)
            now = sum(1 for s in studies if s.orthanc_id in watcher.sr_at or s.orthanc_id in finished)
            if now > answered:
                bar.update(now - answered)
                answered, last_new = now, time.monotonic()
            time.sleep(0.5)
        bar.close()
        watcher.stopping.set()
        watcher.join()
        for study in studies:
            if study.orthanc_id in watcher.sr_at:
                study.sr_at = watcher.sr_at[study.orthanc_id]
        all_done_s = max((s.sr_at for s in studies if s.sr_at), default=started) - started

        # What came back: counts, dciodvfy on each object, the sources each capture covers.
        results = {s.uid: results_of(http, s) for s in studies}
        errors, warnings, error_lines, warning_lines = 0, 0, Counter(), Counter()
        covered: set[str] = set()  # SOP Instance UIDs of the sources that have a capture
        objects = [(kind, i) for r in results.values() for kind in ("SR", "SC") for i in r[kind]]
        for kind, instance in tqdm(objects, desc="dciodvfy", leave=False):
            path = tmp / f"{instance}.dcm"
            path.write_bytes(http.get(f"/instances/{instance}/file").content)
            found_errors, found_warnings = dciodvfy(path)
            errors, warnings = errors + len(found_errors), warnings + len(found_warnings)
            error_lines.update(found_errors)
            warning_lines.update(re.sub(r"\s+", " ", w) for w in found_warnings)
            if kind == "SC":
                sc = pydicom.dcmread(path, stop_before_pixels=True)
                covered.add(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID))
            path.unlink()

    series_of: dict[str, set[str]] = {}  # series UID -> SOP Instance UIDs, of the sources
    tibia_series: set[str] = set()
    for study in studies:
        for path in study.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            series_of.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
            if path.name == "tibia.dcm":
                tibia_series.add(str(ds.SeriesInstanceUID))
    without_sc = {uid for uid, sops in series_of.items() if not sops & covered}
    latencies = [s.sr_at - s.pushed_at for s in studies if s.sr_at is not None]
    figures = {
        "studies_pushed": len(studies),
        "instances_pushed": sum(len(s.files) for s in studies),
        "series_pushed": len(series_of),
        "studies_with_tibia": sum(s.tibia for s in studies),
        "srs_written": sum(len(r["SR"]) for r in results.values()),
        "scs_written": sum(len(r["SC"]) for r in results.values()),
        "studies_without_sr": sum(1 for r in results.values() if not r["SR"]),
        "series_without_sc": len(without_sc),
        "tibia_series_with_sc": len(tibia_series - without_sc),
        "dciodvfy": {
            "objects": len(objects),
            "errors": errors,
            "warnings": warnings,
            "error_lines": dict(error_lines.most_common(10)),
            "warning_lines": dict(warning_lines.most_common(10)),
        },  # fmt: skip
        "push_to_sr_s": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "min": percentile(latencies, 0),
            "max": percentile(latencies, 100),
            "n": len(latencies),
        },  # fmt: skip
        "push_s": round(pushed_s, 1),
        "first_push_to_last_sr_s": round(all_done_s, 1),
        "studies_per_minute": round(60 * len(latencies) / all_done_s, 1) if all_done_s > 0 else None,
        "stable_age_s": pacs.stable_age_s,
        "interval_s": interval,
    }
    figures |= skipped_in_audit(pacs.audit_log, {series_tag(uid) for uid in series_of})
    figures |= router_seconds(pacs.router_log)
    return figures


def skipped_in_audit(audit_log: Path | None, tags: set[str]) -> dict:
    """The ``series_skipped`` records of the pushed series, by reason (when the audit log is readable)."""
    if audit_log is None or not audit_log.is_file():
        return {"series_skipped_by_gate": None}
    reasons: Counter = Counter()
    for line in audit_log.read_text().splitlines():
        record = json.loads(line)
        if record.get("action") == "series_skipped" and (record.get("detail") or {}).get("series") in tags:
            reasons[record.get("reason")] += 1
    return {
        "series_skipped_by_gate": reasons.get("out_of_domain", 0),
        "series_skipped_by_reason": dict(reasons),
    }


def router_seconds(router_log: Path | None) -> dict:
    """The router's own seconds per answered study (its log: ``study ...: answered ... (N s)``)."""
    if router_log is None or not router_log.is_file():
        return {}
    seconds = [float(s) for s in re.findall(r"answered by job .*\((\d+\.\d+) s\)", router_log.read_text())]
    return {
        "router_s_per_study": {
            "p50": percentile(seconds, 50),
            "p95": percentile(seconds, 95),
            "n": len(seconds),
        }
    }


def machine() -> str:
    """The CPU model and count, and whether a GPU is visible."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found[1].strip() if found else model
    gpu = subprocess.run(
        ["sh", "-c", "command -v nvidia-smi && nvidia-smi -L"], capture_output=True, text=True
    )
    return f"{os.cpu_count()} x {model}; GPU: {gpu.stdout.strip().splitlines()[-1] if gpu.returncode == 0 else 'none'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--studies", type=int, default=50, help="studies made from ../shared/data (default 50)"
    )
    parser.add_argument("--dicom-dir", type=Path, help="push every study under this folder instead")
    parser.add_argument("--tibia-every", type=int, default=4,
                        help="every N-th made study gets the RG3 tibia as an extra series (default 4; 0: none)")  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="which Kermany images go into which study (default 0)"
    )
    parser.add_argument("--stable-age", type=int, default=2,
                        help="the private Orthanc's StableAge: seconds without a new instance before a study "
                             "is stable (default 2; compose's Orthanc: 10)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the private worker (default 2)"
    )
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between two pushes (default 0: one after the other)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1,
                        help="studies pushed and answered first, not counted (default 1)")  # fmt: skip
    parser.add_argument("--wait", type=float, default=180.0,
                        help="stop waiting for SRs after this many seconds without a new one (default 180)")  # fmt: skip
    parser.add_argument("--orthanc-url", help="use this running Orthanc (and its router) instead of a private stack; "
                        "password from XRAYFM_ORTHANC_PASSWORD")  # fmt: skip
    parser.add_argument(
        "--gateway-url", help="with --orthanc-url: the running stack's gateway (checked for /ready)"
    )
    parser.add_argument(
        "--dicom-host", default="127.0.0.1", help="with --orthanc-url: its DICOM host (default 127.0.0.1)"
    )
    parser.add_argument(
        "--dicom-port", type=int, default=4242, help="with --orthanc-url: its DICOM port (default 4242)"
    )
    parser.add_argument("--audit-log", type=Path,
                        help="with --orthanc-url: the stack's audit log, for the series the gate skipped")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/bench_pacs.json", help="JSON output")
    parser.add_argument(
        "--logs", type=Path, help="copy the private stack's logs and audit log into this folder"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON (else a short summary)")
    args = parser.parse_args(argv)

    shared = Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp_name:
        tmp = Path(tmp_name)
        if args.dicom_dir:
            studies = folder_studies(args.dicom_dir)
            warmup = (
                made_studies(shared, tmp / "warmup", args.warmup, 0, args.seed + 1) if args.warmup else []
            )
        else:
            made = made_studies(
                shared, tmp / "studies", args.warmup + args.studies, args.tibia_every, args.seed
            )
            warmup, studies = made[: args.warmup], made[args.warmup :]
        if not studies:
            raise SystemExit(f"no DICOM study under {args.dicom_dir}")
        if args.orthanc_url:
            password = os.environ.get("XRAYFM_ORTHANC_PASSWORD")
            if not password:
                raise SystemExit("--orthanc-url needs XRAYFM_ORTHANC_PASSWORD")
            if args.gateway_url and stack_lib.http_json(f"{args.gateway_url.rstrip('/')}/ready")[0] != 200:
                raise SystemExit(f"{args.gateway_url} is not ready")
            stack = contextlib.nullcontext(Pacs(args.orthanc_url.rstrip("/"), args.dicom_host, args.dicom_port,
                                                password, None, args.audit_log))  # fmt: skip
        else:
            stack = private_stack(tmp / "home", args.stable_age, args.threads)
        with stack as pacs:
            setup_s = time.monotonic() - started
            if warmup:
                measure(pacs, warmup, 0.0, args.wait, tmp)
            figures = measure(pacs, studies, args.interval, args.wait, tmp)
            if args.logs and not args.orthanc_url:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in [*(tmp / "home" / "stack" / "logs").glob("*.log"), pacs.audit_log]:
                    shutil.copy(log, args.logs / log.name)
    figures = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "stack": "running: " + args.orthanc_url if args.orthanc_url else "private (started here)",
        "setup_s": round(setup_s, 1),
        "warmup_studies": len(warmup),
        **figures,
        "total_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        lat = figures["push_to_sr_s"]
        print(f"{figures['studies_pushed']} studies pushed: {figures['srs_written']} SRs, {figures['scs_written']} SCs; "
              f"gate skipped {figures.get('series_skipped_by_gate')} series; dciodvfy errors "
              f"{figures['dciodvfy']['errors']} (warnings {figures['dciodvfy']['warnings']}); push to SR p50 "
              f"{lat['p50']} s, p95 {lat['p95']} s (StableAge {figures['stable_age_s']} s); {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
