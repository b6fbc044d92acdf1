"""The containers end to end (`make compose-test`): the stack built from this working tree, started with
Compose, driven over HTTP as a user would, then removed.

Needs a Docker engine and Compose (v2 `docker compose` or docker-compose 1.29), and XRAYFM_COMPOSE_TEST=1
(`make compose-test` sets it, so that `make test` never starts a 20-minute Docker run by surprise); skipped
with the reason otherwise. The images are built by deploy/images.sh (what `make images` runs: offline base images when no
registry answers), so a warm run is a cache hit. The first start is the default one (XRAYFM_BOOTSTRAP=shipped):
the stack serves the shipped real-data model (LoRA on the shipped MAE foundation) with no training, behind its
domain gate (XRAYFM_DOMAIN_POLICY=refuse). Every real image goes through /predict (11,000 files, about 5
minutes with 4 clients here): paediatric chests are answered, other body parts refused as out of domain;
XRAYFM_COMPOSE_SAMPLE=N takes at most N of each folder of more than 300, evenly over the sorted list; the
counts are printed.

Order matters (one stack for the module): predictions, the `pacs` profile (a study pushed into Orthanc
with storescu, answered by the router while the shipped model is served), LoRA job with a kill of its
worker and a restart of the training Redis, scaling, Prometheus, a Redis restart under load, feedback, and
`down -v` last.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.dicom_studies import TIBIA, dciodvfy, kermany_images, make_study, storescu
from tests.helpers import starts_processes

pytestmark = [pytest.mark.slow, pytest.mark.real_data, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
PROJECT = "xrayfm-compose-test"
_EMPTY_TAR = bytes(1024)  # a tar archive with no member: two zero blocks
PREDICT_KEY, ADMIN_KEY = "compose-test-predict-key", "compose-test-admin-key"
SHIPPED = "cxr-vit-tiny-mae-pneumonia-lora"  # the model the default first start serves
SAMPLE = int(os.environ.get("XRAYFM_COMPOSE_SAMPLE", "0"))
PNG = b"\x89PNG\r\n\x1a\n"
DONE = ("done", "failed", "cancelled")


def shared_data_dir() -> Path:
    """The real radiographs (tests/conftest.py's rule): $XRAYFM_SHARED_DATA, else ../shared/data."""
    return Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))


# -- skip unless Docker and Compose run here ---------------------------------------------------------------
def _compose_command() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _why_not() -> str | None:
    if os.environ.get("XRAYFM_COMPOSE_TEST") != "1":
        return "builds images and runs the stack for ~20 min: opt in with XRAYFM_COMPOSE_TEST=1 (make compose-test)"
    if not shutil.which("docker"):
        return "no docker client (apt-get install docker.io; .ci/run does)"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"no Docker engine answers (start dockerd): {probe.stderr.strip().splitlines()[-1:]}"
    if _compose_command() is None:
        return "no Compose (docker compose plugin or docker-compose 1.29)"
    if not (shared_data_dir() / "README.md").exists():
        return f"real data not found at {shared_data_dir()} (set XRAYFM_SHARED_DATA)"
    return None


# -- helpers ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as error:
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: last {last!r}")


