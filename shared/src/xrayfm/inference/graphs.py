"""ONNX graphs stored with a model version: exported once when the version is published, int8 judged on the
run's own validation images.

:func:`version_graphs` writes ``model.onnx`` (fp32: logits, rollout, features and attention outputs, as
:func:`~xrayfm.inference.runtime.export_onnx` exports them) and ``model.int8.onnx``
(:func:`~xrayfm.inference.runtime.quantize_int8`) into a version's folder and returns what the version
records about them: each file's sha256, the opset, what they were exported from, and the int8 verdict.

The verdict (:func:`int8_verdict`): int8 is served only when it loses at most :data:`INT8_MAX_AUROC_LOSS`
mean AUROC against the fp32 graph on the validation images the run picked its checkpoint on
(:func:`validation_view` rebuilds them from the checkpoint's metadata and checks that they are the same
rows). When they cannot be rebuilt (the data is gone, a shipped model's data is not installed), int8 is
not served, and the verdict says why.

:func:`stored_graph` and :func:`choose_quantize` are what a worker uses: the stored file for a
quantization when it is intact, and what ``XRAYFM_QUANTIZE=auto`` serves. This module imports torch only
inside the functions that export or rebuild data (the torch-free worker imports it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.errors import XrayfmError
from xrayfm.utils import sha256_file

log = logging.getLogger(__name__)

GRAPH_FILES = {"none": "model.onnx", "int8": "model.int8.onnx"}  # quantization -> file in the version folder
EXPORT_FORMAT = 2  # bump when the exported graph's outputs change (part of the export cache's key)
INT8_MAX_AUROC_LOSS = 0.005  # int8 is served only when it loses at most this much mean AUROC


def _version_of(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def export_graphs(checkpoint: Path, folder: Path) -> tuple[dict[str, Any], Any]:
    """Export the checkpoint folder `checkpoint` to ``model.onnx`` and ``model.int8.onnx`` in `folder`;
    returns (the record of the files, the loaded served model)."""
    from xrayfm.inference import load_served_model
    from xrayfm.inference.runtime import OPSET, export_onnx, quantize_int8

    served = load_served_model(checkpoint, device="cpu")
    fp32 = export_onnx(served, Path(folder) / GRAPH_FILES["none"])
    int8 = quantize_int8(fp32, Path(folder) / GRAPH_FILES["int8"])
    pre = served.preprocessing
    record = {
        "files": {q: {"file": p.name, "sha256": sha256_file(p)} for q, p in (("none", fp32), ("int8", int8))},
        "opset": OPSET,
        "export_format": EXPORT_FORMAT,
        "input": {"size": pre.size, "channels": pre.channels},
        "exported_from": {
            "checkpoint_sha256": served.sha256,
            "torch": _version_of("torch"),
            "onnx": _version_of("onnx"),
            "onnxruntime": _version_of("onnxruntime"),
        },
    }
    return record, served


def validation_view(
    meta: dict[str, Any], work: Path, data_dirs: tuple[Path, ...] = ()
) -> tuple[Any, list[str]]:
    """The validation images a run picked this checkpoint on, rebuilt from its metadata (``training``
    config, ``data`` split facts): (view, label names). A shipped model's, whose run folder is not here, is
    rebuilt from the dataset it was trained on when one of `data_dirs` holds it (:func:`shipped_view`, in
    the folder `work`). XrayfmError when they cannot be rebuilt or are not the rows the run used."""
    from xrayfm.train.config import TrainConfig
    from xrayfm.train.data import describe_views, load_task_data
    from xrayfm.train.distributed import DistEnv

    training, data = meta.get("training"), meta.get("data")
    if not isinstance(training, dict) or not isinstance(data, dict) or not data.get("val_rows_sha256"):
        raise XrayfmError("the checkpoint's metadata does not say which validation images its run used")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.from_dict({k: v for k, v in training.items() if k in names})
    config = dataclasses.replace(config, progress_bar=False)
    pre = meta["preprocessing"]
    try:
        task = load_task_data(config, DistEnv(), pre["mean"], pre["std"])
    except (XrayfmError, OSError) as exc:
        shipped = shipped_view(meta, config, data_dirs, work)
        if shipped is None:
            raise XrayfmError(f"the run's validation data cannot be read here: {exc}") from None
        return shipped
    if describe_views(task)["val_rows_sha256"] != data["val_rows_sha256"]:
        raise XrayfmError("the validation split rebuilt here is not the one the run used (other rows)")
    if [n.casefold() for n in task.names] != [str(n).casefold() for n in meta.get("labels") or []]:
        raise XrayfmError(
            f"the validation data's labels {task.names} are not the model's {meta.get('labels')}"
        )
    return task.val, list(task.names)


def shipped_view(
    meta: dict[str, Any], config: Any, data_dirs: tuple[Path, ...], work: Path
) -> tuple[Any, list[str]] | None:
    """A shipped model's validation images from the dataset of its training cache
    (:data:`xrayfm.models.shipping.TRAINING_TABLES`) in one of `data_dirs`: the run's patient split drawn
    again on the full table, and only its validation rows decoded (into a cache in `work`). None when no
    folder holds that dataset; XrayfmError when the split drawn is not the run's."""
    import pandas as pd

    from xrayfm.data.cache import prepare_cache
    from xrayfm.data.folder import CsvDataset
    from xrayfm.data.splits import split_by_patient
    from xrayfm.data.transforms import build_transform
    from xrayfm.models.shipping import TRAINING_TABLES
    from xrayfm.train.data import label_columns, open_cache
    from xrayfm.train.sampler import SeededView

    dataset, write_table = TRAINING_TABLES.get(Path(str(config.cache or "")).name, (None, None))
    found = [Path(d) for d in data_dirs if dataset is not None and (Path(d) / dataset).is_dir()]
    if write_table is None or not found or meta["data"].get("validation") != "patient split":
        return None
    labels, work = list(meta["labels"]), Path(work)
    table = write_table(found[0], work)
    full = CsvDataset(table, label_columns=labels, patient_column="patient_id")
    _, rows = split_by_patient(full, config.val_fraction, seed=config.split_seed)
    if describe_rows(rows) != meta["data"]["val_rows_sha256"]:
        raise XrayfmError("the validation split drawn again from the data folder is not the one the run used")
    pd.read_csv(table).iloc[rows].to_csv(work / "validation.csv", index=False)
    subset = CsvDataset(work / "validation.csv", label_columns=labels, patient_column="patient_id")
    pre = meta["preprocessing"]
    prepare_cache(subset, work / "cache", size=int(pre["size"]), mode=pre.get("mode", "pad"), progress=False)
    base = open_cache(work / "cache", config)
    transform = build_transform(False, int(pre["size"]), pre["mean"], pre["std"], int(pre["channels"]))
    columns = label_columns(list(base.pathologies), labels)
    return SeededView(base, transform, config.seed, None, columns), labels


