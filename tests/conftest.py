"""Shared test fixtures (the team's real data folder, skipped when absent), and the slow mark on every test
that uses a fixture marked with :func:`tests.helpers.starts_processes`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; the test is skipped (with the reason) when it is absent."""
    path = shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"real data not found at {path} (set XRAYFM_SHARED_DATA)")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        info = getattr(item, "_fixtureinfo", None)  # the fixtures the test uses, with those they use
        definitions = info.name2fixturedefs.values() if info is not None else ()
        if any(getattr(d.func, "starts_processes", False) for defs in definitions for d in defs):
            item.add_marker(pytest.mark.slow)
