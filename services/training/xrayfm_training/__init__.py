"""xrayfm training worker: runs pre-training and adaptation jobs from the queue, publishes model versions."""

__version__ = "0.1.0"
