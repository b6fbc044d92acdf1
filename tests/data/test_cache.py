"""Preprocessing cache: exact pixels, no-op reruns, resume, staleness, skips, load-time policies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xrayfm.data.base import XrayDataset
from xrayfm.data.cache import FILES, prepare_cache, verify_cache
from xrayfm.data.cache import build as cache_mod
from xrayfm.data.images import read_image_resized
from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.data.transforms import build_transform
from xrayfm.errors import CacheMismatchError, DataError

SIZE = 32
PATHOLOGIES = ["Atelectasis", "Edema", "Fracture"]


class TinySet(XrayDataset):
    """A dataset over explicit files and labels (readers are tested elsewhere)."""

    kind = "tiny"
    pathologies = PATHOLOGIES

    def __init__(self, root: Path, paths: list[Path], raw: np.ndarray) -> None:
        super().__init__(root, "train")
        self.csv = pd.DataFrame(
            {
                "path": [str(p) for p in paths],
                "patient_id": [f"p{i // 2:03d}" for i in range(len(paths))],
                "study_id": [f"p{i // 2:03d}/s{i % 2}" for i in range(len(paths))],
                "view": ["frontal" if i % 3 else "lateral" for i in range(len(paths))],
            }
        )
        self.raw_labels = raw
        self._finish()


def _radiograph(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Structured grey content (gradient + blobs + noise), so that resizing errors would show."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 60 + 100 * yy / height + 40 * np.sin(xx / max(3, width / 6))
    for _ in range(3):
        cy, cx, r = (
            rng.uniform(0, height),
            rng.uniform(0, width),
            rng.uniform(3, max(4, min(height, width) / 3)),
        )
        img += 70 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_images(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(48, 40), (40, 60), (90, 30), (36, 36), (30, 100), (64, 50)]  # tall, wide and square
    paths = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        path = folder / (f"img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg")
        Image.fromarray(_radiograph(rng, h, w)).save(path, quality=90)
        paths.append(path)
    return paths


def _raw_labels(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.choice(np.array([1.0, 0.0, -1.0, np.nan], dtype=np.float32), size=(n, len(PATHOLOGIES)))
    raw[0] = [-1.0, np.nan, 1.0]  # make sure uncertain and blank occur
    return raw


@pytest.fixture
def tiny(tmp_path: Path) -> TinySet:
    paths = _write_images(tmp_path / "src")
    return TinySet(tmp_path / "src", paths, _raw_labels(len(paths)))


def _build(dataset: XrayDataset, out: Path, **kwargs) -> dict:
    kwargs = {"size": SIZE, "workers": 1, "progress": False, "chunk": 4} | kwargs
    return prepare_cache(dataset, out, **kwargs)


def _images(out: Path) -> np.ndarray:
    manifest = json.loads((out / FILES["manifest"]).read_text())
    return np.array(
        np.memmap(out / FILES["images"], dtype=np.uint8, mode="r", shape=tuple(manifest["shape"]))
    )


# -- building ---------------------------------------------------------------------------------------
def test_cache_equals_direct_read_with_a_process_pool(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    summary = _build(tiny, out, workers=2)
    n = len(tiny)
    assert summary["images"] == n and summary["usable"] == n and summary["written"] == n
    assert summary["skipped"]["total"] == 0 and summary["no_op"] is False
    images = _images(out)
    assert images.shape == (n, SIZE, SIZE) and images.dtype == np.uint8
    for i, path in enumerate(tiny.csv["path"]):
        np.testing.assert_array_equal(images[i], read_image_resized(path, SIZE, mode="pad"), err_msg=path)
    assert np.load(out / FILES["done"]).all()

    manifest = json.loads((out / FILES["manifest"]).read_text())
    assert manifest["complete"] and manifest["size"] == SIZE and manifest["mode"] == "pad"
    assert manifest["kind"] == "tiny" and manifest["pathologies"] == PATHOLOGIES
    assert manifest["counts"] == {"ok": n, "missing": 0, "unreadable": 0}
    index = pd.read_csv(out / FILES["index"])
    assert list(index["path"]) == list(tiny.csv["path"])
    assert {"patient_id", "study_id", "view", "src_size", "src_mtime_ns", "status", *PATHOLOGIES} <= set(
        index
    )
    assert (index["status"] == "ok").all()
    assert list(index["src_size"]) == [os.stat(p).st_size for p in tiny.csv["path"]]
    np.testing.assert_array_equal(index[PATHOLOGIES].to_numpy(np.float32), tiny.raw_labels)  # raw, NaN kept


def test_cached_dataset_items(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    ds = CachedDataset(out)
    assert len(ds) == len(tiny) and ds.pathologies == PATHOLOGIES
    item = ds[5]
    assert item["index"] == 5 and item["image"].shape == (1, SIZE, SIZE)
    expected = read_image_resized(tiny.csv.at[5, "path"], SIZE).astype(np.float32) / 255
    np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
    assert list(ds.csv["path"]) == list(tiny.csv["path"]) and (ds.csv["status"] == "ok").all()
    assert item["labels"].dtype == item["mask"].dtype == torch.float32
    assert item["labels"].shape == item["mask"].shape == (len(PATHOLOGIES),)

    with_tf = CachedDataset(out, transform=build_transform(False, SIZE, channels=3))
    assert with_tf[0]["image"].shape == (3, SIZE, SIZE)
    ds.images  # noqa: B018 - open the memmap, then check it would not travel to DataLoader workers
    assert ds.__getstate__()["_images"] is None


def test_pad_keeps_tall_images_whole(tmp_path: Path) -> None:
    tall = np.full((120, 30), 100, dtype=np.uint8)
    tall[:12] = 255  # bright bands at the very top and bottom: cropping would lose them
    tall[-12:] = 250
    path = tmp_path / "src" / "tall.png"
    path.parent.mkdir()
    Image.fromarray(tall).save(path)
    ds = TinySet(tmp_path / "src", [path], np.zeros((1, 3), np.float32))

    _build(ds, tmp_path / "pad", mode="pad")
    padded = _images(tmp_path / "pad")[0]
    assert padded[0, SIZE // 2] > 200 and padded[-1, SIZE // 2] > 200  # both ends kept
    assert padded[:, 0].max() == 0 and padded[:, -1].max() == 0  # letterboxed at the sides
    _build(ds, tmp_path / "crop", mode="crop")
    cropped = _images(tmp_path / "crop")[0]
    assert cropped[0, SIZE // 2] < 150 and cropped[:, 0].min() > 50  # crop cut the ends, no side bars


# -- reruns ------------------------------------------------------------------------------------------
def test_second_run_is_a_no_op(tiny: TinySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    before = {name: (out / name).stat().st_mtime_ns for name in ("images.u8", "index.csv", "manifest.json")}

    def must_not_decode(*args, **kwargs):
        raise AssertionError("a no-op run decoded an image")

    monkeypatch.setattr(cache_mod, "read_image_resized", must_not_decode)
    summary = _build(tiny, out)
    assert summary["no_op"] is True and summary["written"] == 0 and summary["usable"] == len(tiny)
    assert before == {name: (out / name).stat().st_mtime_ns for name in before}


def test_resume_after_an_interrupted_run(
    tiny: TinySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def dies_in_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # chunk=4: the first chunk finished, the second is half written
            raise KeyboardInterrupt
        return read_image_resized(*args, **kwargs)

    out = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "read_image_resized", dies_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny, out)
    done = np.load(out / FILES["done"])
    assert done.sum() == 4 and done[:4].all()
    assert json.loads((out / FILES["manifest"]).read_text())["complete"] is False
    with pytest.raises(DataError, match="incomplete"):
        CachedDataset(out)

    monkeypatch.setattr(cache_mod, "read_image_resized", read_image_resized)
    summary = _build(tiny, out)
    assert summary["resumed"] is True and summary["written"] == len(tiny) - 4

    clean = tmp_path / "clean"
    _build(tiny, clean)
    np.testing.assert_array_equal(_images(out), _images(clean))
    pd.testing.assert_frame_equal(pd.read_csv(out / FILES["index"]), pd.read_csv(clean / FILES["index"]))


def test_changed_source_is_refused_until_force(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    victim = Path(tiny.csv.at[3, "path"])
    Image.fromarray(np.full((36, 36), 7, np.uint8)).save(
        victim, format="PNG" if victim.suffix == ".png" else "JPEG"
    )
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # coarse-mtime filesystems too

    assert verify_cache(out) == [str(victim)]
    with pytest.raises(CacheMismatchError, match=victim.name) as err:
        _build(tiny, out)
    assert "force=True" in str(err.value)
    with pytest.raises(CacheMismatchError, match=victim.name):
        CachedDataset(out)
    assert len(CachedDataset(out, verify="none")) == len(tiny)  # explicit opt-out still loads

    summary = _build(tiny, out, force=True)
    assert summary["written"] == len(tiny)
    np.testing.assert_array_equal(_images(out)[3], read_image_resized(victim, SIZE))
    assert verify_cache(out) == [] and len(CachedDataset(out)) == len(tiny)


def test_touched_source_is_detected_by_stat_only(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    victim = Path(tiny.csv.at[0, "path"])
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert verify_cache(out, mode="stat") == [str(victim)]
    assert verify_cache(out, mode="size") == []
    with pytest.raises(CacheMismatchError, match=victim.name):
        _build(tiny, out)


def test_other_settings_are_refused(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    with pytest.raises(CacheMismatchError, match="size"):
        _build(tiny, out, size=SIZE * 2)
    with pytest.raises(CacheMismatchError, match="mode"):
        _build(tiny, out, mode="crop")
    summary = _build(tiny, out, mode="crop", force=True)
    assert summary["written"] == len(tiny)
    assert json.loads((out / FILES["manifest"]).read_text())["mode"] == "crop"


def test_new_labels_update_the_index_without_decoding(
    tiny: TinySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    monkeypatch.setattr(cache_mod, "read_image_resized", lambda *a, **k: pytest.fail("decoded again"))
    tiny.raw_labels = np.ascontiguousarray(tiny.raw_labels[::-1])  # relabelled source, same images
    summary = _build(tiny, out)
    assert summary["index_updated"] is True and summary["written"] == 0
    np.testing.assert_array_equal(CachedDataset(out).raw_labels, tiny.raw_labels)


# -- skipped images ------------------------------------------------------------------------------------
def _with_bad_files(tmp_path: Path) -> tuple[TinySet, Path, Path]:
    paths = _write_images(tmp_path / "src", n=8)
    missing = tmp_path / "src" / "gone.jpg"
    corrupt = tmp_path / "src" / "corrupt.jpg"
    corrupt.write_bytes(paths[0].read_bytes()[:300])  # a JPEG cut short
    paths = paths[:3] + [missing] + paths[3:6] + [corrupt] + paths[6:]
    return TinySet(tmp_path / "src", paths, _raw_labels(len(paths))), missing, corrupt


def test_missing_and_corrupt_images_are_skipped_and_reported(tmp_path: Path) -> None:
    ds, missing, corrupt = _with_bad_files(tmp_path)
    out = tmp_path / "cache"
    summary = _build(ds, out)
    assert summary["usable"] == len(ds) - 2
    assert summary["skipped"]["counts"] == {"missing": 1, "unreadable": 1}
    assert str(missing) in summary["skipped"]["examples"]["missing"][0]
    assert str(corrupt) in summary["skipped"]["examples"]["unreadable"][0]
    index = pd.read_csv(out / FILES["index"])
    assert index.set_index("path").loc[[str(missing), str(corrupt)], "status"].tolist() == [
        "missing",
        "unreadable",
    ]

    cached = CachedDataset(out)
    assert len(cached) == len(ds) - 2
    assert str(missing) not in set(cached.csv["path"]) and str(corrupt) not in set(cached.csv["path"])
    assert cached.excluded == {"missing": 1, "unreadable": 1}
    keep = [i for i, p in enumerate(ds.csv["path"]) if p not in (str(missing), str(corrupt))]
    np.testing.assert_array_equal(cached.raw_labels, ds.raw_labels[keep])  # labels stay aligned
    np.testing.assert_array_equal(cached.csv["cache_row"], keep)
    assert _build(ds, out)["no_op"] is True  # skips are remembered, not retried


def test_skips_survive_an_interrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, missing, corrupt = _with_bad_files(tmp_path)  # the corrupt file is decoded in the second chunk
    calls = {"n": 0}

    def dies_in_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return read_image_resized(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "read_image_resized", dies_in_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        _build(ds, tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "read_image_resized", read_image_resized)
    summary = _build(ds, tmp_path / "cache")
    assert summary["resumed"] is True and summary["written"] < len(ds) - 2
    assert summary["skipped"]["counts"] == {"missing": 1, "unreadable": 1}
    assert str(corrupt) not in set(CachedDataset(tmp_path / "cache").csv["path"])


def test_strict_raises_naming_the_bad_images(tmp_path: Path) -> None:
    ds, missing, corrupt = _with_bad_files(tmp_path)
    with pytest.raises(DataError, match=missing.name):
        _build(ds, tmp_path / "a", strict=True)
    present = (ds.csv["path"] != str(missing)).to_numpy()
    ds.csv, ds.raw_labels = ds.csv[present].reset_index(drop=True), ds.raw_labels[present]
    with pytest.raises(DataError, match=corrupt.name):
        _build(ds, tmp_path / "b", strict=True)


def test_no_usable_image_is_an_error(tmp_path: Path) -> None:
    ds = TinySet(tmp_path, [tmp_path / "a.jpg", tmp_path / "b.png"], np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match="no usable images"):
        _build(ds, tmp_path / "cache")


# -- labels at load time ---------------------------------------------------------------------------------
def test_policy_is_chosen_when_loading(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    raw = tiny.raw_labels
    ones, zeros = CachedDataset(out, policy="u-ones"), CachedDataset(out, policy="u-zeros")
    uncertain = raw == -1
    assert uncertain.any()
    np.testing.assert_array_equal(ones.labels[uncertain], 1.0)
    np.testing.assert_array_equal(zeros.labels[uncertain], 0.0)
    np.testing.assert_array_equal(ones.labels[~uncertain], zeros.labels[~uncertain])
    np.testing.assert_array_equal(ones.raw_labels, raw)  # NaN positions equal too

    masked = CachedDataset(out, policy="u-ignore;blank=mask")
    unobserved = np.isnan(raw) | uncertain
    for i in range(len(masked)):
        item = masked[i]
        np.testing.assert_array_equal(item["mask"].numpy(), (~unobserved[i]).astype(np.float32))
        assert not item["labels"].isnan().any()
        np.testing.assert_array_equal(item["labels"].numpy()[~unobserved[i]], raw[i][~unobserved[i]])


def test_indices_select_cache_rows(tiny: TinySet, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build(tiny, out)
    rows = [7, 2, 9]
    ds = CachedDataset(out, indices=rows)
    assert len(ds) == 3 and list(ds.csv["cache_row"]) == rows
    np.testing.assert_array_equal(ds.raw_labels, tiny.raw_labels[rows])
    np.testing.assert_allclose(ds[1]["image"][0].numpy() * 255, _images(out)[2].astype(np.float32), atol=1e-3)
    with pytest.raises(DataError, match="indices"):
        CachedDataset(out, indices=[len(tiny)])


# -- real data ----------------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_chexpert_valid_subset(shared_data: Path, tmp_path: Path) -> None:
    from xrayfm.data.chexpert import CheXpert

    ds = CheXpert(shared_data / "chexpert-small-valid" / "CheXpert-v1.0-small", split="valid")
    keep = slice(0, 12)
    sub = TinySet.__new__(TinySet)
    XrayDataset.__init__(sub, ds.root, "valid")
    sub.kind, sub.pathologies = ds.kind, ds.pathologies
    sub.csv, sub.raw_labels = ds.csv.iloc[keep].reset_index(drop=True), ds.raw_labels[keep]
    out = tmp_path / "cache"
    summary = _build(sub, out, size=64)
    assert summary["usable"] == 12
    cached = CachedDataset(out)
    for i in (0, 11):
        expected = read_image_resized(sub.csv.at[i, "path"], 64).astype(np.float32) / 255
        np.testing.assert_allclose(cached[i]["image"][0].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(cached.raw_labels, sub.raw_labels)
