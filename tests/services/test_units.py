"""Unit tests of the stack's pieces without processes: settings, the queue protocol, the model store,
the heatmap geometry, the micro-batcher and the decision rule."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tests.services.svc_helpers import phantom
from xrayfm.errors import XrayfmError
from xrayfm_gateway.uploads import fit_within
from xrayfm_inference.batcher import MicroBatcher
from xrayfm_stack.protocol import JobLost, ModelInfo, ModelMap, PredictRequest, ProtocolError, WorkerAnswer
from xrayfm_stack.settings import GatewaySettings, InferenceSettings, QueueSettings
from xrayfm_stack.store import promote, resolve_model, version_dir


def test_settings_from_env_and_clear_errors():
    env = {"XRAYFM_QUEUE": "q1", "XRAYFM_TASK_TIME_LIMIT": "2.5", "XRAYFM_VISIBILITY_TIMEOUT": "9"}
    settings = QueueSettings.from_env(env)
    assert (settings.queue, settings.task_time_limit_s, settings.visibility_timeout_s) == ("q1", 2.5, 9)
    with pytest.raises(XrayfmError, match="XRAYFM_TASK_TIME_LIMIT must be a float"):
        QueueSettings.from_env({"XRAYFM_TASK_TIME_LIMIT": "soon"})
    with pytest.raises(XrayfmError, match="must exceed"):
        QueueSettings.from_env({"XRAYFM_TASK_TIME_LIMIT": "30", "XRAYFM_VISIBILITY_TIMEOUT": "10"})
    gateway = GatewaySettings.from_env({"XRAYFM_API_KEYS": " a , b,,", "XRAYFM_MAX_UPLOAD_MB": "2"})
    assert gateway.api_keys == {"a", "b"} and gateway.auth_enabled and gateway.max_upload_bytes == 2 * 2**20
    assert not GatewaySettings.from_env({}).auth_enabled
    with pytest.raises(XrayfmError, match="XRAYFM_EXPLAIN_METHOD"):
        GatewaySettings.from_env({"XRAYFM_EXPLAIN_METHOD": "lime"})
    worker = InferenceSettings.from_env({"XRAYFM_BATCH_MAX": "4", "XRAYFM_MODEL_PATH": "/m"})
    assert worker.batch_max == 4 and str(worker.model_path) == "/m"
    assert InferenceSettings.from_env({}).batch_max is None  # auto: measured at load
    assert InferenceSettings.from_env({"XRAYFM_BATCH_MAX": " Auto "}).batch_max is None
    for bad in ("0", "-2", "eight", "2.5"):
        with pytest.raises(XrayfmError, match="XRAYFM_BATCH_MAX must be auto or a whole number >= 1"):
            InferenceSettings.from_env({"XRAYFM_BATCH_MAX": bad})


def test_protocol_round_trip_is_json_and_pixel_exact():
    """The request carries no image, only its size and options; the raw pixels, read back from the
    job's inputs key, give the very image."""
    image = phantom(37, 53)
    request, data = PredictRequest.to_store(image, explain=False, method="grad_rollout", submitted_at=12.5)
    assert data == image.tobytes() and "pixels" not in json.dumps(request.model_dump())
    back = PredictRequest.parse(json.loads(json.dumps(request.model_dump())))
    np.testing.assert_array_equal(back.image(data), image)
    options = back.model_dump(include={"explain", "method", "submitted_at"})
    assert options == {"explain": False, "method": "grad_rollout", "submitted_at": 12.5}
    assert request.describe() == "<grey 53x37 explain=False>"
    with pytest.raises(JobLost, match="no longer in Redis"):  # not the request's fault: not a rejection
        back.image(None)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p.pop("height"), "height: Field required"),
        (lambda p: p.update(height=p["height"] + 1), "pixel buffer has 64 bytes, expected 9x8=72"),
        (lambda p: p.update(width=10**6), "width: Input should be less than or equal to 4096"),
        (lambda p: p.update(domain_policy="ignore"), "domain_policy"),
    ],
)
def test_protocol_rejects_malformed_requests(mutate, match):
    request, data = PredictRequest.to_store(phantom(8, 8))
    payload = request.model_dump()
    mutate(payload)
    with pytest.raises(ProtocolError, match=match):
        PredictRequest.parse(payload).image(data)


def test_protocol_refuses_non_grey_images():
    for image in (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ProtocolError, match="expected a non-empty 2-D uint8 image"):
            PredictRequest.to_store(image)


