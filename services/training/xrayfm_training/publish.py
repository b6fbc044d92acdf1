"""Publishing a finished run into the model store: its ``best/`` folder becomes a new version.

A LoRA adapter is stored alone (small) and points at its foundation, so that every stored adapter stays
loadable: a foundation that is a store version is referenced as it is (``"form": "version"``); any other is
stored once by content, ``<store>/foundations/<sha256>/`` (``"form": "blob"``), and shared by every adapter
on it (:func:`xrayfm_stack.store.stage_foundation`).

Each version gets its ONNX graphs beside the checkpoint (``model.onnx``, ``model.int8.onnx``), exported
here where torch is, with the int8 verdict measured on the run's validation images; ``version.json``'s
``onnx`` records them (:func:`xrayfm.inference.graphs.version_graphs`). A model that cannot be exported
is published without them, and its ``onnx`` says why: a worker then exports it when it loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.utils import read_json, to_jsonable
from xrayfm_stack.store import (
    MODELS_DIR,
    VERSION_FILE,
    StagedFoundation,
    add_version,
    stage_foundation,
    version_dir,
    version_of_job,
)

log = logging.getLogger(__name__)


def _store_ref(store: Path, folder: Path) -> dict[str, str] | None:
    """{"name", "version"} when `folder` is a version inside the store, else None."""
    try:
        rel = folder.resolve().relative_to((Path(store) / MODELS_DIR).resolve())
    except ValueError:
        return None
    return {"name": rel.parts[0], "version": rel.parts[1]} if len(rel.parts) == 2 else None


def _foundation_ref(
    store: Path, lineage: dict[str, Any], where: Path
) -> tuple[dict[str, Any], str, StagedFoundation | None]:
    """The foundation in `lineage` as the store will hold it: (the version's ``lineage.foundation``, the
    path an adapter at ``models/<name>/<version>`` records, the staged foundation to commit with the
    version or None). A relative path in `lineage` (a shipped adapter's) is relative to `where`."""
    folder = where / lineage.get("path", "")
    if not (folder / "meta.json").is_file():
        raise XrayfmError(f"the foundation {folder} of this run is gone: cannot store its adapter")
    ref = _store_ref(store, folder)
    if ref is not None:
        entry = {"form": "version", **ref, "sha256": lineage.get("sha256")}
        return entry, f"../../{ref['name']}/{ref['version']}", None
    staged = stage_foundation(store, folder)
    entry = {"form": "blob", "folder_sha256": staged.sha256, "sha256": lineage.get("sha256"),
             "name": lineage.get("name"), "source": str(folder.resolve())}  # fmt: skip
    return entry, staged.relative_path, staged


def _graphs(best: Path, staged: Path, data_dirs: tuple[Path, ...]) -> dict[str, Any]:
    """Export `best` (the run's checkpoint, whose foundation path resolves from where it is) into the
    staged version folder and judge int8 (a shipped model on its dataset in `data_dirs`); a failure is
    recorded, not raised (the version is still served, exported at load)."""
    from xrayfm.inference.graphs import GRAPH_FILES, version_graphs

    try:
        return version_graphs(best, staged, data_dirs)
    except Exception as exc:  # noqa: BLE001 - publishing the checkpoint matters more than its graphs
        log.warning("no ONNX graphs for %s: %s: %s", best, type(exc).__name__, exc)
        for name in GRAPH_FILES.values():
            (staged / name).unlink(missing_ok=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


def publish_run(
    store: Path,
    name: str,
    best: Path,
    job_id: str,
    kind: str,
    lineage: dict[str, Any] | None = None,
    data_dirs: tuple[Path, ...] = (),
) -> tuple[str, dict[str, Any]]:
    """Copy the run's `best` folder into the store as the next version of `name`, with its ONNX graphs;
    returns (version, info). `lineage` adds to the version's lineage (e.g. the tuning study a trial's
    checkpoint came from); `data_dirs`: where a shipped model's validation data may be."""
    meta = json.loads((best / "meta.json").read_text())
    lineage = dict(lineage or {})
    if isinstance(meta.get("auto"), dict):  # adapt --method auto: the choice and the candidates' scores
        lineage["auto"] = meta["auto"]
    Path(store).mkdir(parents=True, exist_ok=True)  # staged in the store: `best` may be read-only (shipped)
    with tempfile.TemporaryDirectory(dir=store, prefix=".publish-") as tmp:
        staged = Path(tmp) / "v"
        shutil.copytree(best, staged)
        staged.joinpath(VERSION_FILE).unlink(missing_ok=True)
        published = version_of_job(store, name, job_id)  # a job run again: its version has its graphs
        graphs = (
            read_json(version_dir(store, name, published) / VERSION_FILE, {}).get("onnx")
            if published is not None
            else _graphs(best, staged, data_dirs)
        )
        foundation: StagedFoundation | None = None  # staged after the graphs: its pin lives for seconds
        if isinstance(meta.get("foundation"), dict):
            lineage["foundation"], relative, foundation = _foundation_ref(store, meta["foundation"], best)
            if meta.get("format") == "xrayfm.adapted":  # the adapter finds its foundation in the store,
                # by a path relative to its own folder (models/<name>/<version>), so the store can move
                meta["foundation"] = {**meta["foundation"], "path": relative}
                (staged / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        info = to_jsonable(
            {
                "job_id": job_id,
                "kind": kind,
                "method": meta.get("method"),
                "metrics": meta.get("metrics"),
                "manifest_sha256": meta.get("manifest_sha256"),
                "library": meta.get("versions"),
                "lineage": lineage,
                "onnx": graphs,
            }
        )
        try:
            version = add_version(store, name, staged, info, foundation=foundation)
        finally:
            if foundation is not None:
                foundation.release()
    return version, info
