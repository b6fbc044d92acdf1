"""Start the gateway: ``python -m xrayfm_gateway.serve --host 0.0.0.0 --port 8000`` (what the image runs).

One process by default. ``XRAYFM_GATEWAY_WORKERS=N`` starts N (uvicorn's ``workers``) sharing the port:
each has its own event loop, so uploads are decoded, results awaited and heatmaps drawn on N cores. One
process used ~12 ms of CPU per ``/predict`` on a 2-core machine, about 80 requests a second at most,
which a small model on a GPU worker outruns.

Several processes keep separate Prometheus counters, and ``/metrics`` is answered by whichever process
takes the connection. They therefore use prometheus_client's multiprocess mode: each writes its values
to files in ``PROMETHEUS_MULTIPROC_DIR``, and ``/metrics`` adds them up
(:func:`xrayfm_gateway.metrics.gateway_exposition`). The folder is made here, and emptied at each start
as prometheus_client requires, before any worker imports the metrics.

``uvicorn xrayfm_gateway.app:create_app --factory`` still works for one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

from xrayfm.errors import XrayfmError
from xrayfm_stack.settings import GatewaySettings

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
    if settings.workers > 1:
        prepare_metrics_dir(os.environ)
    import uvicorn

    uvicorn.run(
        "xrayfm_gateway.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=settings.workers if settings.workers > 1 else None,
        access_log=args.access_log,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