def describe_rows(rows: np.ndarray) -> str:
    """The sha256 a run's metadata keeps of its validation rows (``data.val_rows_sha256``)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


def graph_probabilities(paths: dict[str, Path], view: Any, batch: int = 64) -> dict[str, np.ndarray]:
    """Sigmoid of each graph's logits over `view`'s preprocessed images, `batch` at a time: {key: [N, L]}."""
    import torch

    from xrayfm.inference.onnx_serving import ort_session

    sessions = {key: ort_session(path) for key, path in paths.items()}
    logits: dict[str, list[np.ndarray]] = {key: [] for key in paths}
    for start in range(0, len(view), batch):
        rows = range(start, min(start + batch, len(view)))
        pixels = torch.stack([view[i]["image"] for i in rows]).numpy().astype(np.float32)
        for key, session in sessions.items():
            logits[key].append(session.run(["logits"], {"pixels": pixels})[0])
    return {key: 1.0 / (1.0 + np.exp(-np.concatenate(out).astype(np.float64))) for key, out in logits.items()}


def int8_auroc(record: dict[str, Any], folder: Path, view: Any, names: list[str]) -> dict[str, Any]:
    """Mean AUROC of the fp32 and the int8 graph in `folder` on `view` (the run's validation images), the
    change, and the largest change of a probability."""
    from xrayfm.evaluate import multilabel_report

    y = view.labels.astype(np.float64)
    probs = graph_probabilities({q: Path(folder) / f["file"] for q, f in record["files"].items()}, view)
    auroc = {
        q: multilabel_report(y, p, names, n_bootstrap=0, competition=None)["mean_auroc"]
        for q, p in probs.items()
    }
    return {
        "metric": "mean_auroc",
        "images": len(view),
        "fp32_auroc": auroc["none"],
        "int8_auroc": auroc["int8"],
        "delta": None if None in auroc.values() else auroc["int8"] - auroc["none"],
        "max_abs_prob_diff": float(np.abs(probs["int8"] - probs["none"]).max()),
    }


def int8_verdict(measured: dict[str, Any] | None, why_not: str | None = None) -> dict[str, Any]:
    """``serve_int8`` and its reason: true only when int8 was measured and lost at most
    :data:`INT8_MAX_AUROC_LOSS` mean AUROC on the validation images."""
    if measured is None or measured.get("delta") is None:
        reason = f"int8 AUROC not measured: {why_not or 'AUROC undefined on the validation images'}"
        return {"serve_int8": False, "reason": reason}
    delta, limit = float(measured["delta"]), INT8_MAX_AUROC_LOSS
    fits = delta >= -limit
    return {
        "serve_int8": fits,
        "reason": (
            f"int8 {'loses at most' if fits else 'loses more than'} {limit} mean AUROC on "
            f"{measured['images']} validation images ({measured['fp32_auroc']:.4f} fp32 -> "
            f"{measured['int8_auroc']:.4f} int8, {delta:+.4f})"
        ),
    }


def version_graphs(
    checkpoint: Path, folder: Path | None = None, data_dirs: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Export the graphs of `checkpoint` into `folder` (default: the checkpoint's own) and judge int8 on the
    run's validation images (a shipped model's: from `data_dirs`, see :func:`validation_view`); returns
    the record a version keeps (files, opset, source, ``int8`` verdict)."""
    folder = Path(folder or checkpoint)
    record, served = export_graphs(Path(checkpoint), folder)
    measured, why_not = None, None
    with tempfile.TemporaryDirectory(prefix="xrayfm-validation-") as work:
        try:
            view, names = validation_view(served.meta, Path(work), data_dirs)
            measured = int8_auroc(record, folder, view, names)
        except XrayfmError as exc:
            why_not = str(exc)
    record["int8"] = {**(measured or {}), **int8_verdict(measured, why_not)}
    log.info("exported the ONNX graphs of %s: %s", checkpoint, record["int8"]["reason"])
    return record


def stored_graph(folder: Path, record: dict[str, Any] | None, quantize: str) -> tuple[Path | None, str]:
    """The stored graph for `quantize` in the version `folder`, or None and why not (no record, a missing
    or changed file, an older export format)."""
    entry = ((record or {}).get("files") or {}).get(quantize)
    if not entry:
        return None, "the version has no stored ONNX graphs"
    if record.get("export_format") != EXPORT_FORMAT:
        return None, f"its graphs are of export format {record.get('export_format')}, not {EXPORT_FORMAT}"
    path = Path(folder) / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        return None, f"its {entry['file']} is missing or not the file that was exported"
    return path, f"the version's stored {entry['file']}"


def choose_quantize(setting: str, record: dict[str, Any] | None) -> tuple[str, str]:
    """What XRAYFM_QUANTIZE serves: (``none`` or ``int8``, why). ``auto`` follows the version's int8
    verdict; with no verdict it serves fp32."""
    if setting != "auto":
        return setting, f"XRAYFM_QUANTIZE={setting}"
    verdict = (record or {}).get("int8") or {}
    if verdict.get("serve_int8") is True:
        return "int8", f"XRAYFM_QUANTIZE=auto: {verdict.get('reason')}"
    reason = verdict.get("reason") or "the version has no int8 verdict"
    return "none", f"XRAYFM_QUANTIZE=auto, fp32: {reason}"
