"""Several gateway processes on one port (``XRAYFM_GATEWAY_WORKERS``, :mod:`xrayfm_gateway.serve`): real
uvicorn worker processes behind one socket, their Prometheus series added up whichever process answers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from xrayfm_gateway.serve import prepare_metrics_dir
from xrayfm_local import launcher as stack_lib

HEALTH_OK = re.compile(
    r'^xrayfm_gateway_requests_total\{method="GET",route="/health",status="200"\} (\S+)$', re.M
)


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """uvicorn's worker processes (spawned interpreters; not multiprocessing's resource tracker)."""
    found = []
    for child in parent.children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in line and "resource_tracker" not in line:
            found.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_two_processes_serve_one_port_and_metrics_add_up_across_them(tmp_path: Path) -> None:
    redis_port, port = stack_lib.free_port(), stack_lib.free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"from an earlier start")  # must not be read
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"gw-{uuid.uuid4().hex[:6]}",
        "XRAYFM_GATEWAY_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    stack = stack_lib.Stack(tmp_path / "stack", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.start_redis(redis_port)
        gateway = stack.start_gateway(port)
        parent = psutil.Process(gateway.pid)
        stack_lib.wait_until(lambda: len(_workers(parent)) == 2, 60, "two gateway processes", gateway)
        before = float(HEALTH_OK.findall(httpx.get(f"{url}/metrics", timeout=10).text)[0])  # start-up's own
        for _ in range(40):  # a new connection each: the kernel hands them to either process
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        for _ in range(6):  # whichever process answers the scrape reports all 40
            counts = HEALTH_OK.findall(httpx.get(f"{url}/metrics", timeout=10).text)
            assert counts == [str(before + 40)], (before, counts)
        # One worker killed: uvicorn starts another, and the port keeps answering meanwhile.
        victim = _workers(parent)[0]
        victim.kill()
        stack_lib.wait_until(
            lambda: len(_workers(parent)) == 2 and victim.pid not in {w.pid for w in _workers(parent)},
            60, "a replacement gateway process", gateway,
        )  # fmt: skip
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        workers = _workers(parent)
    finally:
        stack.stop_all()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive  # stopping the gateway stops its processes


def test_a_bad_process_count_stops_the_start_with_its_message() -> None:
    env = {**os.environ, "XRAYFM_GATEWAY_WORKERS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "xrayfm_gateway.serve", "--port", "1"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "XRAYFM_GATEWAY_WORKERS must be >= 1" in done.stderr


def test_the_metrics_folder_is_made_or_emptied_of_an_earlier_start(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    made = prepare_metrics_dir(env)
    try:
        assert made.is_dir() and env["PROMETHEUS_MULTIPROC_DIR"] == str(made)
    finally:
        made.rmdir()
    (tmp_path / "gauge_livesum_123.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("kept")
    assert prepare_metrics_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_shared_socket_gives_connections_without_nagle_delays() -> None:
    """Connections accepted on the socket bound for several processes get TCP_NODELAY (asyncio sets it
    only when the socket says IPPROTO_TCP; uvicorn's own leaves 0 and each keep-alive response then waits
    ~40 ms for the client's delayed ACK). uvicorn's socket is checked too, so the test shows the difference."""
    import asyncio
    import socket

    import uvicorn

    from xrayfm_gateway.serve import TcpConfig

    async def nodelay_of_accepted(sock: socket.socket) -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
            server.close()

    ours = TcpConfig("x:y", host="127.0.0.1", port=0).bind_socket()
    theirs = uvicorn.Config("x:y", host="127.0.0.1", port=0).bind_socket()
    assert ours.proto == socket.IPPROTO_TCP
    assert asyncio.run(nodelay_of_accepted(ours)) != 0
    assert asyncio.run(nodelay_of_accepted(theirs)) == 0  # uvicorn 0.54's; when it is fixed, drop TcpConfig


def test_uvicorn_serves_with_its_fast_loop_and_parser_and_redis_with_hiredis() -> None:
    """The gateway's dependencies bring uvloop, httptools and hiredis, and uvicorn's "auto" settings (what
    serve.py leaves them at) pick the first two, which take less CPU per /predict (docs/performance.md).
    They bring ISA-L too, which the library's PNG writer then uses for the heatmaps drawn there."""
    import asyncio

    import uvicorn
    import uvloop
    from redis.utils import HIREDIS_AVAILABLE

    async def app(scope, receive, send) -> None:  # pragma: no cover (never called)
        raise AssertionError

    config = uvicorn.Config(app)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    loop, plain = config.get_loop_factory()(), asyncio.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert not isinstance(plain, uvloop.Loop)  # the check tells the two apart
    finally:
        loop.close()
        plain.close()
    assert HIREDIS_AVAILABLE
    from xrayfm.data import images

    assert images.deflate.__name__ == "isal.isal_zlib"  # the gateway's heatmap PNGs (to_png_bytes)
