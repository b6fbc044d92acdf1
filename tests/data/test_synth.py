"""Synthetic phantoms: real layouts, labels that follow the drawings, masks, visibility, determinism."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xrayfm.data import synth
from xrayfm.data.synth import SYNTHETIC_MARKER, synth_bone, synth_chest
from xrayfm.data.synth import bone as bone_phantoms
from xrayfm.data.synth import chest as chest_phantoms
from xrayfm.errors import DataError

# Written out by hand from the CheXpert v1.0 files (not imported), so a drift in the code is caught.
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
DRAWN = ["Cardiomegaly", "Lung Opacity", "Pleural Effusion", "Consolidation"]
SIZE = 64


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("chest") / "CheXpert-v1.0-small"
    return root, synth_chest(root, n=60, seed=7, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def bone(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bone") / "MURA-v1.1"
    return root, synth_bone(root, n=50, seed=7, size=SIZE, progress=False)


def read_chexpert(root: Path) -> pd.DataFrame:
    frames = [
        pd.read_csv(root / f"{s}.csv", dtype=str, keep_default_na=False).assign(split=s)
        for s in ("train", "valid")
    ]
    return pd.concat(frames, ignore_index=True)


def read_mask(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- chest -------------------------------------------------------------------------------------------------
def test_chest_layout_header_and_images(chest):
    root, _ = chest
    for split in ("train", "valid"):
        assert (root / f"{split}.csv").read_text().splitlines()[0] == CHEXPERT_HEADER
    df = read_chexpert(root)
    assert df.shape[1] == 19 + 1 and len(df) == 60
    pattern = re.compile(rf"^{root.name}/(train|valid)/patient\d{{5}}/study\d+/view1_frontal\.jpg$")
    assert all(pattern.match(p) for p in df["Path"]), df["Path"].head()
    assert (df["Path"].str.split("/").str[1] == df["split"]).all()
    for rel in df["Path"]:
        with Image.open(root.parent / rel) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (SIZE, SIZE))
    assert set(df["Sex"]) <= {"Male", "Female"} and df["Age"].astype(int).between(18, 100).all()
    assert set(df["Frontal/Lateral"]) == {"Frontal"} and set(df["AP/PA"]) <= {"AP", "PA"}


def test_chest_split_is_patient_level_with_repeat_studies(chest):
    root, summary = chest
    df = read_chexpert(root)
    patient = df["Path"].str.extract(r"(patient\d+)")[0]
    assert not set(patient[df["split"] == "train"]) & set(patient[df["split"] == "valid"])
    assert (patient.value_counts() > 1).any(), "some patients should have two studies"
    assert 0.1 <= (df["split"] == "valid").mean() <= 0.3
    assert summary["images"] == {
        "train": int((df["split"] == "train").sum()),
        "valid": int((df["split"] == "valid").sum()),
    }


def test_chest_label_values_follow_chexpert_conventions(chest):
    root, _ = chest
    df = read_chexpert(root)
    labels = df.columns[5:19]
    assert set(np.unique(df[labels].to_numpy())) <= {"1.0", "0.0", "-1.0", ""}
    valid = df[df["split"] == "valid"]
    # Consensus-style validation labels: no uncertain values, and the drawn findings are never blank.
    assert not (valid[labels] == "-1.0").any().any()
    assert (valid[["No Finding", *DRAWN]] != "").all().all()
    # Uncertain labels exist, on a small share of training images.
    train = df[df["split"] == "train"]
    uncertain = (train[DRAWN[:3]] == "-1.0").to_numpy()
    assert 0 < uncertain.sum() and uncertain.mean(axis=0).max() <= 0.25
    # No Finding is positive exactly when no drawn finding is positive or uncertain.
    anything = df[DRAWN].isin(["1.0", "-1.0"]).any(axis=1)
    assert ((df["No Finding"] == "1.0") == ~anything).all()
    # Each finding has a plausible prevalence.
    for name in DRAWN[:3]:
        assert 0.1 <= (df[name] == "1.0").mean() <= 0.6, name


def test_chest_masks_match_positive_labels(chest):
    root, summary = chest
    df = read_chexpert(root)
    findings = pd.read_csv(root / "findings.csv", dtype={"Path": str})
    assert list(findings.columns) == ["Path", "finding", "mask_path", "x0", "y0", "x1", "y1"]
    positives = {(p, name) for name in DRAWN for p in df.loc[df[name] == "1.0", "Path"]}
    assert set(zip(findings["Path"], findings["finding"], strict=True)) == positives
    assert len(findings) == len(positives) and len(positives) > 0
    # Consolidation is a kind of Lung Opacity.
    consolidation = set(findings.loc[findings["finding"] == "Consolidation", "Path"])
    assert consolidation <= set(findings.loc[findings["finding"] == "Lung Opacity", "Path"])
    for row in findings.itertuples():
        mask = read_mask(root, row.mask_path)
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        assert (row.x0, row.y0, row.x1, row.y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # No stray masks: negatives and uncertain findings have none.
    assert len(list((root / "masks").rglob("*.png"))) == len(findings)
    counted = sum(sum(v.values()) for v in summary["masks"].values())
    assert counted == len(findings)


def test_chest_findings_are_visible_against_normal_images(chest):
    """Inside a finding's mask, the image is brighter than the same region of the No Finding images."""
    root, _ = chest
    df = read_chexpert(root)
    findings = pd.read_csv(root / "findings.csv")
    normals = np.stack(
        [np.asarray(Image.open(root.parent / p), float) for p in df.loc[df["No Finding"] == "1.0", "Path"]]
    )
    assert len(normals) >= 5
    for name in ("Cardiomegaly", "Lung Opacity", "Pleural Effusion"):
        rows = findings[findings["finding"] == name]
        assert len(rows) >= 3, name
        diffs = []
        for row in rows.itertuples():
            mask = read_mask(root, row.mask_path) > 0
            image = np.asarray(Image.open(root.parent / row.Path), float)
            diffs.append(image[mask].mean() - normals[:, mask].mean())
        assert np.median(diffs) > 10 and np.mean(np.array(diffs) > 0) >= 0.7, (name, np.round(diffs, 1))


