"""Safe checkpoints: tensors in safetensors, the rest in JSON, folders written atomically. Never pickle.

Layouts (one folder each):
  model checkpoint   model.safetensors + meta.json
  training state     model.safetensors + state.safetensors (optimizer, RNG) + state.json
  adapted model      adapter/ (PEFT: adapter_model.safetensors + adapter_config.json) + meta.json
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import peft
import safetensors.torch
import torch
from torch import nn

from xrayfm.errors import XrayfmError, list_offenders
from xrayfm.models.backbones import create_model, new_head
from xrayfm.models.lora import load_adapter, save_adapter
from xrayfm.registry import resolve_checkpoint_dir
from xrayfm.utils import atomic_dir, sha256_file, to_jsonable

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
ADAPTER_DIR = "adapter"


# ------------------------------------------------------------------------------------------ public API
def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write `model.safetensors` + `meta.json` into `out_dir`, replacing any previous checkpoint atomically.

    `metadata["model"]` must hold the `create_model` arguments that rebuild `model` (at least "name");
    other keys (labels, preprocessing, metrics, manifest_hash, ...) are stored as given. Versions,
    creation time and the weights' sha256 are added.
    """
    model = _plain_module(model)
    if isinstance(model, peft.PeftModel):
        raise XrayfmError("save_checkpoint takes a plain model: use save_adapted, or merge the adapter first")
    spec = _model_spec(metadata)
    _check_spec_builds(spec, model)
    with atomic_dir(out_dir) as tmp:
        _save_tensors(model.state_dict(), tmp / WEIGHTS)
        meta = {
            "format": "xrayfm.checkpoint",
            "format_version": FORMAT_VERSION,
            **metadata,
            "model": spec,
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)},
            "versions": _versions(),
            "created": _now(),
        }
        _write_json(tmp / META, to_jsonable(meta, strict=True, where="metadata"))
    return Path(out_dir)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from `meta.json` with `create_model` and load its weights strictly (eval mode)."""
    folder = _checkpoint_folder(path)
    meta = _read_json(folder / META, expected_format="xrayfm.checkpoint")
    spec = _model_spec(meta)
    weights = folder / meta.get("weights", {}).get("file", WEIGHTS)
    expected_hash = meta.get("weights", {}).get("sha256")
    if expected_hash and sha256_file(weights) != expected_hash:
        raise XrayfmError(f"{weights} does not match the sha256 in {folder / META} (file changed or corrupt)")
    model = _build(spec, where=folder)
    _load_strict(model, _load_tensors(weights), source=weights, spec=spec)
    return model.to(device).eval(), meta


def save_training_state(
    out_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    *,
    epoch: int,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save everything needed to resume training exactly: weights, optimizer, scheduler, counters, RNGs."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "format": "xrayfm.training_state",
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "step": step,
        "extra": _encode(extra or {}, tensors, "extra"),
        "optimizer": _encode(optimizer.state_dict() if optimizer else None, tensors, "optimizer"),
        "scheduler": _encode(scheduler.state_dict() if scheduler else None, tensors, "scheduler"),
        "rng": _encode(_rng_state(), tensors, "rng"),
        "versions": _versions(),
        "created": _now(),
    }
    with atomic_dir(out_dir) as tmp:
        _save_tensors(_plain_module(model).state_dict(), tmp / WEIGHTS)
        _save_tensors(tensors, tmp / STATE_TENSORS)
        _write_json(tmp / STATE_JSON, tree)
    return Path(out_dir)


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states in place; returns {"epoch", "step", "extra"}."""
    folder = _checkpoint_folder(path, marker=STATE_JSON)
    tree = _read_json(folder / STATE_JSON, expected_format="xrayfm.training_state")
    tensors = _load_tensors(folder / STATE_TENSORS)
    _load_strict(_plain_module(model), _load_tensors(folder / WEIGHTS), source=folder / WEIGHTS)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        state = _decode(tree[name], tensors)
        if (state is None) != (target is None):
            raise XrayfmError(f"{folder} has {'no ' if state is None else ''}{name} state but one was passed")
        if target is not None:
            try:
                target.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise XrayfmError(f"{name} state in {folder} does not fit the {name} given: {exc}") from exc
    _set_rng_state(_decode(tree["rng"], tensors))
    return {"epoch": tree["epoch"], "step": tree["step"], "extra": _decode(tree["extra"], tensors)}


