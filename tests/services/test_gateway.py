"""The gateway against a real stack (private redis-server, Celery worker, uvicorn): the answer's shape,
every kind of bad input, the asynchronous jobs, metrics, and what reaches Redis and the logs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.services.svc_helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    decode_map,
    dicom_bytes,
    jpeg_bytes,
    logs_text,
    phantom,
    png_bytes,
    png_with_header_size,
    wait_job,
)

pytestmark = pytest.mark.slow


def post(client, data: bytes, name: str = "image.png", path: str = "/predict", **params):
    return client.post(path, files={"file": (name, data)}, params=params)


def test_curl_line_answers_the_documented_shape(live_stack, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    image = phantom(120, 90)
    (tmp_path / "sample_xray.png").write_bytes(png_bytes(image))
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{live_stack.gateway_url}/predict", "-F", "file=@sample_xray.png"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    body = json.loads(out.stdout)
    assert body["prediction"] in ("Abnormal", "Normal")
    assert 0.0 <= body["probability"] <= 1.0
    p = body["probabilities"]["Abnormal"]
    assert body["prediction"] == ("Abnormal" if p >= 0.5 else "Normal")
    assert body["probability"] == pytest.approx(p)
    heat = decode_map(body["attention_map"])
    assert heat.shape == image.shape  # small images keep their size; the map follows the image
    assert heat.dtype == np.uint8 and heat.max() > heat.min()
    assert body["model"]["labels"] == ["Abnormal"] and len(body["model"]["sha256"]) == 64
    assert body["image"] == {"format": "PNG", "width": 90, "height": 120}
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] > 0
    assert body["explain_method"] == "rollout"


def test_map_follows_the_aspect_of_large_images(client):
    image = phantom(1200, 600)  # downscaled for transport to 512 on the long side
    body = post(client, jpeg_bytes(image), "wide.jpg").json()
    assert decode_map(body["attention_map"]).shape == (256, 128)  # XRAYFM_HEATMAP_SIDE (256) at most
    assert body["image"] == {"format": "JPEG", "width": 600, "height": 1200}


def test_same_image_same_answer_and_explain_off(client):
    data = png_bytes(phantom(seed=3))
    first, second = post(client, data).json(), post(client, data, explain="false").json()
    assert first["probabilities"] == pytest.approx(second["probabilities"], abs=1e-5)
    assert second["attention_map"] is None and second["explain_method"] is None
    other = post(client, png_bytes(255 - phantom(seed=3))).json()
    assert other["probabilities"] != first["probabilities"]  # the answer depends on the pixels


def test_gradient_rollout_method(client):
    resp = post(client, png_bytes(phantom()), method="grad_rollout")
    assert resp.status_code == 200, resp.text
    assert resp.json()["explain_method"] == "grad_rollout"


def test_gradcam_on_a_vit_is_a_clear_422(client):
    resp = post(client, png_bytes(phantom()), method="gradcam")
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"]


def test_dicom_upload(client):
    resp = post(client, dicom_bytes(phantom(100, 100)), "study.dcm")
    assert resp.status_code == 200, resp.text
    assert resp.json()["image"]["format"] == "DICOM"


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("notes.txt", b"hello, not an image", 415, "unsupported_type"),
        ("scan.gif", b"GIF89a" + b"\0" * 64, 415, "unsupported_type"),
        ("scan.png", b"GIF89a" + b"\0" * 64, 415, "unsupported_type"),  # content is not PNG/JPEG/DICOM
        ("noname", b"%PDF-1.7 not an image", 415, "unsupported_type"),
        ("empty.png", b"", 400, "empty_file"),
        ("bomb.png", png_with_header_size(60_000, 60_000), 422, "image_too_large"),
        ("line.png", png_bytes(np.zeros((2, 3000), np.uint8)), 422, "bad_dimensions"),
    ],
)
def test_bad_uploads_are_refused_at_the_gateway(client, name, data, status, code):
    resp = post(client, data, name)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == code and resp.json()["detail"]


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_truncated_images_are_400(client, kind):
    image = phantom(200, 160)
    data = {"png": png_bytes, "jpeg": jpeg_bytes, "dicom": dicom_bytes}[kind](image)
    resp = post(client, data[: len(data) * 2 // 3], f"cut.{'dcm' if kind == 'dicom' else kind}")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "corrupt_image"


def test_request_shape_errors(client):
    resp = client.post("/predict", content=png_bytes(phantom()), headers={"Content-Type": "image/png"})
    assert resp.status_code == 415 and resp.json()["error"] == "not_multipart"
    resp = client.post("/predict", files={"image": ("x.png", png_bytes(phantom()))})
    assert resp.status_code == 422 and resp.json()["error"] == "missing_file"
    resp = post(client, png_bytes(phantom()), method="magic")
    assert resp.status_code == 422


def test_oversize_upload_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (9 * 1024 * 1024)  # the test stack's limit is 8 MB
    resp = post(client, big, "big.png")
    assert resp.status_code == 413 and resp.json()["error"] == "file_too_large"


def test_async_job_submit_and_poll(client):
    resp = post(client, png_bytes(phantom(seed=5)), path="/jobs")
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["Location"] == job["status_url"] == f"/jobs/{job['job_id']}"
    first = client.get(job["status_url"]).json()
    assert first["status"] in ("queued", "running", "done")
    status = wait_job(client, job["status_url"])
    assert status["status"] == "done"
    sync = post(client, png_bytes(phantom(seed=5))).json()
    assert status["result"]["probabilities"] == pytest.approx(sync["probabilities"], abs=1e-5)
    assert status["result"]["job_id"] == job["job_id"]


def test_unknown_jobs_are_404(client):
    assert client.get("/jobs/9b2f7a1e-0000-4000-8000-000000000000").status_code == 404
    assert client.get("/jobs/not-a-uuid").status_code == 404


def test_async_job_that_fails_says_why(client):
    resp = post(client, png_bytes(phantom()), path="/jobs", method="gradcam")
    assert resp.status_code == 202
    status = wait_job(client, resp.json()["status_url"])
    assert status["status"] == "failed"
    assert status["error"].startswith("bad_request: ") and len(status["error"]) > 20


def test_a_job_whose_image_went_with_redis_fails_as_lost_not_as_the_requests_fault(live_stack, client):
    """A queued request whose image is no longer in Redis when the worker takes it (Redis restarted without
    its data, as in the soak) fails as ``JobLost``; the gateway reads the failure back by its type and
    answers "queue_unavailable" (503 on /predict: send it again), not a rejection of the request (422)
    nor a model failure (500)."""
    from xrayfm_stack.celery import inference_celery
    from xrayfm_stack.protocol import PREDICT_TASK, PredictRequest
    from xrayfm_stack.settings import QueueSettings

    settings = QueueSettings(redis_url=live_stack.redis_url, queue=live_stack.queue)
    request, _ = PredictRequest.to_store(phantom(seed=9))  # its inputs key is never written
    job_id = "6a1c0d8e-0000-4000-8000-00000000105d"
    redis.Redis.from_url(live_stack.redis_url).set(settings.job_key(job_id), json.dumps({}), ex=60)
    inference_celery(settings).send_task(PREDICT_TASK, args=(request.model_dump(),), task_id=job_id)
    status = wait_job(client, f"/jobs/{job_id}")
    assert status["status"] == "failed", status
    assert status["error"].startswith(f"queue_unavailable: job {job_id} lost: JobLost: "), status["error"]
    assert "no longer in Redis" in status["error"]


def test_health_ready_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    worker = ready.json()["workers"][0]
    assert worker["model"]["input_size"] == 64 and worker["ready"] is True
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["file"]
    assert {"/jobs", "/jobs/{job_id}", "/ready", "/health", "/metrics"} <= set(spec["paths"])


def test_gateway_and_worker_metrics(live_stack, client):
    post(client, png_bytes(phantom()))
    post(client, b"", "empty.png")
    text = client.get("/metrics").text
    assert 'xrayfm_gateway_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'xrayfm_gateway_rejected_uploads_total{reason="empty_file"}' in text
    worker = __import__("httpx").get(live_stack.worker_metrics_url, timeout=5).text
    count = [line for line in worker.splitlines() if line.startswith("xrayfm_worker_batch_size_count")]
    assert count and float(count[0].split()[-1]) >= 1
    assert "xrayfm_worker_queue_wait_seconds_bucket" in worker
    assert 'xrayfm_worker_requests_total{outcome="ok"}' in worker


def _redis_dump(client: redis.Redis) -> bytes:
    """Every key and value in the test Redis (strings, lists, hashes, sorted sets), as bytes."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            value = client.get(key) or b""
        elif kind == b"list":
            value = b"".join(client.lrange(key, 0, -1))
        elif kind == b"hash":
            value = b"".join(k + v for k, v in client.hgetall(key).items())
        elif kind == b"zset":
            value = b"".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
        else:
            value = b""
        out.append(key + b"=" + value)
    return b"\n".join(out)


