"""Container health check of a worker: its metrics endpoint answers and reports the model loaded.

python -m xrayfm_inference.healthcheck     # exit 0 = healthy
"""

from __future__ import annotations

import sys
import urllib.request

from xrayfm.errors import XrayfmError
from xrayfm_stack.settings import InferenceSettings


def main() -> int:
    """0 when ``xrayfm_worker_model_loaded`` is 1 on this container's metrics port, else 1."""
    try:
        port = InferenceSettings.from_env().metrics_port  # the worker's own settings: same port, same default
    except XrayfmError as exc:
        print(f"the worker's settings are wrong: {exc}")
        return 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
            text = resp.read().decode()
    except OSError as exc:
        print(f"metrics endpoint on port {port} does not answer: {exc}")
        return 1
    for line in text.splitlines():
        if line.startswith("xrayfm_worker_model_loaded "):
            return 0 if float(line.split()[1]) == 1.0 else 1
    print("no model loaded")
    return 1


if __name__ == "__main__":
    sys.exit(main())
