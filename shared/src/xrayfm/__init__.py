"""xrayfm: X-ray foundation models — data, training, adaptation, evaluation, explanations."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
