"""The model store: versioned model folders and one pointer to the served version. The training worker
writes it (new versions, evaluations), the gateway promotes and rolls back, the inference workers read it.

Layout (documented in services/README.md)::

    <store>/serving.json                  {"name": "chest-demo", "version": "3"}
    <store>/models/<name>/<version>/      one checkpoint folder (safetensors weights + JSON metadata)

    <store>/models/<name>/<version>/version.json   store facts: job, kind, metrics, lineage, onnx (training worker)
    <store>/models/<name>/<version>/model.onnx, model.int8.onnx   its ONNX graphs (fp32, int8), exported on publish
    <store>/models/<name>/<version>/evaluations/<job>.json   results of evaluate jobs on this version
    <store>/models/<name>/<version>/operating_point.json   its chosen decision threshold (xrayfm.operating_point)
    <store>/serving-history.json          the promoted versions, oldest first (for :func:`rollback`)
    <store>/foundations/<sha256>/         a LoRA adapter's foundation checkpoint, stored once by content
                                          (sha256 of the folder, :func:`xrayfm.utils.sha256_folder`)

``XRAYFM_MODEL_PATH`` (a checkpoint folder) wins over the store when set. Promotion = rewriting
``serving.json`` atomically (:func:`promote`); :func:`add_version` publishes a new version atomically
(a folder renamed into place), :func:`list_versions` describes them, :func:`rollback` re-serves the
previously promoted one.

Foundations: an adapter's ``meta.json`` points at its foundation by a path relative to its own folder,
``../../../foundations/<sha256>`` (a foundation that is itself a store version: ``../../<name>/<version>``),
and ``version.json``'s ``lineage.foundation`` says which form it is (``"form": "blob"`` with
``folder_sha256``, or ``"form": "version"`` with ``name``/``version``; no ``form``: written before
foundations were stored by content, a version such as ``<name>-foundation/<n>``). A publish stages its
foundation (:func:`stage_foundation`: a pin, plus a copy when the store lacks it) and commits blob and
version under the store lock (:func:`add_version`). :func:`gc` removes the blobs no version references and
stale leftovers of interrupted writes; it never removes a version. Command line::

    python -m xrayfm_stack.store gc [--dry-run] [--store PATH] [--grace SECONDS] [--audit-log PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrayfm.domain.gate import GATE_JSON
from xrayfm.errors import XrayfmError
from xrayfm.operating_point import read_operating_point, write_operating_point
from xrayfm.utils import atomic_write_json, file_lock, read_json, sha256_folder

SERVING_FILE = "serving.json"
MODELS_DIR = "models"
HISTORY_FILE = "serving-history.json"
VERSION_FILE = "version.json"  # the store's own facts about a version (next to the checkpoint's meta.json)
EVALUATIONS_DIR = "evaluations"
LOCK_FILE = ".store.lock"
# xrayfm.evaluate.calibration.CALIBRATION_FILE, named here without importing it (it needs scipy, which the
# gateway's image has not); tests/services/test_units.py checks that the two agree
CALIBRATION_FILE = "calibration.json"
FOUNDATIONS_DIR = "foundations"
PIN_FILE = "pin.json"  # in a foundation's staging folder: the sha256 a publish is about to reference
GC_GRACE_S = 86400.0  # gc leaves temporaries younger than a day (a publish in progress) alone
# leftovers of interrupted writes: staging folders of add_version / publish / stage_foundation / gc, and the
# temporaries of xrayfm.utils.atomic_path (.<name>.<random>.tmp) and atomic_dir (.<name>.tmp-<hex>, .old-<hex>)
_TEMPORARY = re.compile(r"^\.(incoming-|publish-|removing-)|^\..+\.tmp$|^\..+\.(tmp|old)-[0-9a-f]{8}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelRef:
    """Which model a worker serves: its folder and, when it came from the store, its name and version."""

    path: Path
    name: str
    version: str


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or value in {".", ".."}:
        raise XrayfmError(f"invalid model {what} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


def version_dir(store: Path, name: str, version: str) -> Path:
    """The folder of one model version in the store."""
    return Path(store) / MODELS_DIR / _check_name("name", name) / _check_name("version", version)


def resolve_model(model_path: Path | None, store: Path) -> ModelRef:
    """The model to serve: `model_path` when given, else the store's serving pointer."""
    if model_path is not None:
        path = Path(model_path)
        if not path.exists():
            raise XrayfmError(f"XRAYFM_MODEL_PATH {path} does not exist")
        return ModelRef(path=path, name=path.name if path.is_dir() else path.stem, version="local")
    pointer = Path(store) / SERVING_FILE
    if not pointer.is_file():
        raise XrayfmError(
            f"no model to serve: set XRAYFM_MODEL_PATH to a checkpoint folder, or put one in the model store "
            f"{store} (models/<name>/<version>/ plus {SERVING_FILE})"
        )
    try:
        spec = read_json(pointer)
        name, version = str(spec["name"]), str(spec["version"])
    except (XrayfmError, KeyError, TypeError) as exc:
        raise XrayfmError(f"{pointer} must be JSON like {{'name': ..., 'version': ...}}: {exc}") from None
    path = version_dir(store, name, version)
    if not path.exists():
        raise XrayfmError(f"{pointer} points at {name}/{version}, but {path} does not exist")
    return ModelRef(path=path, name=name, version=version)


