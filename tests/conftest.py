"""Shared test fixtures: the team's real data folder (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; the test is skipped (with the reason) when it is absent."""
    path = shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"real data not found at {path} (set XRAYFM_SHARED_DATA)")
    return path