def save_adapted(out_dir: str | os.PathLike, peft_model: peft.PeftModel, metadata: dict[str, Any]) -> Path:
    """Save a LoRA-adapted model: the adapter (+ trained head) and meta with its foundation's lineage.

    `metadata["foundation"]` is the folder of the foundation checkpoint (from save_checkpoint); it is
    stored as {"path": absolute path, "sha256": hash of its weights} so that loading can verify it.
    """
    peft_model = _plain_module(peft_model)
    if not isinstance(peft_model, peft.PeftModel):
        raise XrayfmError(f"save_adapted needs a PEFT model, got {type(peft_model).__name__}")
    if "foundation" not in metadata:
        raise XrayfmError("save_adapted needs metadata['foundation']: the foundation checkpoint folder")
    foundation_dir = _checkpoint_folder(metadata["foundation"]).resolve()
    foundation_meta = _read_json(foundation_dir / META, expected_format="xrayfm.checkpoint")
    spec = {**_model_spec(foundation_meta), "num_classes": int(peft_model.get_base_model().num_classes)}
    with atomic_dir(out_dir) as tmp:
        save_adapter(peft_model, tmp / ADAPTER_DIR)
        meta = {
            "format": "xrayfm.adapted",
            "format_version": FORMAT_VERSION,
            **metadata,
            "model": spec,
            "foundation": {"path": str(foundation_dir), "sha256": foundation_meta["weights"]["sha256"]},
            "versions": _versions(),
            "created": _now(),
        }
        _write_json(tmp / META, to_jsonable(meta, strict=True, where="metadata"))
    return Path(out_dir)


def load_adapted(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    foundation: str | os.PathLike | None = None,
    is_trainable: bool = False,
) -> tuple[peft.PeftModel, dict]:
    """Rebuild foundation + adapter. The foundation comes from meta (or `foundation`, if it moved) and
    must have the weights hash recorded at adaptation time; a relative path in meta is relative to the
    adapter's folder (the model store writes it so, so a store can move). Eval mode unless trainable."""
    folder = _checkpoint_folder(path)
    meta = _read_json(folder / META, expected_format="xrayfm.adapted")
    lineage = meta.get("foundation") or {}
    recorded = lineage.get("path")
    foundation_dir = Path(foundation) if foundation else (folder / recorded if recorded else None)
    if foundation_dir is None or not (foundation_dir / META).is_file():
        raise XrayfmError(
            f"foundation checkpoint of {folder} not found at {foundation_dir} (pass foundation=...)"
        )
    base, base_meta = load_checkpoint(foundation_dir)
    if base_meta["weights"]["sha256"] != lineage.get("sha256"):
        raise XrayfmError(
            f"foundation at {foundation_dir} is not the one {folder} was adapted from "
            f"(weights sha256 {base_meta['weights']['sha256'][:12]}... "
            f"!= {str(lineage.get('sha256'))[:12]}...)"
        )
    num_classes = _model_spec(meta).get("num_classes")
    if num_classes is not None and num_classes != base.num_classes:
        new_head(base, num_classes)
    model = load_adapter(base, folder / ADAPTER_DIR, is_trainable=is_trainable).to(device)
    return (model if is_trainable else model.eval()), meta


def checkpoint_format(path: str | Path) -> str:
    """``xrayfm.checkpoint`` (a full model) or ``xrayfm.adapted`` (foundation + adapter)."""
    meta_path = resolve_checkpoint_dir(path) / META
    if not meta_path.is_file():
        raise XrayfmError(f"not a checkpoint folder: {meta_path} is missing")
    try:
        return str(json.loads(meta_path.read_text()).get("format"))
    except json.JSONDecodeError as exc:
        raise XrayfmError(f"cannot read {meta_path}: {exc}") from exc