class Stack:
    def __init__(self) -> None:
        self.compose = _compose_command()
        self.ports = {
            name: _free_port() for name in ("gateway", "frontend", "prometheus", "orthanc", "orthanc_dicom")
        }
        self.profiles = ["monitoring"]  # the pacs test adds "pacs" (and `down -v` then removes it too)
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": PROJECT,
            "XRAYFM_BIND": "127.0.0.1",
            "XRAYFM_GATEWAY_PORT": str(self.ports["gateway"]),
            "XRAYFM_FRONTEND_PORT": str(self.ports["frontend"]),
            "XRAYFM_PROMETHEUS_PORT": str(self.ports["prometheus"]),
            "XRAYFM_ORTHANC_PORT": str(self.ports["orthanc"]),
            "XRAYFM_ORTHANC_DICOM_PORT": str(self.ports["orthanc_dicom"]),
            "XRAYFM_ROUTER_API_KEY": PREDICT_KEY,
            "XRAYFM_DATA_DIR": str(shared_data_dir().resolve()),
            "XRAYFM_API_KEYS": PREDICT_KEY,
            "XRAYFM_ADMIN_KEYS": ADMIN_KEY,
        }
        self.url = f"http://127.0.0.1:{self.ports['gateway']}"
        self.http = httpx.Client(base_url=self.url, timeout=90, headers={"X-API-Key": PREDICT_KEY})
        self.admin = {"X-API-Key": ADMIN_KEY}
        self.times: dict[str, float] = {}

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self.compose, *[arg for profile in self.profiles for arg in ("--profile", profile)], *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def containers(self, service: str | None = None, running_only: bool = True) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        listing = subprocess.run(
            ["docker", "ps", "-q", *([] if running_only else ["-a"]), *filters],
            capture_output=True,
            text=True,
            check=True,
        )
        return listing.stdout.split()

    def logs(self, service: str, tail: int = 80) -> str:
        return self.run("logs", "--no-color", "--tail", str(tail), service, check=False).stdout

    def ready(self) -> dict | None:
        answer = self.http.get("/ready", timeout=10)
        return answer.json() if answer.status_code == 200 else None

    def job(self, job_id: str) -> dict:
        """The job's record; {} while the gateway cannot read it (e.g. its Redis is restarting: 503)."""
        answer = self.http.get(f"/training/jobs/{job_id}", headers=self.admin)
        return answer.json() if answer.status_code == 200 else {}

    def answered_image(self, folders: tuple[str, ...] = ("mura", "kermany")) -> Path:
        """A real image the served version answers (200: in its domain), tried in `folders`' order."""
        for folder in folders:
            for image in real_images()[folder][:20]:
                if self.predict(image, explain="false").status_code == 200:
                    return image
        raise AssertionError(f"the served version refused the first 20 images of each of {folders}")

    def jobs(self) -> list[dict]:
        return self.http.get("/training/jobs", headers=self.admin).json()["jobs"]

    def wait_job(self, job_id: str, until: Callable[[dict], bool], timeout: float) -> dict:
        try:
            return wait_until(
                lambda: next((j for j in [self.job(job_id)] if until(j)), None), timeout, job_id
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.job(job_id)}\n{self.logs('training')}") from None

    def predict(self, path: Path, **params) -> httpx.Response:
        return self.http.post("/predict", params=params, files={"file": (path.name, path.read_bytes())})


@pytest.fixture(scope="module")
@starts_processes
def stack():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    s = Stack()
    s.run("down", "-v", "--remove-orphans", check=False)
    # An untagged image labelled as a build stage of an earlier build: the build must remove it.
    s.stale_probe = subprocess.run(
        ["docker", "import", "--change", 'LABEL xrayfm.stage="compose-test probe"', "-"],
        input=_EMPTY_TAR, capture_output=True, check=True,
    ).stdout.decode().strip()  # fmt: skip
    started = time.monotonic()
    build = subprocess.run(
        [str(REPO / "deploy/images.sh")], cwd=REPO, env=s.env, capture_output=True, text=True, timeout=3600
    )
    s.times["build"] = time.monotonic() - started
    s.build = build
    print(f"\n[compose-test] deploy/images.sh: {s.times['build']:.0f} s\n{build.stdout}")
    # 3: built, but over a size budget (test_images_are_within_their_budgets says so); else a failed build.
    assert build.returncode in (0, 3), f"deploy/images.sh failed:\n{build.stdout}\n{build.stderr[-4000:]}"
    started = time.monotonic()
    s.run("up", "-d")
    try:
        wait_until(s.ready, 900, "/ready through the first-start bootstrap (the shipped model)", every=3)
    except AssertionError as error:
        raise AssertionError(
            f"{error}\n{s.logs('training')}\n{s.logs('inference')}\n{s.logs('gateway')}"
        ) from None
    s.times["up_to_ready"] = time.monotonic() - started
    print(f"[compose-test] up -d to /ready (shipped model): {s.times['up_to_ready']:.0f} s")
    yield s
    s.http.close()
    s.run("down", "-v", "--remove-orphans", check=False)


