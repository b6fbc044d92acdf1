"""Turning a foundation checkpoint into a shipped one (``xrayfm/models/weights/<name>/``, see xrayfm.registry).

The weights are stored in bf16 (half the bytes; they load into fp32 models unchanged in shape), the
meta keeps the run's recipe, data and metrics, and records the new file's sha256 so that loading checks it.
Shipped metadata holds no path of the machine that built it: every absolute path in it is replaced by its
last component (the folder's or file's name), see :func:`portable_meta`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from xrayfm.errors import XrayfmError
from xrayfm.models.checkpoint import ADAPTER_DIR, META, WEIGHTS, _checkpoint_folder
from xrayfm.registry import pretrained_dir
from xrayfm.utils import atomic_dir, sha256_file

# Datasets whose terms forbid redistributing anything derived from them (Stanford research-use agreements).
NOT_REDISTRIBUTABLE = ("chexpert", "mura")
# A whole value that is an absolute path: POSIX (/work/runs/x) or Windows (C:\runs\x, \\server\share).
ABSOLUTE_PATH = re.compile(r"(/|[A-Za-z]:[\\/]|\\\\)[^\n]*")


def kermany_train_csv(data: Path, out: Path) -> Path:
    """The label table (path, Pneumonia 1/0, patient_id) of the Kermany train split in the team's data
    folder `data`, written to `out`: what the shipped pneumonia adapter was trained and validated on."""
    import pandas as pd

    src = Path(data) / "kermany-pneumonia"
    table = pd.read_csv(src / "labels.csv")
    rows = pd.DataFrame(
        {
            "path": [str(src / p) for p in table["path"]],
            "Pneumonia": (table["label"] == "PNEUMONIA").astype(int),
            "patient_id": table["patient_id"],
        }
    )
    path = Path(out) / "kermany-train.csv"
    rows.to_csv(path, index=False)
    return path


# The caches shipped models were trained on, by the name their metadata keeps: the dataset folder they come
# from in the team's data folder, and how to write their label table again (to find a shipped model's
# validation images).
TRAINING_TABLES = {"kermany-train": ("kermany-pneumonia", kermany_train_csv)}


def portable_meta(value: Any) -> Any:
    """A JSON value with every string that is an absolute path replaced by its last component (``/work/runs/
    pneumonia-lora/cache/kermany-train`` -> ``kermany-train``): what shipped metadata may say of where its
    data and runs lay. Relative paths (an adapter's ``../<foundation>``) and other strings are kept."""
    if isinstance(value, dict):
        return {key: portable_meta(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_meta(item) for item in value]
    if isinstance(value, str) and ABSOLUTE_PATH.fullmatch(value):
        return re.split(r"[\\/]", value.rstrip("\\/"))[-1]
    return value


def training_kinds(meta: dict[str, Any]) -> set[str]:
    """Dataset kinds of the real (not synthetic) data a checkpoint was trained on, from its meta."""
    data = meta.get("data") or {}
    train = data.get("train_cache") or {}
    caches = [train, *train.get("pool", [])]
    caches += [s.get("cache") or {} for s in (data.get("pool") or {}).get("sources", [])]
    return {c["kind"] for c in caches if c.get("kind") and not c.get("synthetic")}


def _shippable(src: str | os.PathLike, fmt: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and meta of `src`, which must be a `fmt` checkpoint trained only on data whose
    terms allow shipping what is derived from it."""
    folder = _checkpoint_folder(src)
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != fmt:
        raise XrayfmError(f"{folder} is not a {fmt} checkpoint (format {meta.get('format')!r})")
    banned = sorted(training_kinds(meta) & set(NOT_REDISTRIBUTABLE))
    if banned:
        raise XrayfmError(f"{folder} was trained on {banned}: their terms forbid shipping derived weights")
    return folder, meta


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Shipped metadata as JSON, without the paths of this machine (:func:`portable_meta`)."""
    text = json.dumps(portable_meta(meta), indent=2, allow_nan=False, ensure_ascii=False)
    path.write_text(text + "\n")


def export_foundation(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    card: str | os.PathLike | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``dst/`` = ``src``'s weights cast to ``dtype`` + meta.json (+ ``card`` as MODEL_CARD.md).

    Refuses a checkpoint trained on data that may not be redistributed (CheXpert, MURA).
    """
    folder, meta = _shippable(src, "xrayfm.checkpoint")
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    with atomic_dir(dst) as tmp:
        safetensors.torch.save_file(cast, str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta = {
            **meta,
            **(extra_meta or {}),
            "weights": {
                "file": WEIGHTS,
                "sha256": sha256_file(tmp / WEIGHTS),
                "dtype": str(dtype).split(".")[-1],
            },
            "exported_from": {"path": str(folder.resolve()), "sha256": meta["weights"]["sha256"]},
        }
        _write_meta(tmp / META, meta)
        if card is not None:
            shutil.copyfile(card, tmp / "MODEL_CARD.md")
    return Path(dst)


def export_adapter(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    foundation: str,
    *,
    card: str | os.PathLike | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``dst/`` = ``src``'s LoRA adapter (+ head) and meta.json, pointing at the shipped ``foundation``
    (``xrayfm/<name>``) by a path relative to ``dst`` so that it loads wherever the package is installed.

    Refuses an adapter trained on data that may not be redistributed, or adapted from another foundation
    than the shipped one (the weights' sha256 must match).
    """
    folder, meta = _shippable(src, "xrayfm.adapted")
    base = pretrained_dir(foundation)
    base_sha = json.loads((base / META).read_text())["weights"]["sha256"]
    if (meta.get("foundation") or {}).get("sha256") != base_sha:
        raise XrayfmError(f"{folder} was not adapted from the shipped {foundation} (weights sha256 differs)")
    dst = Path(dst)
    if dst.resolve().parent != base.parent.resolve():
        raise XrayfmError(f"{dst} must lie beside the shipped foundations ({base.parent})")
    with atomic_dir(dst) as tmp:
        shutil.copytree(folder / ADAPTER_DIR, tmp / ADAPTER_DIR)
        meta = {
            **meta,
            **(extra_meta or {}),
            "foundation": {"path": f"../{base.name}", "name": foundation, "sha256": base_sha},
            "exported_from": {"path": str(folder.resolve())},
        }
        _write_meta(tmp / META, meta)
        if card is not None:
            shutil.copyfile(card, tmp / "MODEL_CARD.md")
    return dst


__all__ = ["NOT_REDISTRIBUTABLE", "export_adapter", "export_foundation", "portable_meta", "training_kinds"]
