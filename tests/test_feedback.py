"""xrayfm.feedback: the records' rules, retention of kept images, and the export `adapt` reads."""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from xrayfm.cli import main
from xrayfm.errors import XrayfmError
from xrayfm.feedback import agreement, export_csv, load_records, make_record, save_record, sweep_images

MODEL = {"name": "bone", "version": "2", "labels": ["Abnormal"], "negative_label": "Normal"}


def _png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((32, 32)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _record(job: str, verdict: str, label: str | None = None, model: dict = MODEL) -> dict:
    return make_record(
        job_id=job, model=model, prediction="Abnormal", probability=0.7, verdict=verdict, label=label
    )


def test_verdict_rules():
    assert _record("j", "agree")["label"] == "Abnormal"
    assert _record("j", "disagree", "Normal")["label"] == "Normal"
    for verdict, label, match in (("agree", "Normal", "agree"), ("disagree", None, "needs the correct"),
                                  ("disagree", "Abnormal", "needs the correct"), ("disagree", "Elbow", "not one"),
                                  ("maybe", None, "verdict")):  # fmt: skip
        with pytest.raises(XrayfmError, match=match):
            _record("j", verdict, label)
    with pytest.raises(XrayfmError, match="comment"):
        make_record(
            job_id="j",
            model=MODEL,
            prediction="Abnormal",
            probability=0.7,
            verdict="agree",
            comment="x" * 501,
        )


def test_export_keeps_the_last_verdict_per_answer_and_only_kept_images(tmp_path):
    folder = tmp_path / "fb"
    save_record(folder, _record("j1", "agree"), _png(1))
    time.sleep(0.01)
    save_record(folder, _record("j1", "disagree", "Normal"), _png(1))  # changed their mind: this one counts
    save_record(folder, _record("j2", "disagree", "Normal"), _png(2))
    save_record(folder, _record("j3", "agree"))  # no image kept: counts in agreement, not in the export
    save_record(folder, _record("j4", "agree", model={**MODEL, "name": "chest"}), _png(4))
    summary = export_csv(folder, "bone", tmp_path / "elsewhere" / "set.csv")
    assert (summary["rows"], summary["without_image"], summary["labels"]) == (2, 1, ["Abnormal"])
    with open(tmp_path / "elsewhere" / "set.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["Abnormal"] for r in rows] == ["0", "0"]
    for r in rows:  # relative to the CSV's folder, so the folder can move with it
        assert not os.path.isabs(r["path"]) and (tmp_path / "elsewhere" / r["path"]).is_file()
    assert agreement(load_records(folder))[("bone", "2")] == {"agree": 2, "disagree": 2, "agreement": 0.5}
    with pytest.raises(XrayfmError, match="no feedback on model 'knee'"):
        export_csv(folder, "knee")


def test_images_are_deleted_after_the_retention_period(tmp_path):
    old = save_record(tmp_path, _record("j1", "agree"), _png(1))
    new = save_record(tmp_path, _record("j2", "agree"), _png(2))
    stale = time.time() - 10 * 86400
    os.utime(tmp_path / old["image"], (stale, stale))
    assert sweep_images(tmp_path, retention_days=7) == 1
    assert not (tmp_path / old["image"]).exists() and (tmp_path / new["image"]).exists()
    assert len(load_records(tmp_path)) == 2  # the records stay
    assert export_csv(tmp_path, "bone")["without_image"] == 1


def test_cli_export(tmp_path, capsys):
    save_record(tmp_path, _record("j1", "disagree", "Normal"), _png(1))
    assert main(["feedback", "export", "--dir", str(tmp_path), "--model", "bone", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 1 and out["csv"] == str(tmp_path / "export.csv")
    assert out["agreement"] == {"bone/2": {"agree": 0, "disagree": 1, "agreement": 0.0}}
