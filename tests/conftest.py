"""Shared test fixtures: the team's real data folder (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the real radiographs live: $XRAYFM_SHARED_DATA, else ../shared/data next to the repo."""
    return Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; the test is skipped (with the reason) when it is absent."""
    path = shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"real data not found at {path} (set XRAYFM_SHARED_DATA)")
    return path
