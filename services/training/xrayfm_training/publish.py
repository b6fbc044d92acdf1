"""Publishing a finished run into the model store: its ``best/`` folder becomes a new version.

A LoRA adapter is stored alone (small) and points at its foundation; a foundation from outside the store
is copied in first (as ``<name>-foundation``), so that every stored adapter stays loadable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.utils import to_jsonable
from xrayfm_stack.store import MODELS_DIR, VERSION_FILE, add_version


def _store_ref(store: Path, folder: Path) -> dict[str, str] | None:
    """{"name", "version"} when `folder` is a version inside the store, else None."""
    try:
        rel = folder.resolve().relative_to((Path(store) / MODELS_DIR).resolve())
    except ValueError:
        return None
    return {"name": rel.parts[0], "version": rel.parts[1]} if len(rel.parts) == 2 else None


def _foundation_in_store(
    store: Path, name: str, lineage: dict[str, Any], job_id: str, where: Path
) -> dict[str, Any]:
    """The store version of the foundation in `lineage` (copied in when it lives elsewhere); a relative
    path in `lineage` (a shipped adapter's) is relative to the adapter's folder `where`."""
    folder = where / lineage.get("path", "")
    if not (folder / "meta.json").is_file():
        raise XrayfmError(f"the foundation {folder} of this run is gone: cannot store its adapter")
    ref = _store_ref(store, folder)
    if ref is None:
        version = add_version(
            store,
            f"{name}-foundation",
            folder,
            {"job_id": job_id, "kind": "foundation", "copied_from": str(folder)},
        )
        ref = {"name": f"{name}-foundation", "version": version}
    path = (Path(store) / MODELS_DIR / ref["name"] / ref["version"]).resolve()
    return {**ref, "path": str(path), "sha256": lineage.get("sha256")}


def publish_run(
    store: Path, name: str, best: Path, job_id: str, kind: str, lineage: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Copy the run's `best` folder into the store as the next version of `name`; returns (version, info).
    `lineage` adds to the version's lineage (e.g. the tuning study a trial's checkpoint came from)."""
    meta = json.loads((best / "meta.json").read_text())
    lineage = dict(lineage or {})
    Path(store).mkdir(parents=True, exist_ok=True)  # staged in the store: `best` may be read-only (shipped)
    with tempfile.TemporaryDirectory(dir=store, prefix=".publish-") as tmp:
        staged = Path(tmp) / "v"
        shutil.copytree(best, staged)
        if isinstance(meta.get("foundation"), dict):
            foundation = _foundation_in_store(store, name, meta["foundation"], job_id, best)
            lineage["foundation"] = {k: foundation[k] for k in ("name", "version", "sha256")}
            if meta.get("format") == "xrayfm.adapted":  # the adapter finds its foundation in the store,
                # by a path relative to its own folder (models/<name>/<version>), so the store can move
                relative = f"../../{foundation['name']}/{foundation['version']}"
                meta["foundation"] = {**meta["foundation"], "path": relative}
                (staged / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        staged.joinpath(VERSION_FILE).unlink(missing_ok=True)
        info = to_jsonable(
            {
                "job_id": job_id,
                "kind": kind,
                "method": meta.get("method"),
                "metrics": meta.get("metrics"),
                "manifest_sha256": meta.get("manifest_sha256"),
                "library": meta.get("versions"),
                "lineage": lineage,
            }
        )
        version = add_version(store, name, staged, info)
    return version, info
