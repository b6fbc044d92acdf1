"""Staff feedback on answers, and the dataset it becomes: the loop from "this prediction is wrong" to a LoRA
job on the corrected labels.

A feedback folder (the stack's ``XRAYFM_FEEDBACK_DIR``, a volume)::

    records/<id>.json    one verdict: job id, model name/version/labels, the answer given, agree or
                         disagree, the correct label, an optional comment, when, and which key (a hash)
    images/<id>.png      the image, only when the deployment opted in (XRAYFM_FEEDBACK_KEEP_IMAGES=1);
                         deleted after the retention period
    export.csv           what :func:`export_csv` last wrote: ``path`` and one column per label (1/0),
                         the layout ``xrayfm adapt --kind csv`` and training jobs read

A record holds no patient data: no file name, no DICOM header, no pixels. Torch-free.
"""

from __future__ import annotations

import csv
import os
import time
import uuid
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.utils import atomic_write, atomic_write_json, read_json

RECORDS, IMAGES, EXPORT = "records", "images", "export.csv"
VERDICTS = ("agree", "disagree")
MAX_COMMENT = 500


def make_record(
    *,
    job_id: str,
    model: dict[str, Any],
    prediction: str,
    probability: float,
    verdict: str,
    label: str | None = None,
    comment: str | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    """A checked feedback record. `model` is the answer's model (name, version, labels, negative_label).

    ``agree`` takes the prediction as the correct label (a different `label` is a contradiction);
    ``disagree`` needs the correct `label`, other than the prediction. Labels are the model's own or its
    negative answer."""
    if verdict not in VERDICTS:
        raise XrayfmError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    allowed = [*model.get("labels", []), str(model.get("negative_label") or "Normal")]
    if verdict == "agree":
        if label is not None and label != prediction:
            raise XrayfmError(f"'agree' with the answer {prediction!r} but the label given is {label!r}")
        label = prediction
    elif label is None or label == prediction:
        raise XrayfmError(f"'disagree' needs the correct label, one of {allowed} other than {prediction!r}")
    if label not in allowed:
        raise XrayfmError(f"label {label!r} is not one this model answers: {allowed}")
    if comment is not None and len(comment) > MAX_COMMENT:
        raise XrayfmError(f"comment longer than {MAX_COMMENT} characters")
    return {
        "id": str(uuid.uuid4()),
        "job_id": job_id,
        "model": {k: model.get(k) for k in ("name", "version", "labels", "negative_label")},
        "prediction": prediction,
        "probability": float(probability),
        "verdict": verdict,
        "label": label,
        "comment": comment or None,
        "key_id": key_id,
        "created": time.time(),
        "image": None,
    }


def save_record(
    folder: str | os.PathLike, record: dict[str, Any], image_png: bytes | None = None
) -> dict[str, Any]:
    """Write the record (and the image, when given: only deployments that opted in pass one)."""
    root = Path(folder)
    (root / RECORDS).mkdir(parents=True, exist_ok=True)
    if image_png is not None:
        (root / IMAGES).mkdir(exist_ok=True)
        atomic_write(root / IMAGES / f"{record['id']}.png", image_png)
        record = {**record, "image": f"{IMAGES}/{record['id']}.png"}
    atomic_write_json(root / RECORDS / f"{record['id']}.json", record)
    return record


def load_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record, oldest first (an unreadable file is skipped, not fatal)."""
    found = []
    for path in (Path(folder) / RECORDS).glob("*.json"):
        try:
            found.append(read_json(path))
        except XrayfmError:
            continue
    return sorted(found, key=lambda r: r.get("created") or 0)


def agreement(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model name, version): agree and disagree counts and the agreement rate."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = (str(r["model"]["name"]), str(r["model"]["version"]))
        row = out.setdefault(key, {"agree": 0, "disagree": 0})
        row[r["verdict"]] += 1
    for row in out.values():
        row["agreement"] = row["agree"] / (row["agree"] + row["disagree"])
    return out


def sweep_images(folder: str | os.PathLike, retention_days: float, now: float | None = None) -> int:
    """Delete kept images older than `retention_days`; returns how many. Their records stay (no image)."""
    cutoff = (now or time.time()) - retention_days * 86400
    removed = 0
    for path in (Path(folder) / IMAGES).glob("*.png"):
        if path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def export_csv(folder: str | os.PathLike, model: str, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the records of model `model` (every version) that have their image as a label CSV: ``path``
    (relative to the CSV's folder) and one 1/0 column per label (the correct label's; the negative answer
    is all 0). Feedback knows no patients: each image counts as its own. Later verdicts on the same job
    replace earlier ones. Returns where, how many rows, and how many records had no image."""
    root = Path(folder)
    target = Path(out) if out is not None else root / EXPORT
    chosen = [r for r in load_records(root) if r["model"]["name"] == model]
    if not chosen:
        raise XrayfmError(f"no feedback on model {model!r} in {root}")
    labels = chosen[-1]["model"]["labels"]
    latest = {r["job_id"]: r for r in chosen if r["model"]["labels"] == labels}  # last verdict per job wins
    rows, without_image = [], 0
    for r in latest.values():
        image = root / r["image"] if r.get("image") else None
        if image is None or not image.is_file():
            without_image += 1
            continue
        rel = os.path.relpath(image.resolve(), target.resolve().parent)
        rows.append([rel, *(int(r["label"] == name) for name in labels)])
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *labels])
        writer.writerows(rows)
    return {
        "csv": str(target),
        "model": model,
        "labels": labels,
        "rows": len(rows),
        "without_image": without_image,
    }


__all__ = [
    "EXPORT",
    "IMAGES",
    "RECORDS",
    "VERDICTS",
    "agreement",
    "export_csv",
    "load_records",
    "make_record",
    "save_record",
    "sweep_images",
]
