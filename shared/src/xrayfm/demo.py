"""Deprecated alias of :mod:`xrayfm.train.demo`, kept until the training service imports from there."""

from xrayfm.train.demo import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
