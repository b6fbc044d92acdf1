"""xrayfm inference worker: the served model behind a Celery queue on Redis.

Torch-free modules (``config``, ``protocol``, ``celery_app``, ``store``) are shared with the gateway;
``model``, ``predictor``, ``batcher`` and ``worker`` load torch and run only in the worker.
"""

__version__ = "0.1.0"
