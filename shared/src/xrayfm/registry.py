"""Names of the foundation models shipped inside the package, timm style: ``xrayfm/<name>``.

Each shipped model is a checkpoint folder ``xrayfm/models/weights/<name>/`` (``model.safetensors`` +
``meta.json`` + ``MODEL_CARD.md``), so a name works wherever a checkpoint folder does::

    xrayfm.models.create_model("xrayfm/cxr-vit-tiny-mae", pretrained=True, num_classes=2)
    xrayfm adapt --foundation xrayfm/cxr-vit-tiny-mae ...

Torch-free on purpose: configs and job specs check names without importing torch. Nothing is
downloaded; a local folder of the same relative path, if one exists, takes precedence over the name.
"""

from __future__ import annotations

import os
from pathlib import Path

from xrayfm.errors import XrayfmError

PREFIX = "xrayfm/"
WEIGHTS_DIR = Path(__file__).resolve().parent / "models" / "weights"


def list_pretrained() -> list[str]:
    """The shipped model names (``xrayfm/<name>``), sorted."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(PREFIX + p.name for p in WEIGHTS_DIR.iterdir() if (p / "meta.json").is_file())


def is_registry_name(value: str | os.PathLike | None) -> bool:
    """Whether ``value`` is meant as a shipped model's name (``xrayfm/...`` that is not a local path)."""
    return isinstance(value, str) and value.startswith(PREFIX) and not Path(value).exists()


def pretrained_dir(name: str) -> Path:
    """The checkpoint folder of a shipped model; a clear error lists the names there are."""
    folder = WEIGHTS_DIR / name.removeprefix(PREFIX)
    if (
        not name.startswith(PREFIX)
        or "/" in name.removeprefix(PREFIX)
        or not (folder / "meta.json").is_file()
    ):
        have = ", ".join(list_pretrained()) or "none in this installation"
        raise XrayfmError(f"no shipped model {name!r} (have: {have})")
    return folder


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or the folder of a shipped model when ``path`` is an ``xrayfm/<name>``."""
    return pretrained_dir(str(path)) if is_registry_name(path) else Path(path)


STORE_PREFIX = "store:"


def store_ref(value: str) -> tuple[str, str] | None:
    """``store:<name>/<version>`` -> (name, version); None for any other value (a folder path)."""
    if not str(value).startswith(STORE_PREFIX):
        return None
    name, _, version = str(value).removeprefix(STORE_PREFIX).partition("/")
    return name, version


def resolve_model_ref(model: str, store: str | os.PathLike | None = None) -> Path:
    """A checkpoint folder, a shipped model's name (``xrayfm/<name>``), or ``store:NAME/VERSION`` in the
    model store `store` (its layout: ``models/NAME/VERSION``) -> the checkpoint folder."""
    ref = store_ref(model)
    if ref is None:
        return resolve_checkpoint_dir(model)
    if not store:
        raise XrayfmError(
            f"{model}: a store:NAME/VERSION needs the model store (--store, XRAYFM_MODEL_STORE)"
        )
    name, version = ref
    folder = Path(store) / "models" / name / version
    if (
        not name
        or not version
        or {".", ".."} & {name, version}
        or "/" in version
        or not (folder / "meta.json").is_file()
    ):
        raise XrayfmError(f"{model}: no such version in the store {store}")
    return folder


__all__ = [
    "STORE_PREFIX",
    "PREFIX",
    "WEIGHTS_DIR",
    "is_registry_name",
    "list_pretrained",
    "pretrained_dir",
    "resolve_checkpoint_dir",
    "resolve_model_ref",
    "store_ref",
]