def serving(store: Path) -> dict[str, str] | None:
    """The served ``{"name", "version"}``, or None when nothing is promoted."""
    spec = read_json(Path(store) / SERVING_FILE, None)
    return None if spec is None else {"name": str(spec["name"]), "version": str(spec["version"])}


def _promote_unlocked(store: Path, name: str, version: str, record: bool) -> Path:
    if not version_dir(store, name, version).exists():
        raise XrayfmError(f"cannot promote {name}/{version}: not in the store {store}")
    pointer = Path(store) / SERVING_FILE
    atomic_write_json(pointer, {"name": name, "version": version})
    if record:
        history = read_json(Path(store) / HISTORY_FILE, [])
        history.append({"name": name, "version": version})
        atomic_write_json(Path(store) / HISTORY_FILE, history)
    return pointer


def promote(store: Path, name: str, version: str) -> Path:
    """Point ``serving.json`` at an existing version (atomic replace) and record it in the history;
    returns the pointer file."""
    with file_lock(Path(store) / LOCK_FILE):
        return _promote_unlocked(store, name, version, record=True)


def rollback(store: Path) -> dict[str, str]:
    """Serve the version promoted before the current one again; returns it.

    The current version leaves the history, so repeated rollbacks walk further back."""
    with file_lock(Path(store) / LOCK_FILE):
        history = read_json(Path(store) / HISTORY_FILE, [])
        current = serving(store)
        if current is not None and history and history[-1] == current:
            history.pop()
        while history and not version_dir(store, history[-1]["name"], history[-1]["version"]).exists():
            history.pop()  # a version deleted by hand cannot be served again
        if not history:
            raise XrayfmError("nothing to roll back to: no earlier promoted version in the store")
        previous = history[-1]
        _promote_unlocked(store, previous["name"], previous["version"], record=False)
        atomic_write_json(Path(store) / HISTORY_FILE, history)
        return {"name": previous["name"], "version": previous["version"]}


def version_of_job(store: Path, name: str, job_id: str) -> str | None:
    """The version of `name` that job `job_id` published, if it did (a job may run again after publishing)."""
    models = Path(store) / MODELS_DIR / name
    numbers = sorted(int(p.name) for p in models.iterdir() if p.name.isdigit()) if models.is_dir() else []
    for number in numbers:
        if read_json(models / str(number) / VERSION_FILE, {}).get("job_id") == job_id:
            return str(number)
    return None