# -- the tests, in the order they run -----------------------------------------------------------------------
def test_images_are_within_their_budgets(stack: Stack) -> None:
    assert stack.build.returncode == 0, f"over budget (deploy/images.sh):\n{stack.build.stdout}"
    assert "the workers share the torch layer" in stack.build.stdout
    assert "torch-free (ONNX Runtime, CPU)" in stack.build.stdout  # the CPU inference image's own budget


def test_a_build_leaves_no_stale_images_behind(stack: Stack) -> None:
    """deploy/images.sh removes the untagged images of earlier builds that it did not use (the probe made
    before it ran) and the torch base's build stage, so that rebuilds do not fill the disk."""
    gone = subprocess.run(["docker", "image", "inspect", stack.stale_probe], capture_output=True)
    assert gone.returncode != 0, f"the stale probe image {stack.stale_probe} is still there"
    used = set(re.findall(r"^ ---> ([0-9a-f]{12})$", (REPO / "build/images.log").read_text(), flags=re.M))
    left = {
        image[len("sha256:") :][:12]
        for label in ("xrayfm.stage", "xrayfm.image")
        for image in subprocess.run(
            ["docker", "images", "-q", "--no-trunc", "--filter", "dangling=true", "--filter", f"label={label}"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
    }  # fmt: skip
    assert left <= used, f"untagged images of earlier builds left behind: {sorted(left - used)}"
    stage = subprocess.run(
        ["docker", "images", "-qa", "--filter", "label=xrayfm.stage=torch-base build"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert not stage.stdout.split(), "the torch base's build stage (~9 GB) was kept"


def test_the_inference_image_has_no_torch_and_refuses_gradient_methods_with_422(stack: Stack) -> None:
    """docker-compose.yml's worker is the torch-free one: torch does not import in its image, it serves the
    shipped model's stored graph, and gradient methods get 422 method_unavailable naming what it serves."""
    image = f"xrayfm/inference:{stack.env.get('XRAYFM_TAG', 'local')}"
    probe = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", image, "-c", "import torch"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr[-2000:]
    chest = kermany_images(shared_data_dir(), "NORMAL")[0]
    answer = stack.predict(chest, method="grad_rollout")
    assert answer.status_code == 422 and answer.json()["error"] == "method_unavailable", answer.text
    assert "onnxruntime" in answer.text and "rollout" in answer.text
    served = stack.predict(chest)
    assert served.status_code == 200 and served.json()["runtime"].startswith("onnxruntime"), served.text


def _spread(paths: list[Path], limit: int) -> list[Path]:
    if limit <= 0 or len(paths) <= limit:
        return paths
    step = len(paths) / limit
    return [paths[int(i * step)] for i in range(limit)]


def real_images() -> dict[str, list[Path]]:
    data = shared_data_dir()
    folders = {
        "chexpert-valid": sorted(data.glob("chexpert-small-valid/CheXpert-v1.0-small/valid/*/*/*.jpg")),
        "mura": sorted(data.glob("mura-humerus-64/MURA-v1.1/*/XR_HUMERUS/*/*/*.jpg")),
        "dicom": sorted(data.glob("dicom-radiographs/*.dcm")),
        "kermany": sorted(data.glob("kermany-pneumonia/chest_xray/train/*/*.jpeg")),
        "nih": sorted(data.glob("nih-cxr14-1000-64/images/*.png")),
        "pneumoniamnist": sorted(data.glob("pneumoniamnist/png/*/*/*.png")),
    }
    return {name: _spread(paths, SAMPLE) if len(paths) > 300 else paths for name, paths in folders.items()}


# The shipped model's domain: paediatric chests (answered), other body parts (refused); adult chests lie
# outside it too, and most are refused (bench/domain_gate.py), but either answer is honest for them.
IN_DOMAIN, OUT_OF_DOMAIN = ("kermany", "pneumoniamnist"), ("mura", "tibia-dicom")


def test_real_images_are_answered_in_the_models_domain_refused_outside_and_junk_gets_4xx(
    stack: Stack,
) -> None:
    def check(item: tuple[str, Path]) -> tuple[str, int, str | None]:
        folder, path = item
        with httpx.Client(base_url=stack.url, timeout=90, headers={"X-API-Key": PREDICT_KEY}) as http:
            answer = http.post("/predict", files={"file": (path.name, path.read_bytes())})
        body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
        if answer.status_code == 422 and body.get("error") == "out_of_domain":
            return (
                folder,
                422,
                None if body.get("domain", {}).get("reasons") else f"{path}: no reasons {body}",
            )
        if answer.status_code != 200:
            return folder, answer.status_code, f"{path}: {answer.status_code} {answer.text[:200]}"
        if not base64.b64decode(body["attention_map"]).startswith(PNG) or not 0 <= body["probability"] <= 1:
            return folder, 200, f"{path}: no PNG map or a bad probability"
        if body["model"]["name"] != SHIPPED or body["model"]["synthetic"] or not body["model"]["notice"]:
            return folder, 200, f"{path}: not the shipped real-data model with its notice: {body['model']}"
        if not body["domain"]["in_domain"]:
            return folder, 200, f"{path}: answered though out of domain: {body['domain']}"
        return folder, 200, None

    images = real_images()
    images["tibia-dicom"] = [p for p in images.pop("dicom") if p.name.startswith("RG3")]
    images["adult-chest-dicom"] = [p for p in shared_data_dir().glob("dicom-radiographs/RG1_*.dcm")]
    counts = {folder: len(paths) for folder, paths in images.items()}
    assert all(counts.values()), counts
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, [(f, p) for f, paths in images.items() for p in paths]))
    elapsed = time.monotonic() - started
    failures = [problem for _, _, problem in results if problem]
    answered = {f: sum(1 for g, code, _ in results if g == f and code == 200) / counts[f] for f in counts}
    print(f"[compose-test] /predict on {sum(counts.values())} real images {counts} in {elapsed:.0f} s; "
          f"share answered (the rest refused out_of_domain): {answered}")  # fmt: skip
    assert not failures, failures[:20]
    for folder in IN_DOMAIN:
        assert answered[folder] >= 0.95, answered
    for folder in OUT_OF_DOMAIN:
        assert answered[folder] <= 0.05, answered

    jpeg = next(iter(real_images()["chexpert-valid"])).read_bytes()
    junk = {
        "empty.png": b"",
        "noise.png": random.Random(0).randbytes(4096),
        "notes.txt": b"not an image at all",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "fake.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00" * 50,
    }
    for name, content in junk.items():
        answer = stack.http.post("/predict", files={"file": (name, content)})
        assert 400 <= answer.status_code < 500, f"{name}: {answer.status_code} {answer.text[:200]}"
    assert (
        stack.http.post("/predict", content=b"raw", headers={"Content-Type": "image/png"}).status_code < 500
    )
    assert httpx.get(stack.url + "/predict", timeout=10).status_code == 405
    no_key = httpx.post(stack.url + "/predict", files={"file": ("a.jpg", jpeg)}, timeout=30)
    assert no_key.status_code == 401


def test_pacs_profile_answers_a_pushed_study_into_the_same_study(stack: Stack, tmp_path: Path) -> None:
    """`--profile pacs` beside the running stack (the shipped model served): Orthanc and the router. Two
    Kermany chest DICOMs (img2dcm) and the RG3 tibia as a second series, pushed with storescu to Orthanc's
    published DICOM port, get an SR and one heatmap SC per chest image in the same study (Orthanc's REST
    API, with the password the pacs-secret step generated); dciodvfy finds no errors in them; the tibia
    series gets no SC, and the audit trail says the gate skipped it."""
    missing = [tool for tool in ("storescu", "img2dcm", "dciodvfy") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"not installed: {missing} (dcmtk, dicom3tools)")
    started = time.monotonic()
    stack.profiles.append("pacs")
    stack.run("up", "-d", "orthanc", "router")
    password = stack.run("exec", "-T", "orthanc", "cat", "/run/xrayfm-pacs/orthanc-password").stdout.strip()
    assert len(password) >= 32, "no generated password"
    # The router reads its place in the feed when it starts: a study pushed before that would be past it.
    wait_until(lambda: "following" in stack.logs("router"), 120, "the router following Orthanc's changes")
    # No kept-alive connections: Docker's port proxy keeps a connection open that Orthanc closed when idle.
    orthanc = httpx.Client(base_url=f"http://127.0.0.1:{stack.ports['orthanc']}", auth=("xrayfm", password),
                           timeout=30, limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip
    assert httpx.get(f"{orthanc.base_url}/system", timeout=10).status_code == 401  # authentication on
    assert orthanc.get("/system").status_code == 200
    up = time.monotonic() - started

    data = shared_data_dir()
    files = make_study(tmp_path / "study", kermany_images(data, "PNEUMONIA")[:2], tibia=data / TIBIA,
                       patient=("COMPOSE^TEST", "COMPOSE-1"))  # fmt: skip
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    chests = {str(h.SOPInstanceUID) for h in headers[:2]}
    tibia = headers[2]
    storescu(files, stack.ports["orthanc_dicom"])
    pushed = time.monotonic()
    [found] = orthanc.post("/tools/lookup", content=str(headers[0].StudyInstanceUID)).json()

    def results() -> dict[str, list[str]] | None:
        kinds: dict[str, list[str]] = {}
        for series_id in orthanc.get(f"/studies/{found['ID']}").json()["Series"]:
            series = orthanc.get(f"/series/{series_id}").json()
            if series["MainDicomTags"].get("Manufacturer") == "xrayfm":
                kind = "SR" if series["MainDicomTags"].get("Modality") == "SR" else "SC"
                kinds.setdefault(kind, []).extend(series["Instances"])
        return kinds if kinds.get("SR") and len(kinds.get("SC", [])) == 2 else None

    try:
        kinds = wait_until(results, 240, "an SR and two SCs in the study", every=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs('router')}\n{stack.logs('gateway', 40)}") from None
    answered = time.monotonic() - pushed
    assert len(kinds["SR"]) == 1 and set(kinds) == {"SR", "SC"}, kinds
    sources = set()
    for instance in [*kinds["SR"], *kinds["SC"]]:
        path = tmp_path / f"{instance}.dcm"
        path.write_bytes(orthanc.get(f"/instances/{instance}/file").content)
        errors, warnings = dciodvfy(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        print(f"[compose-test] dciodvfy {ds.Modality}: {len(errors)} errors, warnings {warnings}")
        assert not errors, errors
        assert ds.StudyInstanceUID == headers[0].StudyInstanceUID and ds.PatientID == "COMPOSE-1"
        if ds.Modality != "SR":
            sources.add(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
    assert sources == chests  # one heatmap per chest image, none for the tibia
    tag = hashlib.sha256(str(tibia.SeriesInstanceUID).encode()).hexdigest()[:16]
    audit = stack.run("exec", "-T", "gateway", "cat", "/audit/audit.jsonl").stdout.splitlines()
    skipped = [
        r for r in map(json.loads, audit) if r["action"] == "series_skipped" and r["detail"]["series"] == tag
    ]
    assert [r["reason"] for r in skipped] == ["out_of_domain"], skipped
    orthanc.close()
    print(f"[compose-test] pacs profile: up and following {up:.0f} s; push to SR and SCs {answered:.0f} s "
          f"(Orthanc's StableAge 10 s included)")  # fmt: skip


def test_lora_on_real_mura_survives_a_kill_of_its_worker_and_a_redis_restart_then_is_served(
    stack: Stack,
) -> None:
    """A LoRA job on the real MURA subset (foundation: the shipped MAE encoder, by its name) is killed
    mid-job with `docker kill`; the restarted worker resumes it from its checkpoint; the training Redis
    (AOF on its volume) is restarted while the resumed job runs; the job is still listed, finishes, and
    publishes one version, which is promoted and served."""
    spec = {"kind": "adapt", "name": "mura-lora-compose", "config": {
        "kind": "mura", "root": "/data/mura-humerus-64/MURA-v1.1", "foundation": "xrayfm/cxr-vit-tiny-mae",
        "method": "lora", "epochs": 4, "report_on": "last", "n_bootstrap": 20, "progress_bar": False,
        "tensorboard": False, "log_every": 1, "device": "cpu", "batch_size": 32}}  # fmt: skip
    answer = stack.http.post("/training/jobs", json=spec, headers=stack.admin)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    # Mid-job: running, past its first epoch (a checkpoint to resume from), not finished.
    running = stack.wait_job(
        job_id,
        lambda j: j.get("status") in DONE or (j.get("progress") or {}).get("epoch", 0) >= 1,
        timeout=900,
    )
    assert running["status"] == "running", running
    [trainer] = stack.containers("training")
    subprocess.run(["docker", "kill", trainer], check=True, capture_output=True)
    killed_at = time.monotonic()
    # `docker kill` counts as a manual stop: the restart policy (for crashes and OOM kills) leaves it down,
    # so it is started again as an operator would; the job resumes once its lock lapsed.
    time.sleep(5)
    assert not stack.containers("training")
    subprocess.run(["docker", "start", trainer], check=True, capture_output=True)
    resumed = stack.wait_job(
        job_id,
        lambda j: j.get("status") in DONE or (j.get("attempts", 0) >= 2 and j["status"] == "running"),
        900,
    )
    assert resumed["status"] == "running", resumed  # the restart below must come mid-job
    listed = {j["job_id"] for j in stack.jobs()}
    [redis_training] = stack.containers("redis-training")
    subprocess.run(["docker", "restart", "-t", "1", redis_training], check=True, capture_output=True)
    job = stack.wait_job(job_id, lambda j: j.get("status") in DONE, timeout=1800)
    print(
        f"[compose-test] LoRA job: killed, Redis restarted, finished {time.monotonic() - killed_at:.0f} s "
        f"after the kill: {job['status']}"
    )
    assert job["status"] == "done", job
    assert job["attempts"] >= 2 and job["resumed"], job
    assert listed <= {j["job_id"] for j in stack.jobs()}  # every job listed before the restart still is
    name, version = job["model"]["name"], job["model"]["version"]
    models = stack.http.get("/models", headers=stack.admin).json()["models"]
    published = [m for m in models if m["name"] == name]
    assert [m["version"] for m in published] == [version], published  # once, whatever happened
    assert published[0]["format"] == "xrayfm.adapted" and not published[0]["synthetic"]

    promoted = stack.http.post(f"/models/{name}/{version}/promote", headers=stack.admin)
    assert promoted.status_code == 200, promoted.text
    candidates = real_images()["mura"][:10]  # in its domain now; its gate passes ~97 % of such images
    answered: list[Path] = []

    def served() -> bool:
        for image in candidates:
            answer = stack.predict(image, explain="false")
            if answer.status_code == 200 and answer.json()["model"]["name"] == name:
                answered.append(image)
                return True
        return False

    wait_until(served, 180, f"/predict served by {name}/{version}")
    body = stack.predict(answered[0]).json()
    assert body["model"]["version"] == version and base64.b64decode(body["attention_map"]).startswith(PNG)


def test_two_inference_workers_both_answer(stack: Stack) -> None:
    stack.run("up", "-d", "--no-recreate", "--scale", "inference=2")

    def two_ready() -> bool:
        ready = stack.ready()
        return bool(ready) and sum(bool(w.get("ready")) for w in ready["workers"]) >= 2

    wait_until(two_ready, 600, "two inference workers in /ready", every=3)
    image = stack.answered_image()  # in the domain of the served version (the MURA one promoted before)
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 180
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=stack.url, timeout=90, headers={"X-API-Key": PREDICT_KEY}) as http:
            while time.monotonic() < deadline and len(seen) < 2:
                answer = http.post("/predict", files={"file": (image.name, image.read_bytes())})
                assert answer.status_code == 200, answer.text
                with lock:
                    seen[answer.json()["worker"]] += 1

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"[compose-test] answers per worker: {dict(seen)}")
    assert len(seen) == 2, seen


def test_prometheus_lists_every_target_up(stack: Stack) -> None:
    prometheus = f"http://127.0.0.1:{stack.ports['prometheus']}"

    def all_up() -> list[dict] | None:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        jobs = Counter(t["labels"]["job"] for t in targets)
        if (
            jobs["xrayfm-gateway"] == 1
            and jobs["xrayfm-inference"] == 2
            and all(t["health"] == "up" for t in targets)
        ):
            return targets
        return None

    targets = wait_until(all_up, 120, "every Prometheus target up (gateway + 2 inference workers)", every=3)
    print(f"[compose-test] Prometheus targets: {[(t['scrapeUrl'], t['health']) for t in targets]}")


def test_redis_restart_under_load_answers_503_with_retry_after_never_hangs_then_200(stack: Stack) -> None:
    """`docker restart` of the inference Redis while 4 clients send /predict: every request ends (no hang):
    200, 503 with Retry-After, or 504 (a request whose queued message died with Redis, after
    XRAYFM_PREDICT_TIMEOUT); a request sent after the restart gets 200 within 10 s."""
    image = stack.answered_image()  # in the domain of the served version (the MURA one promoted before)
    outcomes: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, Retry-After)
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=stack.url, timeout=75, headers={"X-API-Key": PREDICT_KEY}) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post("/predict", params={"explain": "false"},
                                       files={"file": (image.name, image.read_bytes())})  # fmt: skip
                    status, retry = answer.status_code, answer.headers.get("Retry-After")
                except httpx.HTTPError as error:  # 0: no answer within 75 s, or the connection failed
                    status, retry = 0, type(error).__name__
                with lock:
                    outcomes.append((sent, time.monotonic(), status, retry))
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(5)
    [redis] = stack.containers("redis")
    subprocess.run(["docker", "restart", "-t", "1", redis], check=True, capture_output=True)
    restarted = time.monotonic()

    def ok_again() -> float | None:
        with lock:
            times = [
                answered for sent, answered, status, _ in outcomes if sent >= restarted and status == 200
            ]
        return min(times) - restarted if times else None

    try:
        back = wait_until(ok_again, 60, "a 200 for a request sent after the Redis restart", every=0.2)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    codes = Counter(status for _, _, status, _ in outcomes)
    slowest = max(answered - sent for sent, answered, _, _ in outcomes)
    print(f"[compose-test] Redis restart under load: {dict(codes)}; slowest answer {slowest:.1f} s; "
          f"200 again {back:.1f} s after the restart")  # fmt: skip
    assert not any(t.is_alive() for t in threads), "a request hangs"
    if not set(codes) <= {200, 503, 504}:  # 0 = no answer in 75 s
        log = [line for line in stack.logs("gateway", 3000).splitlines() if " INFO " not in line]
        raise AssertionError(f"{dict(codes)}; the gateway's log but INFO lines:\n" + "\n".join(log[-80:]))
    assert all(retry for _, _, status, retry in outcomes if status == 503), "a 503 without Retry-After"
    assert back <= 10, f"200 again only {back:.1f} s after the Redis restart"


def test_feedback_is_recorded_and_counted_per_version(stack: Stack) -> None:
    """POST /feedback on an answer of the served model: stored in the feedback volume (no image: not opted
    in), counted in /models."""
    image = stack.answered_image()
    answer = stack.predict(image, explain="false").json()
    other = next(
        c
        for c in [*answer["model"]["labels"], answer["model"]["negative_label"]]
        if c != answer["prediction"]
    )
    given = stack.http.post(
        "/feedback", json={"job_id": answer["job_id"], "verdict": "disagree", "label": other}
    )
    assert given.status_code == 201 and given.json()["image"] is None, given.text
    rows = stack.http.get("/models", headers=stack.admin).json()["models"]
    served = next(
        m for m in rows if m["name"] == answer["model"]["name"] and m["version"] == answer["model"]["version"]
    )
    assert served["feedback"]["disagree"] >= 1, served


def test_frontend_answers_and_down_v_leaves_nothing(stack: Stack) -> None:
    health = httpx.get(f"http://127.0.0.1:{stack.ports['frontend']}/_stcore/health", timeout=10)
    assert health.status_code == 200
    states = subprocess.run(
        ["docker", "inspect", "-f", "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
         *stack.containers()], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    print(f"[compose-test] health: {states.split(chr(10))}")
    assert "unhealthy" not in states, states
    stack.run("down", "-v", "--remove-orphans")
    assert stack.containers(running_only=False) == []
    volumes = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert volumes == [], volumes
    networks = subprocess.run(
        ["docker", "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert networks == [], networks
    print(f"[compose-test] times: {json.dumps({k: round(v) for k, v in stack.times.items()})}")