def load_any(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a full checkpoint or an adapted one (rebuilding its foundation + adapter), in eval mode."""
    if checkpoint_format(path) == "xrayfm.adapted":
        return load_adapted(path, device)
    return load_checkpoint(path, device)


# ------------------------------------------------------------------------------------- folders & files
def _checkpoint_folder(path: str | os.PathLike, marker: str = META) -> Path:
    """Accept a checkpoint folder, the JSON file inside it, or a shipped model's ``xrayfm/<name>``."""
    folder = resolve_checkpoint_dir(path)
    if folder.is_file() and folder.name == marker:
        folder = folder.parent
    if not (folder / marker).is_file():
        raise XrayfmError(f"not a checkpoint folder: {folder / marker} is missing")
    return folder


def _write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN/Infinity), UTF-8, indented for people."""
    path.write_text(json.dumps(obj, indent=2, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path, expected_format: str) -> dict[str, Any]:
    """Read a checkpoint's JSON and check it is the expected kind and a version this code can read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise XrayfmError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise XrayfmError(f"{path} is not a {expected_format} (format: {found!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise XrayfmError(
            f"{path} has format_version {data['format_version']}; this xrayfm reads <= {FORMAT_VERSION}"
        )
    return data


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file of detached, contiguous CPU tensors."""
    flat = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    safetensors.torch.save_file(flat, str(path), metadata={"format": "pt"})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU."""
    if not path.is_file():
        raise XrayfmError(f"file not found: {path}")
    return safetensors.torch.load_file(str(path), device="cpu")


# ---------------------------------------------------------------------------------------------- models
def _plain_module(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / (Distributed)DataParallel wrappers, which prefix state_dict keys."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _model_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """The `create_model` arguments stored under meta["model"], without any pretrained source."""
    spec = meta.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise XrayfmError('metadata needs "model": {"name": <timm name>, <create_model arguments>...}')
    return {key: value for key, value in spec.items() if key != "pretrained"}


def _build(spec: dict[str, Any], where: Path | None = None) -> nn.Module:
    """create_model(**spec) with a clear error naming the checkpoint."""
    try:
        return create_model(**spec)
    except XrayfmError as exc:
        raise XrayfmError(
            f"cannot rebuild the model of {where or 'this checkpoint'} from {spec}: {exc}"
        ) from exc


def _check_spec_builds(spec: dict[str, Any], model: nn.Module) -> None:
    """Refuse to save a checkpoint whose meta would rebuild a different architecture."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        rebuilt = _build(spec).state_dict()
    actual = model.state_dict()
    differing = sorted(set(rebuilt) ^ set(actual)) or [
        key for key in actual if tuple(actual[key].shape) != tuple(rebuilt[key].shape)
    ]
    if differing:
        raise XrayfmError(
            f'metadata["model"] = {spec} does not rebuild this model; '
            f"differing tensors: {list_offenders(differing, 5)}"
        )


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path, spec: Any = None) -> None:
    """load_state_dict(strict=True), with missing/unexpected/mis-shaped tensors listed in one clear error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        what = f"model {spec}" if spec else type(model).__name__
        raise XrayfmError(
            f"weights in {source} do not match {what}: missing {list_offenders(missing, 5) or '-'}; "
            f"unexpected {list_offenders(unexpected, 5) or '-'}; "
            f"wrong shape {list_offenders(shapes, 5) or '-'}"
        )
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    """torch CPU (+CUDA when available), numpy global and python `random` generator states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of _rng_state; CUDA states are restored only where the same number of GPUs is present."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn("saved CUDA RNG states not restored: the GPU count differs", stacklevel=3)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ------------------------------------------------------------------------------------------ JSON codec
# Hand-written because neither safetensors nor json alone can hold optimizer/scheduler/RNG states:
# tensors go to a flat safetensors dict, the rest to JSON with tags for what JSON lacks
# (tuples, int dict keys, non-finite floats, numpy arrays). Anything else is refused, never pickled.
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON tree for `obj`; tensors are moved into `tensors` under their `path` and referenced by name."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__dict__": [
                [_encode(k, tensors, f"{path}.key"), _encode(v, tensors, f"{path}.{k}")]
                for k, v in obj.items()
            ]
        }
    raise XrayfmError(
        f"cannot store {path} ({type(obj).__name__}) in a safe checkpoint: only plain data and tensors"
    )


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of _encode."""
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__ndarray__" in tree:
        return np.asarray(tree["__ndarray__"], dtype=tree["dtype"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__dict__"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


# ------------------------------------------------------------------------------------------ provenance
def _versions() -> dict[str, str]:
    """Versions of the software that wrote a checkpoint."""
    import timm

    import xrayfm

    return {
        "xrayfm": xrayfm.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "safetensors": getattr(safetensors, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def _now() -> str:
    """Current UTC time, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")
