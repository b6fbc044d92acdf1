"""A bounded load test on the real stack: 8 concurrent clients for 10 s. No 5xx, no lost response,
every answer its own, and the gateway's and worker's memory stop growing."""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest

from tests.services.svc_helpers import jpeg_bytes, phantom, png_bytes

pytestmark = pytest.mark.slow

CLIENTS, SECONDS = 8, 10.0


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def test_concurrent_clients_bounded_load(live_stack):
    images = [
        png_bytes(phantom(300, 240, seed=i)) if i % 2 else jpeg_bytes(phantom(700, 500, seed=i))
        for i in range(4)
    ]
    sent, answers, failures = [0] * CLIENTS, [[] for _ in range(CLIENTS)], []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=live_stack.gateway_url, timeout=60) as http:
            while not stop.is_set():
                sent[i] += 1
                try:
                    resp = http.post(
                        "/predict", files={"file": ("x.png", images[(i + sent[i]) % len(images)])}
                    )
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                answers[i].append(
                    (resp.status_code, resp.json().get("job_id"), resp.json().get("batch_size"))
                )

    memory: dict[str, list[float]] = {"gateway": [], "worker": []}
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    while time.monotonic() - start < SECONDS:
        memory["gateway"].append(_rss_mb(live_stack.gateway.pid))
        memory["worker"].append(_rss_mb(live_stack.worker.pid))
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:3]
    flat = [a for per_client in answers for a in per_client]
    assert len(flat) == sum(sent)  # no lost response: every request got one
    statuses = {status for status, _, _ in flat}
    assert statuses == {200}, statuses
    job_ids = [job for _, job, _ in flat]
    assert len(set(job_ids)) == len(job_ids)  # each caller got its own answer
    assert len(flat) >= 2 * CLIENTS  # the stack actually did work under load
    assert max(size for _, _, size in flat) > 1  # concurrent requests were batched
    for name, samples in memory.items():
        half = len(samples) // 2
        growth = max(samples[half:]) - max(samples[:half])
        assert growth < 40, f"{name} memory still growing: {samples}"
