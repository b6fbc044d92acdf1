"""Promotion without a restart: real Redis, a real Celery inference worker serving from the model store,
real uvicorn. Four clients keep /predict busy while versions are promoted, rolled back, and a broken
version is promoted; no request may fail and the answers must follow the pointer."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import starts_processes
from tests.services.svc_helpers import phantom, png_bytes, start_stack
from xrayfm_stack import store as model_store

CLIENTS = 4
NAME = "tiny"


@pytest.fixture(scope="module")
@starts_processes
def store_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """A stack whose worker serves `tiny/1` from a fresh store (versions 1 and 2: the same weights)."""
    home = tmp_path_factory.mktemp("hotswap")
    store = home / "store"
    assert model_store.add_version(store, NAME, tiny_model) == "1"
    assert model_store.add_version(store, NAME, tiny_model) == "2"
    model_store.promote(store, NAME, "1")
    running = start_stack(
        home, tiny_model, XRAYFM_MODEL_PATH="", XRAYFM_MODEL_STORE=str(store), XRAYFM_MODEL_POLL_S="0.3"
    )
    yield running, store
    running.stack.stop_all()


class Load:
    """`CLIENTS` threads posting /predict back to back; records (status, served version) in order."""

    def __init__(self, running) -> None:
        self.running = running
        self.answers: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _client(self, seed: int) -> None:
        body = png_bytes(phantom(seed=seed))
        with self.running.client() as http:
            while not self._stop.is_set():
                answer = http.post("/predict", params={"explain": "false"}, files={"file": ("x.png", body)})
                version = answer.json().get("model", {}).get("version") if answer.status_code == 200 else None
                with self._lock:
                    self.answers.append((answer.status_code, version))

    def versions_since(self, start: int) -> list[str | None]:
        with self._lock:
            return [v for _, v in self.answers[start:]]

    def wait_for(self, version: str, timeout: float = 20.0) -> int:
        """Wait until 2 x CLIENTS answers in a row name `version`; returns the answer count then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                tail = [v for _, v in self.answers[-2 * CLIENTS :]]
                count = len(self.answers)
            if len(tail) == 2 * CLIENTS and set(tail) == {version}:
                return count
            time.sleep(0.1)
        raise AssertionError(f"answers never switched to version {version}: last {self.versions_since(-20)}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _heartbeats(running) -> list[dict]:
    import redis

    client = redis.Redis.from_url(running.redis_url)
    try:
        keys = client.keys(f"{running.queue}:worker:*")
        return [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []
    finally:
        client.close()


def test_promote_and_rollback_under_load(store_stack) -> None:
    running, store = store_stack
    with Load(running) as load:
        load.wait_for("1")
        model_store.promote(store, NAME, "2")
        load.wait_for("2")
        model_store.rollback(store)
        load.wait_for("1")
        time.sleep(0.5)
    statuses = [status for status, _ in load.answers]
    assert statuses and set(statuses) == {200}, f"failed requests: {[s for s in statuses if s != 200]}"
    versions = [v for _, v in load.answers]
    # one switch each way: 1... 2... 1... (answers of concurrent clients may interleave at each switch)
    first_two, last_two = versions.index("2"), len(versions) - 1 - versions[::-1].index("2")
    assert "1" in versions[:first_two] and "1" in versions[last_two + 1 :]
    assert versions.count("2") >= 2 * CLIENTS


def test_broken_version_keeps_serving_the_old_one(store_stack, tmp_path: Path) -> None:
    running, store = store_stack
    broken = tmp_path / "broken"
    shutil.copytree(store / "models" / NAME / "1", broken)
    (broken / "version.json").unlink()
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    bad = model_store.add_version(store, NAME, broken)
    before = model_store.serving(store)["version"]
    with Load(running) as load:
        load.wait_for(before)
        model_store.promote(store, NAME, bad)
        deadline = time.monotonic() + 20
        while not (errors := [b["swap_error"] for b in _heartbeats(running) if b.get("swap_error")]):
            assert time.monotonic() < deadline, f"no swap error reported: {_heartbeats(running)}"
            time.sleep(0.1)
        assert f"{NAME}/{bad}" in errors[0]
        seen = len(load.answers)
        time.sleep(1.0)
        assert set(load.versions_since(seen)) == {before}  # still the old model
        model_store.rollback(store)  # back to `before`: the error is cleared
        deadline = time.monotonic() + 20
        while any(beat.get("swap_error") for beat in _heartbeats(running)):
            assert time.monotonic() < deadline, "swap error not cleared after rollback"
            time.sleep(0.1)
    assert {status for status, _ in load.answers} == {200}
    beat = _heartbeats(running)[0]
    assert beat["ready"] and beat["model"]["version"] == before


def test_swap_error_names_the_version(tmp_path: Path) -> None:
    """The watcher in process: a failing load keeps `served`, names the version, and is not retried until
    the pointer is written again."""
    from xrayfm_inference.swap import ServingWatcher

    for tag in ("a", "b"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "meta.json").write_text("{}")
        model_store.add_version(tmp_path / "store", NAME, tmp_path / tag)
    model_store.promote(tmp_path / "store", NAME, "1")
    calls: list[str] = []

    def load(ref) -> None:
        calls.append(ref.version)
        if ref.version == "2":
            raise RuntimeError("corrupt weights")

    watcher = ServingWatcher(tmp_path / "store", 1.0, load)
    assert watcher.check() and watcher.served == (NAME, "1") and watcher.error is None
    assert not watcher.check()  # pointer unchanged: nothing read, nothing loaded
    model_store.promote(tmp_path / "store", NAME, "2")
    assert not watcher.check()
    assert watcher.served == (NAME, "1") and "tiny/2" in watcher.error and "corrupt weights" in watcher.error
    assert not watcher.check() and calls == ["1", "2"]  # not retried on every poll
    model_store.rollback(tmp_path / "store")
    assert not watcher.check() and watcher.error is None and calls == ["1", "2"]


def test_operating_point_applies_without_a_reload(store_stack) -> None:
    """Setting the served version's threshold through the store: within a poll every answer decides with
    it and says so; clearing it goes back to the uncalibrated default. The model is not reloaded."""
    running, store = store_stack
    served = model_store.serving(store)
    body = png_bytes(phantom(seed=3))

    def answer() -> dict:
        with running.client() as http:
            reply = http.post("/predict", params={"explain": "false"}, files={"file": ("x.png", body)})
        assert reply.status_code == 200, reply.text
        return reply.json()

    first = answer()
    assert (
        first["model"]["threshold_source"] == "default 0.5 (not calibrated)"
        and first["model"]["threshold"] == 0.5
    )
    p, label = first["probability"], first["model"]["labels"][0]
    try:
        for threshold, expected in ((min(1.0, p + 1e-4), "Normal"), (max(0.0, p - 1e-4), label)):
            source = f"test threshold {threshold:.5f}"
            model_store.set_operating_point(
                store, served["name"], served["version"], {"threshold": threshold, "source": source}
            )
            deadline = time.monotonic() + 20
            while (got := answer())["model"]["threshold_source"] != source and time.monotonic() < deadline:
                time.sleep(0.2)
            assert got["model"]["threshold"] == threshold and got["prediction"] == expected, got
            assert got["probability"] == p and got["model"]["sha256"] == first["model"]["sha256"]
    finally:
        model_store.set_operating_point(store, served["name"], served["version"], None)
    deadline = time.monotonic() + 20
    while (got := answer())["model"]["threshold"] != 0.5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got["model"]["threshold_source"] == "default 0.5 (not calibrated)"