def foundation_dir(store: Path, sha256: str) -> Path:
    """The folder of the foundation stored by content `sha256` (it may not exist)."""
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise XrayfmError(f"invalid foundation sha256 {sha256!r}: 64 lower-case hex digits")
    return Path(store) / FOUNDATIONS_DIR / sha256


def stored_foundation(store: Path, folder: Path) -> str | None:
    """The sha256 when `folder` is a foundation stored by content in `store`, else None."""
    try:
        rel = Path(folder).resolve().relative_to((Path(store) / FOUNDATIONS_DIR).resolve())
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) == 1 and _SHA256.match(rel.parts[0]) else None


@dataclass(frozen=True)
class StagedFoundation:
    """A foundation a publish is about to reference: its sha256, the folder it came from, and its staging
    folder in ``<store>/foundations/`` (a pin that :func:`gc` honours while it is young, plus ``blob/``, a
    copy, when the store did not have it)."""

    sha256: str
    source: Path
    staging: Path

    @property
    def relative_path(self) -> str:
        """The path an adapter stored at ``models/<name>/<version>/`` records for this foundation."""
        return f"../../../{FOUNDATIONS_DIR}/{self.sha256}"

    def release(self) -> None:
        """Remove the staging folder (after :func:`add_version`, or when the publish is abandoned)."""
        shutil.rmtree(self.staging, ignore_errors=True)


def _copy_checked(source: Path, target: Path, sha256: str) -> None:
    shutil.copytree(source, target)
    if sha256_folder(target) != sha256:
        shutil.rmtree(target, ignore_errors=True)
        raise XrayfmError(f"the foundation {source} changed while it was being stored: publish again")