def test_no_patient_data_in_redis_or_logs(live_stack, client):
    """A DICOM with patient fields, named after the patient: only pixels reach Redis; nothing is logged."""
    r = redis.Redis.from_url(live_stack.redis_url)
    data = dicom_bytes(phantom(150, 150), PATIENT_NAME, PATIENT_ID)
    filename = f"{PATIENT_NAME}_{PATIENT_ID}.dcm"
    job = post(client, data, filename, path="/jobs").json()
    snapshot = _redis_dump(r)  # right after queueing: the message is in the queue or being worked on
    resp = post(client, data, filename)
    assert resp.status_code == 200
    snapshot += _redis_dump(r)
    # Whole values only: a 3-4 byte needle ("DOE", "DICM") turns up by chance in base64 heatmaps. The DICOM
    # magic followed by the first file-meta tag (0002,0000) cannot appear in base64 text.
    for secret in (PATIENT_NAME.encode(), PATIENT_ID.encode(), b"DICM\x02\x00"):
        assert secret not in snapshot
    assert wait_job(client, job["status_url"])["status"] == "done"
    ttl = r.ttl(f"celery-task-meta-{job['job_id']}")
    assert 0 < ttl <= 300  # results expire
    logs = logs_text(live_stack)
    assert PATIENT_NAME not in logs and PATIENT_ID not in logs and filename not in logs
    # nor the answers: Celery would log each task's return value ("succeeded in 0.1s: {'prediction': ...")
    assert "succeeded in" not in logs and "'probability'" not in logs


