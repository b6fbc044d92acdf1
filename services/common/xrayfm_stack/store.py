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

``XRAYFM_MODEL_PATH`` (a checkpoint folder) wins over the store when set. Promotion = rewriting
``serving.json`` atomically (:func:`promote`); :func:`add_version` publishes a new version atomically
(a folder renamed into place), :func:`list_versions` describes them, :func:`rollback` re-serves the
previously promoted one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrayfm.domain.gate import GATE_JSON
from xrayfm.errors import XrayfmError
from xrayfm.operating_point import read_operating_point, write_operating_point
from xrayfm.utils import atomic_write_json, file_lock, read_json

SERVING_FILE = "serving.json"
MODELS_DIR = "models"
HISTORY_FILE = "serving-history.json"
VERSION_FILE = "version.json"  # the store's own facts about a version (next to the checkpoint's meta.json)
EVALUATIONS_DIR = "evaluations"
LOCK_FILE = ".store.lock"
# xrayfm.evaluate.calibration.CALIBRATION_FILE, named here without importing it (it needs scipy, which the
# gateway's image has not); tests/services/test_units.py checks that the two agree
CALIBRATION_FILE = "calibration.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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


def add_version(store: Path, name: str, source: Path, info: dict[str, Any] | None = None) -> str:
    """Copy the checkpoint folder `source` into the store as the next version of `name` (1, 2, ...).

    The copy is made beside the target and renamed into place, so a version is complete or absent.
    `info` (job, kind, metrics, lineage...) is written to the version's ``version.json``. Idempotent per
    job: when `info` has a ``job_id`` that already published a version of `name` (a job that was
    interrupted after publishing and ran again), that version is returned and nothing is added."""
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
            version = str(max((int(p.name) for p in models.iterdir() if p.name.isdigit()), default=0) + 1)
            atomic_write_json(payload / VERSION_FILE, {"name": name, "version": version, **(info or {})})
            os.rename(payload, models / version)
        return version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def graphs_record(folder: Path) -> dict[str, Any] | None:
    """What the version's ``version.json`` records about its stored ONNX graphs (files, sha256, opset,
    source, int8 verdict; :mod:`xrayfm.inference.graphs`), or None when it has none."""
    info = read_json(Path(folder) / VERSION_FILE, None) if Path(folder).is_dir() else None
    record = info.get("onnx") if isinstance(info, dict) else None
    return record if isinstance(record, dict) and "files" in record else None


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