def stage_foundation(store: Path, folder: Path) -> StagedFoundation:
    """Stage the foundation checkpoint `folder` for a version that will reference it by content.

    Hashes the folder (a stored foundation is known by its name), pins the hash under the store lock, and
    copies the folder beside its target when the store has no foundation with that hash yet. Pass the
    result to :func:`add_version`, which moves the copy into place with the version under one lock, then
    call its ``release()``."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise XrayfmError(f"{folder} is not a checkpoint folder (no meta.json)")
    sha256 = stored_foundation(store, folder) or sha256_folder(folder)
    root = Path(store) / FOUNDATIONS_DIR
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(Path(store) / LOCK_FILE):  # gc sees either the pin or, before it, the blob's absence
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".incoming-"))
        atomic_write_json(staging / PIN_FILE, {"sha256": sha256})
        present = foundation_dir(store, sha256).is_dir()
    staged = StagedFoundation(sha256=sha256, source=folder, staging=staging)
    if not present:
        try:
            _copy_checked(folder, staging / "blob", sha256)
        except BaseException:
            staged.release()
            raise
    return staged


def _commit_foundation_locked(store: Path, staged: StagedFoundation) -> None:
    """Under the store lock: make sure the staged foundation is in place (rename its copy; copy it now if
    its pin outlived the grace period and gc took the blob)."""
    target = foundation_dir(store, staged.sha256)
    if target.is_dir():
        return
    copy = staged.staging / "blob"
    if not copy.is_dir():
        copy.parent.mkdir(parents=True, exist_ok=True)
        _copy_checked(staged.source, copy, staged.sha256)
    os.rename(copy, target)


def add_version(
    store: Path,
    name: str,
    source: Path,
    info: dict[str, Any] | None = None,
    foundation: StagedFoundation | None = None,
) -> str:
    """Copy the checkpoint folder `source` into the store as the next version of `name` (1, 2, ...).

    The copy is made beside the target and renamed into place, so a version is complete or absent.
    `info` (job, kind, metrics, lineage...) is written to the version's ``version.json``. Idempotent per
    job: when `info` has a ``job_id`` that already published a version of `name` (a job that was
    interrupted after publishing and ran again), that version is returned and nothing is added.
    `foundation` (from :func:`stage_foundation`): the foundation the version references, put in place
    under the same lock as the version, so :func:`gc` never sees it unreferenced."""
    _check_name("name", name)
    source = Path(source)
    if not (source / "meta.json").is_file():
        raise XrayfmError(f"{source} is not a checkpoint folder (no meta.json)")
    models = Path(store) / MODELS_DIR / name
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=".incoming-"))
    try:
        payload = tmp / "v"
        shutil.copytree(source, payload)
        with file_lock(Path(store) / LOCK_FILE):
            job_id = (info or {}).get("job_id")
            published = version_of_job(store, name, job_id) if job_id else None
            if published is not None:
                return published
            if foundation is not None:
                _commit_foundation_locked(store, foundation)
            version = str(max((int(p.name) for p in models.iterdir() if p.name.isdigit()), default=0) + 1)
            atomic_write_json(payload / VERSION_FILE, {"name": name, "version": version, **(info or {})})
            os.rename(payload, models / version)
        return version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- garbage collection
def _version_folders(store: Path) -> list[Path]:
    return [
        folder
        for folder in sorted((Path(store) / MODELS_DIR).glob("*/*"))
        if folder.is_dir() and not folder.name.startswith(".") and not folder.parent.name.startswith(".")
    ]


def referenced_foundations(store: Path) -> dict[str, list[str]]:
    """sha256 -> the versions (``name/version``) that reference that stored foundation, by the path in
    their ``meta.json`` (what loading follows) or their ``version.json`` lineage. A version whose JSON
    cannot be read raises (gc must not guess)."""
    found: dict[str, list[str]] = {}
    for folder in _version_folders(store):
        meta, info = read_json(folder / "meta.json", {}), read_json(folder / VERSION_FILE, {})
        shas: set[str] = set()
        recorded = meta.get("foundation") if isinstance(meta, dict) else None
        if isinstance(recorded, dict) and isinstance(recorded.get("path"), str):
            sha = stored_foundation(store, folder / recorded["path"])
            if sha is not None:
                shas.add(sha)
        lineage = (info.get("lineage") or {}).get("foundation") if isinstance(info, dict) else None
        if isinstance(lineage, dict) and isinstance(lineage.get("folder_sha256"), str):
            shas.add(lineage["folder_sha256"])
        for sha in shas:
            found.setdefault(sha, []).append(f"{folder.parent.name}/{folder.name}")
    return found


def _newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and, for a folder, of anything inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for entry in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _temporaries(store: Path) -> list[Path]:
    """Leftovers of interrupted writes anywhere in the store (staging folders, atomic-write temporaries)."""
    found = []
    for root, dirs, files in os.walk(store):
        for entry in list(dirs) + files:
            if _TEMPORARY.match(entry):
                found.append(Path(root) / entry)
        dirs[:] = [d for d in dirs if not _TEMPORARY.match(d)]  # a staging folder is removed whole
    return sorted(found)


def _remove(path: Path) -> None:
    """Remove a file or folder; a folder is first renamed to a ``.removing-`` name, so that a crash midway
    leaves a temporary for the next gc rather than half a foundation."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".removing-{path.name}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    else:
        path.unlink(missing_ok=True)


