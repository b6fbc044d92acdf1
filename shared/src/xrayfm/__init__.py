"""xrayfm: X-ray foundation models — data, training, adaptation, evaluation, explanations."""

__version__ = "0.1.0"
