"""The model store: versioned model folders and one pointer to the served version.

Layout (documented in services/README.md; the training worker of a later issue adds versions)::

    <store>/serving.json                  {"name": "chest-demo", "version": "3"}
    <store>/models/<name>/<version>/      one checkpoint folder (safetensors weights + JSON metadata)

``XRAYFM_MODEL_PATH`` (a checkpoint folder) wins over the store when set. Promotion = rewriting
``serving.json`` atomically (:func:`promote`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xrayfm.errors import XrayfmError

SERVING_FILE = "serving.json"
MODELS_DIR = "models"
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
        spec = json.loads(pointer.read_text())
        name, version = str(spec["name"]), str(spec["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise XrayfmError(f"{pointer} must be JSON like {{'name': ..., 'version': ...}}: {exc}") from None
    path = version_dir(store, name, version)
    if not path.exists():
        raise XrayfmError(f"{pointer} points at {name}/{version}, but {path} does not exist")
    return ModelRef(path=path, name=name, version=version)


def promote(store: Path, name: str, version: str) -> Path:
    """Point ``serving.json`` at an existing version (atomic replace); returns the pointer file."""
    if not version_dir(store, name, version).exists():
        raise XrayfmError(f"cannot promote {name}/{version}: not in the store {store}")
    pointer = Path(store) / SERVING_FILE
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".serving-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump({"name": name, "version": version}, handle)
    os.replace(tmp, pointer)
    return pointer
