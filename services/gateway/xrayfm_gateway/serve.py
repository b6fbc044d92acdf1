"""Start the gateway: ``python -m xrayfm_gateway.serve --host 0.0.0.0 --port 8000`` (what the image runs).

One process by default. ``XRAYFM_GATEWAY_WORKERS=N`` starts N (uvicorn's ``workers``) sharing the port:
each has its own event loop, so uploads are decoded, results awaited and heatmaps drawn on N cores. One
process spends a few milliseconds of CPU on each ``/predict``, which caps it at about a hundred requests a
second on one core: a small model on a GPU worker can outrun that (docs/performance.md).

Several processes keep separate Prometheus counters, and ``/metrics`` is answered by whichever process
takes the connection. They therefore use prometheus_client's multiprocess mode: each writes its values
to files in ``PROMETHEUS_MULTIPROC_DIR``, and ``/metrics`` adds them up
(:func:`xrayfm_gateway.metrics.gateway_exposition`). The folder is made here, and emptied at each start
as prometheus_client requires, before any worker imports the metrics.

``uvicorn xrayfm_gateway.app:create_app --factory`` still works for one process.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from xrayfm.errors import XrayfmError
from xrayfm_stack.settings import GatewaySettings

log = logging.getLogger("uvicorn.error")  # uvicorn's own start-up lines go there
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(env: MutableMapping[str, str]) -> Path:
    """The folder the workers' metrics go to: ``PROMETHEUS_MULTIPROC_DIR`` if set (emptied of an earlier
    run's files), else a new temporary folder, named in `env` for the workers to inherit."""
    folder = Path(env.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="xrayfm-gateway-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # values of processes from an earlier start
        stale.unlink()
    env[MULTIPROC_ENV] = str(folder)
    return folder


class TcpConfig(uvicorn.Config):
    """uvicorn's settings, except that the one listening socket bound for several processes says it is TCP.

    uvicorn 0.54 creates that socket with ``proto`` 0. Accepted connections inherit it, and asyncio only
    turns Nagle's algorithm off (``TCP_NODELAY``) on sockets that say ``IPPROTO_TCP``. Every keep-alive
    response would then wait for the client's delayed ACK, adding tens of milliseconds to every request
    (an open uvicorn bug). One process is not affected: asyncio binds that socket itself."""

    def bind_socket(self) -> socket.socket:  # noqa: D102 (uvicorn's)
        family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise SystemExit(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        sock.set_inheritable(True)
        return sock


def main(argv: list[str] | None = None) -> int:
    """Parse the options, then serve until stopped."""
    parser = argparse.ArgumentParser(
        description="Serve the xrayfm gateway. Processes: XRAYFM_GATEWAY_WORKERS (default 1); every other "
        "setting comes from the XRAYFM_* environment (services/README.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request line (off: requests are counted in /metrics)",
    )
    args = parser.parse_args(argv)
    try:  # a bad setting stops here, with its message, before any worker starts
        settings = GatewaySettings.from_env()
    except XrayfmError as exc:
        parser.error(str(exc))
    app = "xrayfm_gateway.app:create_app"
    if settings.workers == 1 and not os.environ.get(MULTIPROC_ENV):
        uvicorn.run(app, factory=True, host=args.host, port=args.port, access_log=args.access_log)
        return 0
    own_folder = not os.environ.get(MULTIPROC_ENV)  # a temporary one, removed when the gateway stops
    folder = prepare_metrics_dir(os.environ)
    config = TcpConfig(
        app,
        factory=True,
        host=args.host,
        port=args.port,
        workers=settings.workers,
        access_log=args.access_log,
    )
    sock = config.bind_socket()
    log.info("gateway: %d process(es) on %s:%d", settings.workers, args.host, sock.getsockname()[1])
    try:
        if settings.workers == 1:  # PROMETHEUS_MULTIPROC_DIR set by the deployment: one process still
            uvicorn.Server(config).run(sockets=[sock])
        else:
            Multiprocess(config, sockets=[sock]).run()  # as uvicorn.run does, with this socket
    finally:
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
