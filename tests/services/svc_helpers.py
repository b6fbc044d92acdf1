"""Helpers of the inference-stack tests: images made here (PNG, JPEG, DICOM with patient fields)."""

from __future__ import annotations

import base64
import io
import shutil
import struct
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from xrayfm_local import launcher as stack_lib

PATIENT_NAME = "DOE^JOHN^Q"
PATIENT_ID = "PID-7734-XRAYFM"


def phantom(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """A grey test picture: a bright ellipse on a noisy dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ellipse = ((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2 < 1
    return np.clip(40 + 150 * ellipse + rng.normal(0, 10, (height, width)), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(image: np.ndarray, patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID) -> bytes:
    """An uncompressed MONOCHROME2 DICOM with patient fields, written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.Modality = patient_name, patient_id, "CR"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = image.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def decode_map(b64: str) -> np.ndarray:
    """The API's attention map as a uint8 array."""
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def logs_text(running) -> str:
    """Everything a test stack's processes logged so far."""
    return "\n".join(p.log.read_text(errors="replace") for p in running.stack.procs if p.log.exists())


def wait_job(client, url: str, timeout: float = 30.0) -> dict:
    """Poll a job's status URL until it is done or failed."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(url).json()
        if status["status"] in ("done", "failed") or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def stack_env(redis_port: int, model: Path, **extra: str) -> dict[str, str]:
    """XRAYFM_* settings of a test stack: short timeouts so failures show within seconds."""
    return {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"xrayfm-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_MODEL_PATH": str(model),
        "XRAYFM_WORKER_METRICS_PORT": str(free_port()),
        "XRAYFM_WORKER_METRICS_ADDR": "127.0.0.1",
        "XRAYFM_TASK_TIME_LIMIT": "4",
        "XRAYFM_VISIBILITY_TIMEOUT": "5",
        "XRAYFM_HEARTBEAT_S": "0.5",
        "XRAYFM_PREDICT_TIMEOUT": "30",
        "XRAYFM_MAX_UPLOAD_MB": "8",
        "XRAYFM_RESULT_EXPIRES": "300",
        "XRAYFM_TORCH_THREADS": "1",
        # fixed, so that tests of batching do not depend on a measurement (test_worker_batching covers auto)
        "XRAYFM_BATCH_MAX": "8",
        "XRAYFM_INSECURE_NO_AUTH": "1",  # a local test stack: its training and model endpoints are open
        "XRAYFM_AUDIT_LOG": str(Path(tempfile.mkdtemp(prefix="xrayfm-audit-")) / "audit.jsonl"),
        **extra,
    }


def require_redis_server() -> None:
    """Skip the test (with the reason) when redis-server, which the test stacks start, is missing."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningStack:
    """A started stack: its launcher, URLs and settings."""

    stack: stack_lib.Stack
    redis_url: str
    queue: str
    gateway_url: str
    worker_metrics_url: str
    env: dict[str, str]
    worker: stack_lib.Proc
    gateway: stack_lib.Proc

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, timeout=60, **kwargs)

    def wait_ready(self, timeout: float = 90) -> None:
        stack_lib.wait_until(
            lambda: stack_lib.http_json(f"{self.gateway_url}/ready")[0] == 200, timeout, "/ready", self.worker
        )

    def restart_worker(self) -> stack_lib.Proc:
        """Start a fresh worker (after a test killed the previous one) and wait until it is ready."""
        self.worker = self.stack.start_worker(name=f"worker-{uuid.uuid4().hex[:6]}")
        self.wait_ready()
        return self.worker


def start_stack(home: Path, model: Path, **extra: str) -> RunningStack:
    """Private Redis + worker + gateway; the caller stops it with `.stack.stop_all()`."""
    require_redis_server()
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    env = stack_env(redis_port, model, **{"XRAYFM_FEEDBACK_DIR": str(home / "feedback"), **extra})
    launcher = stack_lib.Stack(home, env=env)
    try:
        launcher.start_redis(redis_port)
        worker = launcher.start_worker()
        gateway = launcher.start_gateway(gateway_port)
        running = RunningStack(
            stack=launcher,
            redis_url=env["XRAYFM_REDIS_URL"],
            queue=env["XRAYFM_QUEUE"],
            gateway_url=f"http://127.0.0.1:{gateway_port}",
            worker_metrics_url=f"http://127.0.0.1:{env['XRAYFM_WORKER_METRICS_PORT']}/metrics",
            env=env,
            worker=worker,
            gateway=gateway,
        )
        running.wait_ready()
    except BaseException:
        launcher.stop_all()
        raise
    return running
