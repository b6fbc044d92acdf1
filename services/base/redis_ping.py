"""Health check of the training worker's image: the training Redis answers PING within 3 s.

The worker has no HTTP port; its container is healthy while its process runs (it is PID 1) and it can
reach its queue. Reads the URL the worker reads (XRAYFM_TRAINING_REDIS_URL, else XRAYFM_REDIS_URL) and the
password file the entrypoint reads (XRAYFM_REDIS_PASSWORD_FILE). Exit status 0 = healthy.
"""

import os
import sys

import redis

url = os.environ.get("XRAYFM_TRAINING_REDIS_URL") or os.environ.get(
    "XRAYFM_REDIS_URL", "redis://127.0.0.1:6379/0"
)
password_file = os.environ.get("XRAYFM_REDIS_PASSWORD_FILE")
password = open(password_file).read().strip() if password_file else None  # noqa: SIM115 (one read, then exit)
try:
    redis.Redis.from_url(url, password=password or None, socket_timeout=3, socket_connect_timeout=3).ping()
except Exception as error:  # noqa: BLE001 - any failure is "unhealthy", with the reason
    print(f"training Redis does not answer: {type(error).__name__}", file=sys.stderr)
    sys.exit(1)