def test_model_store_resolution_and_promotion(tmp_path):
    with pytest.raises(XrayfmError, match="no model to serve"):
        resolve_model(None, tmp_path)
    for version in ("1", "2"):
        version_dir(tmp_path, "chest", version).mkdir(parents=True)
    promote(tmp_path, "chest", "1")
    assert resolve_model(None, tmp_path).version == "1"
    promote(tmp_path, "chest", "2")
    ref = resolve_model(None, tmp_path)
    assert (ref.name, ref.version, ref.path) == ("chest", "2", version_dir(tmp_path, "chest", "2"))
    with pytest.raises(XrayfmError, match="not in the store"):
        promote(tmp_path, "chest", "3")
    with pytest.raises(XrayfmError, match="invalid model name"):
        version_dir(tmp_path, "../etc", "1")
    assert resolve_model(tmp_path / "models", tmp_path / "elsewhere").version == "local"  # explicit path wins
    (tmp_path / "serving.json").write_text("{}")
    with pytest.raises(XrayfmError, match="must be JSON like"):
        resolve_model(None, tmp_path)


def test_heatmap_geometry_inverts_the_letterbox():
    from xrayfm.explain.overlay import heatmap_on_image

    heat = np.zeros((4, 4), np.float32)
    heat[:, :2] = 1.0  # the left half of the model's square input is hot
    # A tall image (100 x 50) fills the middle half of the square (columns 16..48 of 64): its left
    # edge lies in hot patch column 1, its right edge in cold column 2 (bilinear between their centres).
    out = heatmap_on_image(heat, (100, 50), 64, "pad")
    assert out.shape == (100, 50) and out.dtype == np.uint8
    assert out[:, :10].min() > 200 and out[:, 40:].max() < 55
    stretched = heatmap_on_image(heat, (100, 50), 64, "stretch")
    assert stretched[:, :10].min() > 200 and stretched[:, 40:].max() < 55
    cropped = heatmap_on_image(np.ones((4, 4), np.float32), (100, 50), 64, "crop")
    assert cropped[:25].max() == 0 and cropped[40:60].min() == 255  # only the central square is covered


def test_batcher_groups_concurrent_requests_and_keeps_order():
    seen = []

    def run(images, explain, method):
        seen.append((len(images), explain, method))
        time.sleep(0.05)
        return [{"value": int(img[0, 0])} for img in images]

    batcher = MicroBatcher(run, max_batch=4, wait_s=0.05)
    futures = [batcher.submit(np.full((2, 2), i, np.uint8)) for i in range(6)]
    assert [f.result(timeout=5)["value"] for f in futures] == list(range(6))
    assert max(size for size, _, _ in seen) == 4 and sum(size for size, _, _ in seen) == 6
    mixed = [batcher.submit(np.zeros((2, 2), np.uint8), explain=bool(i % 2)) for i in range(4)]
    for f in mixed:
        f.result(timeout=5)
    assert all(size <= 2 for size, _, _ in seen[-2:])  # options never mix within a batch
    batcher.close()


def test_batcher_passes_errors_to_every_waiter_and_goes_on():
    calls = threading.Event()

    def run(images, explain, method):
        if not calls.is_set():
            calls.set()
            raise XrayfmError("model exploded")
        return [{"ok": True} for _ in images]

    batcher = MicroBatcher(run, max_batch=8, wait_s=0.02)
    first = [batcher.submit(np.zeros((2, 2), np.uint8)) for _ in range(3)]
    for f in first:
        with pytest.raises(XrayfmError, match="exploded"):
            f.result(timeout=5)
    assert batcher.submit(np.zeros((2, 2), np.uint8)).result(timeout=5) == {"ok": True}
    batcher.close()


def test_fit_within_keeps_aspect_and_small_images():
    small = phantom(30, 20)
    assert fit_within(small, 512) is not None and fit_within(small, 512).shape == (30, 20)
    assert fit_within(phantom(1000, 250), 512).shape == (512, 128)


def test_decision_rule(tiny_model_factory):
    from xrayfm.inference import Predictor

    binary = Predictor(tiny_model_factory(["Abnormal"], threshold=0.7))
    assert binary.decide(np.array([0.69])).prediction == "Normal"
    assert binary.decide(np.array([0.7])).prediction == "Abnormal"
    multi = Predictor(tiny_model_factory(["Edema", "Effusion", "Cardiomegaly"]))
    decided = multi.decide(np.array([0.2, 0.9, 0.4]))
    assert decided.prediction == "Effusion" and decided.probability == pytest.approx(0.9)
    assert list(decided.probabilities) == ["Edema", "Effusion", "Cardiomegaly"]


