"""xrayfm inference worker: the served model behind a Celery queue on Redis.

Torch-free modules (``config``, ``protocol``, ``celery_app``, ``store``) are shared with the gateway;
``model``, ``predictor``, ``batcher`` and ``worker`` load torch and run only in the worker.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-inference")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
