"""xrayfm: X-ray foundation models — data, training, adaptation, evaluation, explanations."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# What every answer says of its model unless the model's metadata has an `intended_use` of its own
# (torch-free here: the stack and the web UI show it too).
RESEARCH_USE = "Research use only: not a medical device, not for diagnosis or any clinical decision."
