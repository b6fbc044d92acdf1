"""xrayfm training worker: runs pre-training and adaptation jobs from the queue, publishes model versions."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-training")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
