"""Preprocessing cache: decode every radiograph once, then train from a memory-mapped uint8 array.

``prepare_cache(dataset, out)`` (:mod:`xrayfm.data.cache.build`) decodes each source image once, on all
cores, into a folder that epochs read without any JPEG work; :mod:`xrayfm.data.cache.layout` defines that
folder (files, manifest, index) and reads and checks it. ``CachedDataset``
(:mod:`xrayfm.data.torch_dataset`) serves it to training.
"""

from __future__ import annotations

from xrayfm.data.cache.build import prepare_cache
from xrayfm.data.cache.layout import (
    FILES,
    FORCE_HINT,
    FORMAT,
    FORMAT_VERSION,
    VERIFY_MODES,
    read_index,
    read_manifest,
    stale_sources,
    verify_cache,
)

__all__ = [
    "FILES",
    "FORCE_HINT",
    "FORMAT",
    "FORMAT_VERSION",
    "VERIFY_MODES",
    "prepare_cache",
    "read_index",
    "read_manifest",
    "stale_sources",
    "verify_cache",
]