@pytest.mark.parametrize("finding", ["Cardiomegaly", "Lung Opacity", "Pleural Effusion"])
def test_chest_finding_changes_only_its_mask(finding):
    """The same phantom with and without one finding differs inside that finding's mask, hardly elsewhere."""
    field = {"Cardiomegaly": "cardiomegaly", "Lung Opacity": "opacity", "Pleural Effusion": "effusion"}[
        finding
    ]
    for k in range(3):
        rng = np.random.default_rng(k)
        anatomy = chest_phantoms.chest_anatomy(rng, female=k % 2 == 0)
        with_all = replace(
            chest_phantoms.chest_findings(rng), cardiomegaly="present", ctr=0.6, effusion="present",
            opacity="present", opacity_radius=0.15, opacity_amp=0.2,
        )  # fmt: skip
        without = replace(
            with_all, **{field: "absent"}, **({"ctr": 0.42} if finding == "Cardiomegaly" else {})
        )
        img, masks = chest_phantoms.render_chest(anatomy, with_all, SIZE, (3, 1, k))
        ref, ref_masks = chest_phantoms.render_chest(anatomy, without, SIZE, (3, 1, k))
        assert finding in masks and finding not in ref_masks
        diff, mask = img.astype(float) - ref, masks[finding]
        assert diff[mask].mean() > 8
        assert np.abs(diff[~mask]).mean() < diff[mask].mean() / 3