def test_patient_data_in_a_malformed_dicom_reaches_no_log_redis_or_file(live_stack, client):
    """pydicom quotes malformed values in its warnings: a file-meta UID that holds the patient id must not
    reach a log, Redis, or any file the stack writes (its logs, pid files, model folder). The answer itself
    may name it: it goes back to the caller who sent the file."""
    data = bytearray(dicom_bytes(phantom(150, 150), PATIENT_NAME, PATIENT_ID))
    uid_at = data.find(b"1.2.840.10008.1.2.1")  # the transfer syntax UID, which decoding reads
    assert uid_at > 0
    data[uid_at : uid_at + len(PATIENT_ID)] = PATIENT_ID.encode()  # now an invalid UID quoting the patient id
    r = redis.Redis.from_url(live_stack.redis_url)
    resp = post(client, bytes(data), "scan.dcm")
    assert resp.status_code < 500, resp.text
    snapshot = _redis_dump(r)
    written = b"".join(p.read_bytes() for p in live_stack.stack.home.rglob("*") if p.is_file())
    written += b"".join(
        p.read_bytes() for p in Path(live_stack.env["XRAYFM_MODEL_PATH"]).rglob("*") if p.is_file()
    )
    for secret in (PATIENT_NAME.encode(), PATIENT_ID.encode()):
        assert secret not in snapshot and secret not in written
