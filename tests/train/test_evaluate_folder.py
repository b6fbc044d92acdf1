"""Evaluating the shipped model on a user's folder of images: labels match ignoring case, and a failed run
(an evaluation, or a training run before it could resume) leaves nothing that blocks the next one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrayfm.cli import main
from xrayfm.data.cache import read_index, read_manifest
from xrayfm.errors import CacheMismatchError, DataError
from xrayfm.models.checkpoint import STATE_JSON
from xrayfm.train.config import AdaptConfig
from xrayfm.train.data import ensure_cache, label_columns
from xrayfm.train.distributed import DistEnv
from xrayfm.train.evaluation import evaluate

SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"  # labels ["Pneumonia"]
KERMANY = Path("kermany-pneumonia") / "chest_xray" / "train"
QUIET = {"n_bootstrap": 10, "progress_bar": False, "device": "cpu"}


def test_labels_match_exactly_else_ignoring_case() -> None:
    assert label_columns(["normal", "pneumonia"], ["Pneumonia"]) == [1]
    assert label_columns(["A", "a"], ["a", "A"]) == [1, 0]  # an exact spelling wins
    assert label_columns(["Edema", "Effusion"], None) is None
    with pytest.raises(DataError, match="unknown labels Atelectasis"):
        label_columns(["normal", "pneumonia"], ["Atelectasis"])
    with pytest.raises(DataError, match=r"several .* ignoring case: ab \(Ab or AB\)"):
        label_columns(["Ab", "AB"], ["ab"])


def _folder(root: Path, classes: dict[str, list[Path]]) -> Path:
    """A folder dataset ``root/<class>/`` holding copies of the images given (copied, never moved)."""
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for image in images:
            shutil.copyfile(image, root / name / image.name)
    return root


def _phantoms(folder: Path, n: int, seed: int) -> list[Path]:
    """`n` small grey PNGs of noise (enough for the pipeline; their predictions mean nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img-{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.real_data
@pytest.mark.slow
def test_the_shipped_model_evaluates_a_lower_case_folder_of_real_radiographs(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = shared_data / KERMANY
    if not source.is_dir():
        pytest.skip(f"no Kermany images at {source}")
    take = {name.lower(): sorted((source / name).glob("*.jpeg"))[:4] for name in ("NORMAL", "PNEUMONIA")}
    root = _folder(tmp_path / "site", take)  # normal/, pneumonia/: the model's label is "Pneumonia"
    out = tmp_path / "eval"
    argv = ["evaluate", SHIPPED, "--kind", "folder", "--root", str(root), "--split", "train"]
    assert main([*argv, "--out", str(out), "--n-bootstrap", "10", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = summary["report"]
    assert report["kind"] == "binary" and list(report["operating_points"]) == ["Pneumonia"]
    assert report["overall"]["image"]["positives"] == 4 and report["overall"]["image"]["negatives"] == 4


@pytest.mark.slow
def test_a_failed_evaluation_leaves_no_cache_and_a_rerun_takes_other_images(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    wrong = _folder(
        tmp_path / "wrong",
        {"normal": _phantoms(tmp_path / "a", 3, 0), "effusion": _phantoms(tmp_path / "b", 3, 1)},
    )
    with pytest.raises(DataError, match="unknown labels Pneumonia"):
        evaluate(SHIPPED, out, kind="folder", root=str(wrong), split="train", **QUIET)
    assert not (out / "cache").exists()  # refused before a single image was cached

    first = _folder(
        tmp_path / "first",
        {"normal": _phantoms(tmp_path / "c", 3, 2), "pneumonia": _phantoms(tmp_path / "d", 3, 3)},
    )
    evaluate(SHIPPED, out, kind="folder", root=str(first), split="train", **QUIET)
    second = _folder(
        tmp_path / "second",
        {"normal": _phantoms(tmp_path / "e", 2, 4), "pneumonia": _phantoms(tmp_path / "f", 4, 5)},
    )
    summary = evaluate(SHIPPED, out, kind="folder", root=str(second), split="train", **QUIET)
    image = summary["report"]["overall"]["image"]
    assert (image["positives"], image["negatives"]) == (4, 2)  # the second folder's images, not the first's


def _adapt_config(out: Path, root: Path) -> AdaptConfig:
    return AdaptConfig(
        kind="folder", root=str(root), split="train", out=str(out), size=32, progress_bar=False
    )


def test_a_run_without_a_resumable_state_rebuilds_its_own_cache_from_other_images(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _folder(
        tmp_path / "first",
        {"normal": _phantoms(tmp_path / "a", 3, 0), "pneumonia": _phantoms(tmp_path / "b", 3, 1)},
    )
    second = _folder(
        tmp_path / "second",
        {"normal": _phantoms(tmp_path / "c", 2, 2), "pneumonia": _phantoms(tmp_path / "d", 4, 3)},
    )
    cache = ensure_cache(_adapt_config(out, first), "train", None, DistEnv())
    assert len(read_index(cache, read_manifest(cache))) == 6
    # The first run failed before training (no out/last/): its rerun on other images takes them.
    assert ensure_cache(_adapt_config(out, second), "train", None, DistEnv()) == cache
    assert len(read_index(cache, read_manifest(cache))) == 6 and "second" in read_manifest(cache)["root"]

    # A run that can resume refuses a cache of other images: it would train on two datasets.
    (out / "last").mkdir()
    (out / "last" / STATE_JSON).write_text("{}")
    with pytest.raises(CacheMismatchError):
        ensure_cache(_adapt_config(out, first), "train", None, DistEnv())
    # So does a cache the caller named, which the run does not own.
    named = tmp_path / "named"
    ensure_cache(_adapt_config(tmp_path / "other", first), "train", named, DistEnv())
    with pytest.raises(CacheMismatchError):
        ensure_cache(_adapt_config(tmp_path / "other", second), "train", named, DistEnv())
