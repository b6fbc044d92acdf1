"""xrayfm_stack: what the services of the xrayfm stack share, and nothing else (no torch).

- :mod:`xrayfm_stack.settings`: one settings object per service, read from ``XRAYFM_*`` variables;
- :mod:`xrayfm_stack.protocol`: the wire protocol (typed pydantic models of requests and answers);
- :mod:`xrayfm_stack.celery`: the Celery configuration and task names of both queues;
- :mod:`xrayfm_stack.store`: the model store (read side and write side);
- :mod:`xrayfm_stack.jobs`: training job records and the first-start bootstrap's state in Redis;
- :mod:`xrayfm_stack.spec`: the training job spec and its check.

Services import this package and the library, never each other. It holds no decoding or drawing code
(that is the library's), and the local launcher is a package of its own (``xrayfm_local``, in no image).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-stack")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