# -- bone --------------------------------------------------------------------------------------------------
def read_mura(root: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    images = pd.read_csv(root / f"{split}_image_paths.csv", header=None, dtype=str)
    studies = pd.read_csv(root / f"{split}_labeled_studies.csv", header=None, dtype=str)
    return images, studies


def test_bone_layout_has_no_headers_and_real_paths(bone):
    root, summary = bone
    image_re = re.compile(
        rf"^{root.name}/(train|valid)/XR_(FOREARM|HUMERUS)/patient\d{{5}}/study\d+_(positive|negative)/image\d\.png$"
    )
    shapes, total = set(), 0
    for split in ("train", "valid"):
        for name in (f"{split}_image_paths.csv", f"{split}_labeled_studies.csv"):
            assert (root / name).read_text().startswith(f"{root.name}/{split}/XR_")
        images, studies = read_mura(root, split)
        assert images.shape[1] == 1 and studies.shape[1] == 2
        assert all(image_re.match(p) for p in images[0]), images[0].head()
        assert studies[0].str.endswith("/").all()
        total += len(images)
        assert summary["images"][split] == len(images)
        for rel in images[0]:
            with Image.open(root.parent / rel) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size[0] == SIZE
                shapes.add(im.size)
    assert total == 50
    assert (SIZE, SIZE) in shapes and (SIZE, int(SIZE * 1.3)) in shapes  # square and portrait, like MURA


def test_bone_study_labels_agree_with_folders(bone):
    root, summary = bone
    patients = {}
    for split in ("train", "valid"):
        images, studies = read_mura(root, split)
        folder_positive = studies[0].str.rstrip("/").str.endswith("_positive")
        assert (folder_positive == (studies[1] == "1")).all()
        assert set(studies[1]) <= {"0", "1"}
        per_study = images[0].str.rsplit("/", n=1).str[0] + "/"
        assert set(per_study) == set(studies[0])
        assert per_study.value_counts().between(1, 3).all()
        assert summary["studies"][split]["positive"] == int(folder_positive.sum())
        patients[split] = set(images[0].str.extract(r"(patient\d+)")[0])
    assert not patients["train"] & patients["valid"]
    positive_share = sum(s["positive"] for s in summary["studies"].values()) / sum(
        s["positive"] + s["negative"] for s in summary["studies"].values()
    )
    assert 0.2 <= positive_share <= 0.75


def test_bone_masks_only_in_abnormal_studies(bone):
    root, _ = bone
    findings = pd.read_csv(root / "findings.csv")
    assert list(findings.columns) == ["Path", "finding", "mask_path", "x0", "y0", "x1", "y1"]
    assert set(findings["finding"]) <= {"Fracture", "Lesion"}
    found_studies = set(findings["Path"].str.rsplit("/", n=1).str[0] + "/")
    positive_studies = set()
    for split in ("train", "valid"):
        _, studies = read_mura(root, split)
        positive_studies |= set(studies.loc[studies[1] == "1", 0])
    assert (
        found_studies == positive_studies
    )  # every abnormal study shows its finding somewhere; normals never
    for row in findings.itertuples():
        mask = read_mask(root, row.mask_path)
        with Image.open(root.parent / row.Path) as im:
            assert mask.shape == (im.size[1], im.size[0])
        assert set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        assert (row.x0, row.y0, row.x1, row.y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert len(list((root / "masks").rglob("*.png"))) == len(findings)


@pytest.mark.parametrize("kind", ["Fracture", "Lesion"])
def test_bone_finding_darkens_the_bone_inside_its_mask(kind):
    seen = 0
    for k in range(40):
        rng = np.random.default_rng(k)
        anatomy = bone_phantoms.bone_anatomy(rng, synth.BONE_PARTS[k % 2])
        view = bone_phantoms.bone_view(rng, SIZE)
        finding = bone_phantoms.bone_finding(rng)
        if finding.kind != kind:
            continue
        img, mask = bone_phantoms.render_bone(anatomy, view, finding, SIZE, (3, 2, k))
        ref, no_mask = bone_phantoms.render_bone(anatomy, view, None, SIZE, (3, 2, k))
        assert no_mask is None
        if mask is None or mask.sum() < 4:  # off the image in this view: the generator would not label it
            continue
        diff = img.astype(float) - ref
        assert diff[mask].mean() < -3, (k, diff[mask].mean())
        assert np.abs(diff[~mask]).mean() < 3
        seen += 1
    assert seen >= 5


# -- both ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [synth_chest, synth_bone])
def test_same_seed_same_bytes_other_seed_other_images(tmp_path, make):
    a = all_files(Path(make(tmp_path / "a" / "DS", n=8, seed=3, size=48, progress=False)["root"]))
    b = all_files(Path(make(tmp_path / "b" / "DS", n=8, seed=3, size=48, progress=False)["root"]))
    assert a == b
    c = all_files(Path(make(tmp_path / "c" / "DS", n=8, seed=4, size=48, progress=False)["root"]))
    images = [k for k in a if k.endswith((".jpg", ".png")) and not k.startswith("masks")]
    assert images
    same = [k for k in images if k in c and c[k] == a[k]]
    assert not same


@pytest.mark.parametrize("make", [synth_chest, synth_bone])
def test_marker_says_synthetic(tmp_path, make):
    root = Path(make(tmp_path / "DS", n=6, seed=11, size=32, progress=False)["root"])
    text = (root / SYNTHETIC_MARKER).read_text()
    assert "synthetic" in text.lower() and "not medical data" in text
    assert "seed: 11" in text and "n (images): 6" in text and "size: 32" in text
    assert f"generator version: {synth.GENERATOR_VERSION}" in text


def test_rerun_replaces_an_earlier_synthetic_root(tmp_path):
    root = tmp_path / "DS"
    synth_bone(root, n=12, seed=1, size=32, progress=False)
    synth_bone(root, n=5, seed=1, size=32, progress=False)
    assert len(list(root.rglob("image*.png"))) - len(list((root / "masks").rglob("*.png"))) == 5
    listed = sum(len(read_mura(root, s)[0]) for s in ("train", "valid"))
    assert listed == 5


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        synth_chest(tmp_path, n=4, size=32, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be"),
        ({"n": 1}, "at least 2"),
        ({"size": 8}, "size must be"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        synth_chest(tmp_path / "DS", **{"n": 4, "size": 32, "progress": False, **kwargs})
    assert not (tmp_path / "DS").exists()


def test_valid_fraction_zero_leaves_valid_empty_but_parseable(tmp_path):
    root = Path(synth_chest(tmp_path / "DS", n=5, valid_fraction=0.0, size=32, progress=False)["root"])
    assert len(pd.read_csv(root / "train.csv")) == 5 and len(pd.read_csv(root / "valid.csv")) == 0


def test_the_project_readers_open_the_phantoms(chest, bone):
    from xrayfm.data.chexpert import CheXpert
    from xrayfm.data.mura import MURA

    ds = CheXpert(chest[0], split="valid")
    assert ds.synthetic and len(ds) == chest[1]["images"]["valid"] and ds[0]["image"].shape == (SIZE, SIZE)
    mura = MURA(bone[0], split="train")
    assert mura.synthetic and len(mura) == bone[1]["images"]["train"]


# -- against the real files ----------------------------------------------------------------------------------
def line_shape(line: str) -> str:
    """A CSV line with its variable parts (numbers, body part, study label, extension) masked out."""
    line = re.sub(r"XR_[A-Z]+", "XR_PART", line)
    line = re.sub(r"_(positive|negative)/", "_LABEL/", line)
    line = re.sub(r",[01]$", ",L", line)
    return re.sub(r"\d+", "N", line).replace(".jpg", ".EXT").replace(".png", ".EXT")


@pytest.mark.real_data
def test_layouts_match_the_real_datasets(shared_data, chest, bone):
    real_chexpert = shared_data / "chexpert-small-valid" / "CheXpert-v1.0-small" / "valid.csv"
    assert real_chexpert.read_text().splitlines()[0] == (chest[0] / "valid.csv").read_text().splitlines()[0]
    real_mura = shared_data / "mura-humerus-64" / "MURA-v1.1"
    for name in (
        "train_image_paths.csv",
        "valid_image_paths.csv",
        "train_labeled_studies.csv",
        "valid_labeled_studies.csv",
    ):
        real = {line_shape(line) for line in real_mura.joinpath(name).read_text().splitlines()}
        ours = {line_shape(line) for line in bone[0].joinpath(name).read_text().splitlines()}
        assert len(ours) == 1 and ours <= real, (name, real, ours)  # real MURA also has a few image1_dup1
