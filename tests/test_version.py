"""The version is written once per distribution, in its pyproject.toml; packages read it from the installed
metadata (``importlib.metadata``)."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

LITERAL = re.compile(r"""^__version__\s*(:[^=]*)?=\s*["']""", re.MULTILINE)


def distributions() -> list[tuple[str, str, Path]]:
    """(distribution name, import package, its __init__.py) of the library and of every service."""
    found = []
    for pyproject in [
        REPO / "shared" / "pyproject.toml",
        *sorted((REPO / "services").glob("*/pyproject.toml")),
    ]:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
        inits = sorted(pyproject.parent.glob("xrayfm*/__init__.py")) or sorted(
            pyproject.parent.glob("src/xrayfm*/__init__.py")
        )
        assert len(inits) == 1, f"{pyproject}: one package expected, found {inits}"
        found.append((name, inits[0].parent.name, inits[0]))
    return found


DISTRIBUTIONS = distributions()


def test_the_library_and_the_services_are_all_found() -> None:
    packages = {package for _, package, _ in DISTRIBUTIONS}
    assert {"xrayfm", "xrayfm_stack", "xrayfm_training", "xrayfm_inference", "xrayfm_frontend"} <= packages


@pytest.mark.parametrize(
    "dist, package, init",
    [pytest.param(*d, id=d[1]) for d in DISTRIBUTIONS],
)
def test_a_package_reads_its_version_from_its_metadata(dist: str, package: str, init: Path) -> None:
    assert not LITERAL.search(init.read_text()), f"{init.relative_to(REPO)} writes its version itself"
    assert importlib.import_module(package).__version__ == importlib.metadata.version(dist)


def test_no_other_source_file_writes_the_version() -> None:
    version = importlib.metadata.version("xrayfm")
    pattern = re.compile(rf"""["']{re.escape(version)}["']""")
    roots = [REPO / "shared" / "src", *(p.parent for p in (REPO / "services").glob("*/pyproject.toml"))]
    found = [
        str(path.relative_to(REPO))
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if pattern.search(path.read_text())
    ]
    assert not found, found