def gc(store: Path, *, dry_run: bool = False, grace_s: float = GC_GRACE_S) -> dict[str, Any]:
    """Remove the stored foundations no version references and the leftovers of interrupted writes older
    than `grace_s` seconds; never a version folder. Runs under the store lock (publishes commit foundation
    and version under it, and a foundation pinned by a publish's young staging folder is kept).

    Returns what it removed (or would remove, with `dry_run`): ``removed`` (``path`` relative to the
    store, ``kind`` foundation or temporary, ``bytes``), ``freed_bytes``, ``kept`` (sha256 -> the
    versions referencing it, or ``["pinned by a publish in progress"]``)."""
    store = Path(store)
    if not (store / MODELS_DIR).is_dir() and not (store / FOUNDATIONS_DIR).is_dir():
        raise XrayfmError(f"{store} is not a model store (no {MODELS_DIR}/ nor {FOUNDATIONS_DIR}/ in it)")
    removed: list[dict[str, Any]] = []
    with file_lock(store / LOCK_FILE):
        kept = referenced_foundations(store)
        now = time.time()
        for path in _temporaries(store):
            try:
                young = now - _newest_mtime(path) < grace_s
            except FileNotFoundError:
                continue
            if young:
                pin = read_json(path / PIN_FILE, {}) if path.is_dir() else {}
                sha = pin.get("sha256") if isinstance(pin, dict) else None
                if isinstance(sha, str) and sha not in kept:
                    kept[sha] = ["pinned by a publish in progress"]
                continue
            removed.append(
                {"path": path.relative_to(store).as_posix(), "kind": "temporary", "bytes": _size(path)}
            )
        root = store / FOUNDATIONS_DIR
        blobs = (
            sorted(p for p in root.iterdir() if p.is_dir() and _SHA256.match(p.name)) if root.is_dir() else []
        )
        for blob in blobs:
            if blob.name not in kept:
                removed.append(
                    {"path": blob.relative_to(store).as_posix(), "kind": "foundation", "bytes": _size(blob)}
                )
        if not dry_run:
            for item in removed:
                _remove(store / item["path"])
    return {
        "store": str(store),
        "dry_run": dry_run,
        "grace_s": grace_s,
        "removed": removed,
        "freed_bytes": sum(item["bytes"] for item in removed),
        "kept": {sha: sorted(versions) for sha, versions in sorted(kept.items())},
    }


def graphs_record(folder: Path) -> dict[str, Any] | None:
    """What the version's ``version.json`` records about its stored ONNX graphs (files, sha256, opset,
    source, int8 verdict; :mod:`xrayfm.inference.graphs`), or None when it has none."""
    info = read_json(Path(folder) / VERSION_FILE, None) if Path(folder).is_dir() else None
    record = info.get("onnx") if isinstance(info, dict) else None
    return record if isinstance(record, dict) and "files" in record else None


def set_graphs(store: Path, name: str, version: str, record: dict[str, Any]) -> None:
    """Record the ONNX graphs exported into a version after it was published (``version.json``'s
    ``onnx``), under the store lock; the graph files are in the version folder already."""
    folder = version_dir(store, name, version)
    with file_lock(Path(store) / LOCK_FILE):
        info = read_json(folder / VERSION_FILE, None)
        if not isinstance(info, dict):
            raise XrayfmError(f"no version {name}/{version} in the model store")
        atomic_write_json(folder / VERSION_FILE, {**info, "onnx": record})


def add_evaluation(store: Path, name: str, version: str, job_id: str, result: dict[str, Any]) -> None:
    """Record an evaluate job's result with the version it evaluated (one file per job)."""
    folder = version_dir(store, name, version)
    if not folder.is_dir():
        raise XrayfmError(f"no version {name}/{version} in the model store")
    _check_name("job id", job_id)
    (folder / EVALUATIONS_DIR).mkdir(exist_ok=True)
    atomic_write_json(folder / EVALUATIONS_DIR / f"{job_id}.json", {"job_id": job_id, **result})