def test_served_model_predicts_batches_like_single_images(tiny_model_factory):
    from xrayfm.inference import Predictor

    predictor = Predictor(tiny_model_factory(["A", "B"]))
    images = [phantom(80, 60, seed=1), phantom(40, 90, seed=2)]
    together = predictor.predict(images)
    alone = [predictor.predict([img])[0] for img in images]
    for batch_result, single in zip(together, alone, strict=True):
        assert batch_result.probabilities == pytest.approx(single.probabilities, abs=1e-5)
        np.testing.assert_array_equal(batch_result.heatmap, single.heatmap)
    assert together[0].batch_size == 2


def test_model_map_travels_exactly_and_a_worker_answer_carries_no_drawn_map(tiny_model_factory):
    """The worker sends the model's map (float32) and the geometry; through JSON, as through Redis, the
    gateway reads back the very map the library computed (and draws it with the library's one drawing
    path, :func:`xrayfm.explain.overlay.heatmap_to_base64`). A drawn map in a worker's answer is refused."""
    from xrayfm.inference import Predictor

    predictor = Predictor(tiny_model_factory(["A"], preprocessing={"size": 64, "mode": "pad"}))
    image = phantom(90, 50, seed=4)
    (raw,) = predictor.predict([image], draw=False)
    model = ModelInfo(name="m", version="1", sha256="0" * 64, labels=["A"], input_size=64, device="cpu")
    fields = {"prediction": raw.prediction, "probability": raw.probability}
    fields["probabilities"] = raw.probabilities
    model_map = ModelMap.from_array(raw.model_map, 64, "pad", image.shape)
    wire = WorkerAnswer.model_validate_json(
        WorkerAnswer(**fields, model_map=model_map, model=model).model_dump_json()
    )
    np.testing.assert_array_equal(wire.model_map.array(), raw.model_map)
    assert (wire.model_map.out_height, wire.model_map.out_width) == image.shape
    answer = wire.answer("iVBORw0KGgo=", render_ms=0.5)
    assert answer.attention_map == "iVBORw0KGgo=" and answer.timings.render_ms == 0.5
    assert "model_map" not in answer.model_dump()
    with pytest.raises(ValueError, match="attention_map"):
        WorkerAnswer(**fields, attention_map="iVBORw0KGgo=", model=model)


def test_label_count_mismatch_is_refused_at_load(tmp_path):
    from tests.helpers import make_tiny_checkpoint
    from xrayfm.inference import load_served_model

    folder = make_tiny_checkpoint(tmp_path / "m", labels=["A", "B"])
    meta = json.loads((folder / "meta.json").read_text())
    meta["labels"] = ["A", "B", "C"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(XrayfmError, match="3 labels"):
        load_served_model(folder, name="m", version="1")


def test_the_store_names_the_calibration_file_as_the_library_does():
    from xrayfm.evaluate.calibration import CALIBRATION_FILE
    from xrayfm_stack import store

    assert store.CALIBRATION_FILE == CALIBRATION_FILE


def test_domain_policy_is_refuse_by_default_and_checked():
    from xrayfm.errors import XrayfmError

    assert GatewaySettings.from_env({}).domain_policy == "refuse"
    assert GatewaySettings.from_env({"XRAYFM_DOMAIN_POLICY": " Flag "}).domain_policy == "flag"
    with pytest.raises(XrayfmError, match="XRAYFM_DOMAIN_POLICY must be one of"):
        GatewaySettings.from_env({"XRAYFM_DOMAIN_POLICY": "ignore"})


def test_a_subscriber_closed_under_subscribe_is_a_lost_redis_not_a_500():
    """The soak's Redis restart can close the subscriber's transport while a request subscribes: uvloop
    raises RuntimeError ("the handler is closed"), which must reach the caller as Redis lost (a 503)."""
    import asyncio

    from xrayfm_gateway.queue import LOST, ResultListener

    class ClosedPubSub:
        async def subscribe(self, *channels: str) -> None:
            raise RuntimeError(
                "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
            )

    class FakeRedis:
        def pubsub(self, **_kwargs):
            return ClosedPubSub()

    async def watch() -> ResultListener:
        listener = ResultListener(FakeRedis())
        with pytest.raises(LOST, match="the subscriber's connection closed"):
            await listener.watch("celery-task-meta-x")
        return listener

    listener = asyncio.run(watch())
    assert listener.waiters == {}  # the failed waiter left nothing behind
