"""xrayfm_local: run the whole xrayfm stack as local processes from a checkout (``make up`` / ``make down``).

    python -m xrayfm_local up | down | status

:mod:`xrayfm_local.launcher` holds the :class:`~xrayfm_local.launcher.Stack` that also starts the stacks of
the integration tests and the benchmarks. A development tool: installed in the dev venv (``make install``),
in no image. It imports the contracts package (``xrayfm_stack``) and no service: it starts them as processes.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-local")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
