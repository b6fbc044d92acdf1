"""Shipped models carry no path of the machine that built them: not in their metadata, not in their cards."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_tiny_checkpoint
from xrayfm.models.shipping import export_foundation, portable_meta
from xrayfm.registry import WEIGHTS_DIR

# An absolute path as a whole value (POSIX, Windows drive or share), and the usual machine folders anywhere.
ABSOLUTE = re.compile(r"(/|[A-Za-z]:[\\/]|\\\\)\S*")
MACHINE_FOLDERS = re.compile(r"(?<![\w.])/(work|root|home|tmp|Users|mnt|data|srv|opt)/")


def strings(value: Any) -> list[str]:
    """Every string of a JSON value, keys included."""
    if isinstance(value, dict):
        return [*value, *(s for item in value.values() for s in strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def machine_paths(value: Any) -> list[str]:
    return [s for s in strings(value) if ABSOLUTE.fullmatch(s) or MACHINE_FOLDERS.search(s)]


SHIPPED_FILES = sorted(p for p in WEIGHTS_DIR.rglob("*") if p.suffix in (".json", ".md"))


def test_there_are_shipped_files_to_check() -> None:
    assert {p.name for p in SHIPPED_FILES} >= {"meta.json", "MODEL_CARD.md", "adapter_config.json"}


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: str(p.relative_to(WEIGHTS_DIR)))
def test_shipped_files_hold_no_machine_path(path: Path) -> None:
    text = path.read_text()
    if path.suffix == ".json":
        found = machine_paths(json.loads(text))
    else:
        found = [m.group(0) for m in MACHINE_FOLDERS.finditer(text)]
    assert not found, f"{path.relative_to(WEIGHTS_DIR)}: {found[:5]}"


def test_portable_meta_keeps_names_and_relative_paths() -> None:
    meta = {
        "data": {"cache": "/work/runs/x/cache/kermany-train", "root": "C:\\data\\nih\\"},
        "foundation": {"path": "../cxr-vit-tiny-mae", "name": "xrayfm/cxr-vit-tiny-mae"},
        "sources": ["\\\\server\\share\\labels.csv", "u-ones;blank=zero", 3, None],
    }
    assert portable_meta(meta) == {
        "data": {"cache": "kermany-train", "root": "nih"},
        "foundation": {"path": "../cxr-vit-tiny-mae", "name": "xrayfm/cxr-vit-tiny-mae"},
        "sources": ["labels.csv", "u-ones;blank=zero", 3, None],
    }


def test_an_exported_foundation_names_no_path_of_this_machine(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "run" / "best"
    make_tiny_checkpoint(
        run, ["A", "B"], data={"train_cache": {"cache": str(tmp_path / "cache" / "train"), "kind": "nih"}}
    )
    shipped = export_foundation(run, tmp_path / "weights" / "tiny")
    meta = json.loads((shipped / "meta.json").read_text())
    assert meta["data"]["train_cache"]["cache"] == "train" and meta["exported_from"]["path"] == "best"
    assert not machine_paths(meta) and str(tmp_path) not in (shipped / "meta.json").read_text()