def set_operating_point(
    store: Path, name: str, version: str, point: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Record the version's decision threshold (None: back to the default); the inference workers serving
    it pick it up within a poll. A point naming an evaluate job (``job_id``, ``rule``, ``level``, ``label``)
    takes its threshold, sensitivity and specificity from that evaluation of this version."""
    folder = version_dir(store, name, version)
    if not folder.is_dir():
        raise XrayfmError(f"no version {name}/{version} in the model store")
    if point is not None and point.get("job_id"):
        point = {**point, **_point_from_evaluation(folder, point)}
    with file_lock(Path(store) / LOCK_FILE):
        return write_operating_point(folder, point)


def _point_from_evaluation(folder: Path, ask: dict[str, Any]) -> dict[str, Any]:
    """The candidate point `ask` names in one of the version's evaluations (see xrayfm evaluate)."""
    job_id, rule, level = str(ask["job_id"]), ask.get("rule") or "youden", ask.get("level") or "image"
    found = next((e for e in evaluations(folder) if e.get("job_id") == job_id), None)
    if found is None:
        raise XrayfmError(f"no evaluation {job_id} of this version")
    labels = found.get("operating_points") or {}
    label = ask.get("label") or (next(iter(labels)) if len(labels) == 1 else None)
    options = (labels.get(label) or {}).get(level) or []
    chosen = next((o for o in options if o.get("rule") == rule), None)
    if chosen is None:
        have = sorted(
            {
                f"{lab}/{lev}/{o['rule']}"
                for lab, levels in labels.items()
                for lev, opts in levels.items()
                for o in opts
            }
        )
        raise XrayfmError(f"evaluation {job_id} has no operating point {label}/{level}/{rule} (has: {have})")
    source = f"{rule} at {level} level on evaluation {job_id} ({found.get('dataset')} {found.get('split')})"
    return {
        "threshold": chosen["threshold"], "rule": rule, "level": level, "label": label,
        "sensitivity": chosen.get("sensitivity"), "specificity": chosen.get("specificity"),
        "source": ask.get("source") or source,
    }  # fmt: skip


def evaluations(folder: Path) -> list[dict[str, Any]]:
    """The evaluations recorded for a version folder, oldest first."""
    found = [read_json(path, {}) for path in (Path(folder) / EVALUATIONS_DIR).glob("*.json")]
    return sorted(found, key=lambda e: e.get("created") or 0)


def _calibration_summary(folder: Path) -> dict[str, Any] | None:
    """The version's site calibration (calibration.json), without its parameters' evidence."""
    info = read_json(Path(folder) / CALIBRATION_FILE, None)
    if not isinstance(info, dict):
        return None
    return {k: info.get(k) for k in ("method", "source", "n", "fitted_at")}


def _readable_point(folder: Path) -> dict[str, Any] | None:
    """The version's operating point; a broken file is listed as such rather than failing the listing."""
    try:
        return read_operating_point(folder)
    except XrayfmError as exc:
        return {"error": str(exc)}


def gate_summary(folder: Path) -> dict[str, Any] | None:
    """The version's domain gate as listed: method, threshold, the target pass rate and the rates measured
    on held-out in-domain images (the threshold's set, and the validation images it was not set on)."""
    info = read_json(Path(folder) / GATE_JSON, None)
    if not isinstance(info, dict):
        return None
    keys = ("method", "threshold", "pass_rate", "held_out_pass_rate", "validation_pass_rate",
            "validation_images", "reference_images", "domain")  # fmt: skip
    return {k: info.get(k) for k in keys}


def list_versions(store: Path) -> list[dict[str, Any]]:
    """Every version in the store: name, version, serving flag, and what ``version.json`` and the
    checkpoint's ``meta.json`` say (kind, metrics, lineage, labels, synthetic, created)."""
    current = serving(store)
    rows = []
    for folder in sorted((Path(store) / MODELS_DIR).glob("*/*")):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        meta = read_json(folder / "meta.json", {})
        info = read_json(folder / VERSION_FILE, {})
        name, version = folder.parent.name, folder.name
        lineage = info.get("lineage") or (
            {"foundation": meta["foundation"]} if isinstance(meta.get("foundation"), dict) else {}
        )
        data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        rows.append(
            {
                "name": name,
                "version": version,
                "serving": current == {"name": name, "version": version},
                "format": meta.get("format"),
                "kind": meta.get("kind"),
                "method": meta.get("method"),
                "labels": meta.get("labels"),
                "metrics": meta.get("metrics") or info.get("metrics"),
                "synthetic": bool(meta.get("synthetic") or data.get("synthetic")),
                "created": meta.get("created"),
                "job_id": info.get("job_id"),
                "lineage": lineage,
                "evaluations": evaluations(folder),
                "operating_point": _readable_point(folder),
                "domain_gate": gate_summary(folder),
                "calibration": _calibration_summary(folder),
                "onnx": graphs_record(folder),
            }
        )
    rows.sort(key=lambda r: (r["name"], int(r["version"]) if r["version"].isdigit() else 0, r["version"]))
    return rows


# ----------------------------------------------------------------------------------------- command line
AUDIT_WHO = f"store-cli:uid-{os.getuid()}"  # the audit records' `who`: an admin on the store's host


def _audit(log: Path | None, outcome: str, detail: dict[str, Any], reason: str | None = None) -> None:
    """Append a ``store_gc`` record to the audit trail at `log` (none when `log` is None)."""
    if log is None:
        return
    from xrayfm import audit

    record = audit.make_record(
        "store_gc", outcome, who=AUDIT_WHO, reason=reason, target="store:foundations", detail=detail
    )
    audit.append(log, record, durable=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m xrayfm_stack.store gc``: garbage-collect the model store."""
    from xrayfm_stack.settings import GatewaySettings

    try:
        settings = GatewaySettings.from_env()  # the store and audit trail the gateway uses
    except XrayfmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m xrayfm_stack.store",
        description="Model store maintenance (layout: docs/ops.md, 'Model store').",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "gc",
        help="remove unreferenced foundations and stale leftovers of interrupted writes",
        description="Remove the foundations (foundations/<sha256>/) no version references and leftovers "
        "of interrupted writes older than the grace period. Never removes a version. Holds the store "
        "lock while it runs. A real run writes store_gc records to the audit log when one is configured.",
    )
    run.add_argument(
        "--store",
        type=Path,
        metavar="PATH",
        default=settings.model_store,
        help=f"the model store (default: XRAYFM_MODEL_STORE, as the gateway reads it: {settings.model_store})",
    )
    run.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    run.add_argument(
        "--grace",
        type=float,
        default=GC_GRACE_S,
        metavar="SECONDS",
        help=f"keep leftovers younger than this: a publish may be writing them (default: {GC_GRACE_S:.0f})",
    )
    run.add_argument(
        "--audit-log",
        type=Path,
        metavar="PATH",
        default=settings.audit_log,
        help="append store_gc records (requested, then ok or failed) to this audit trail; dry runs are "
        f"not recorded (default: XRAYFM_AUDIT_LOG, as the gateway reads it: {settings.audit_log})",
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.grace < 0:
        parser.error("--grace must be >= 0")
    log = None if args.dry_run else args.audit_log
    try:
        _audit(log, "requested", {"grace_s": args.grace})
    except (OSError, XrayfmError) as exc:  # an admin action that cannot be recorded does not run
        print(f"error: cannot write the audit log {log}: {exc}", file=sys.stderr)
        return 1
    try:
        report = gc(args.store, dry_run=args.dry_run, grace_s=args.grace)
    except (OSError, XrayfmError) as exc:
        _audit(log, "failed", {"grace_s": args.grace, "error": type(exc).__name__}, reason="store_gc_failed")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kinds = [item["kind"] for item in report["removed"]]
    _audit(log, "ok", {"foundations_removed": kinds.count("foundation"),
                       "temporaries_removed": kinds.count("temporary"), "freed_bytes": report["freed_bytes"],
                       "foundations_kept": len(report["kept"])})  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in report["removed"]:
        print(f"{verb} {item['kind']:10s} {item['bytes'] / 1e6:10.1f} MB  {item['path']}")
    for sha, versions in report["kept"].items():
        print(f"kept foundation {sha[:12]}  ({', '.join(versions)})")
    print(f"{verb} {len(kinds)} item(s), {report['freed_bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
