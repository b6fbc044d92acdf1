"""Dataset readers on small generated layouts (bad input included) and on the real files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from xrayfm.cli import main
from xrayfm.data import open_dataset
from xrayfm.data.labels import CHEXPERT_LABELS, parse_policy
from xrayfm.data.splits import split_by_patient, subsample_groups
from xrayfm.errors import DataError

HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)


def chexpert_row(patient: int, study: int, view: str, labels: dict[str, str]) -> str:
    values = [labels.get(name, "") for name in CHEXPERT_LABELS]
    kind = "frontal" if view == "Frontal" else "lateral"
    path = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/view1_{kind}.jpg"
    return ",".join([path, "Female", "60", view, "AP" if view == "Frontal" else ""] + values)


@pytest.fixture
def chexpert_root(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    rows = [
        chexpert_row(1, 1, "Frontal", {"Atelectasis": "1.0", "Edema": "-1.0", "No Finding": "0.0"}),
        chexpert_row(1, 2, "Frontal", {"Atelectasis": "-1.0", "Edema": "0.0"}),
        chexpert_row(2, 1, "Lateral", {"Atelectasis": "0.0", "Edema": "1.0"}),
        chexpert_row(3, 1, "Frontal", {"No Finding": "1.0"}),
    ]
    (root / "train.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return root


def test_chexpert_raw_labels_and_ids(chexpert_root):
    ds = open_dataset("chexpert", chexpert_root)
    a, e = CHEXPERT_LABELS.index("Atelectasis"), CHEXPERT_LABELS.index("Edema")
    np.testing.assert_array_equal(ds.raw_labels[:, a], [1, -1, 0, np.nan])
    np.testing.assert_array_equal(ds.raw_labels[:, e], [-1, 0, 1, np.nan])
    assert ds.csv["patient_id"].tolist() == ["patient00001", "patient00001", "patient00002", "patient00003"]
    assert ds.csv["study_id"].nunique() == 4
    assert ds.csv["path"][0] == str(chexpert_root / "train/patient00001/study1/view1_frontal.jpg")
    assert ds.csv["age"].tolist() == [60, 60, 60, 60]


@pytest.mark.parametrize(
    ("policy", "atelectasis", "edema"),
    [
        ("u-ones", [1, 1, 0, 0], [1, 0, 1, 0]),
        ("u-zeros", [1, 0, 0, 0], [0, 0, 1, 0]),
        ("u-ignore", [1, np.nan, 0, 0], [np.nan, 0, 1, 0]),
        ("u-ones;blank=mask", [1, 1, 0, np.nan], [1, 0, 1, np.nan]),
        ("u-zeros;Atelectasis=u-ones", [1, 1, 0, 0], [0, 0, 1, 0]),
    ],
)
def test_uncertainty_policies(chexpert_root, policy, atelectasis, edema):
    ds = open_dataset("chexpert", chexpert_root, policy=policy)
    np.testing.assert_array_equal(ds.labels[:, CHEXPERT_LABELS.index("Atelectasis")], atelectasis)
    np.testing.assert_array_equal(ds.labels[:, CHEXPERT_LABELS.index("Edema")], edema)


def test_policy_text_round_trips_and_rejects_typos():
    policy = parse_policy("u-zeros;Atelectasis=u-ones;Edema=u-ones;blank=mask", CHEXPERT_LABELS)
    assert parse_policy(policy.describe(), CHEXPERT_LABELS) == policy
    with pytest.raises(DataError, match="Atelectsis"):
        parse_policy("u-zeros;Atelectsis=u-ones", CHEXPERT_LABELS)
    with pytest.raises(DataError, match="u-twos"):
        parse_policy("u-twos")


def test_frontal_only_is_a_counted_skip(chexpert_root):
    ds = open_dataset("chexpert", chexpert_root, frontal_only=True)
    assert len(ds) == 3 and set(ds.csv["view"]) == {"Frontal"}
    assert ds.skipped.counts == {"lateral view (frontal_only)": 1}


def test_chexpert_unknown_label_value_names_line_and_kind_never_the_value(chexpert_root):
    csv = chexpert_root / "train.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace("-1.0", "2.0", 1)
    lines[3] = lines[3].replace(",1.0,", ",yes,", 1)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        open_dataset("chexpert", chexpert_root)
    message = str(err.value)  # an error may travel to an API caller: the file's bytes never do
    assert "line 3" in message and "a number not allowed" in message and "2.0" not in message.split(":", 1)[1]
    assert "line 4" in message and "not a number" in message and "yes" not in message


def test_chexpert_malformed_rows_listed(chexpert_root):
    csv = chexpert_root / "train.csv"
    lines = csv.read_text().splitlines()
    lines[2] += ",extra"
    lines[4] += ",extra,more"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"malformed CSV .*3, 5"):
        open_dataset("chexpert", chexpert_root)


def test_chexpert_missing_column_and_missing_file(chexpert_root, tmp_path):
    with pytest.raises(DataError, match="no valid.csv"):
        open_dataset("chexpert", chexpert_root, split="valid")
    csv = chexpert_root / "train.csv"
    csv.write_text(csv.read_text().replace("Edema", "Oedema", 1))
    with pytest.raises(DataError, match="Edema"):
        open_dataset("chexpert", chexpert_root)


def test_empty_split_is_an_error(chexpert_root):
    (chexpert_root / "valid.csv").write_text(HEADER + "\n")
    with pytest.raises(DataError, match="no images"):
        open_dataset("chexpert", chexpert_root, split="valid")


def test_gzipped_csv_as_root(chexpert_root, tmp_path):
    gz = tmp_path / "train.csv.gz"
    gz.write_bytes(gzip.compress((chexpert_root / "train.csv").read_bytes()))
    assert len(open_dataset("chexpert", gz)) == 4


@pytest.fixture
def mura_root(tmp_path):
    root = tmp_path / "MURA-v1.1"
    studies = {
        "train/XR_WRIST/patient00001/study1_positive/": 1,
        "train/XR_WRIST/patient00001/study2_negative/": 0,
        "train/XR_ELBOW/patient00001/study1_negative/": 0,
        "train/XR_ELBOW/patient00002/study1_positive/": 1,
    }
    images = []
    for study, n in zip(studies, (2, 1, 3, 1), strict=True):
        images += [f"MURA-v1.1/{study}image{k + 1}.png" for k in range(n)]
    (root).mkdir()
    (root / "train_image_paths.csv").write_text("\n".join(images) + "\n")
    (root / "train_labeled_studies.csv").write_text(
        "".join(f"MURA-v1.1/{s},{y}\n" for s, y in studies.items())
    )
    return root


def test_mura_image_and_study_labels(mura_root):
    ds = open_dataset("mura", mura_root)
    assert len(ds) == 7 and ds.pathologies == ["Abnormal"]
    assert ds.raw_labels[:, 0].tolist() == [1, 1, 0, 0, 0, 0, 1]
    # Same patient and study number in two body parts are two studies.
    assert ds.csv["study_id"].nunique() == 4 and ds.csv["patient_id"].nunique() == 2
    studies = ds.study_table()
    assert studies.set_index("study_id")["images"]["XR_ELBOW/patient00001/study1"] == 3
    assert ds.summary()["study_labels"] == {"positive": 2, "negative": 2}


def test_mura_body_part_filter(mura_root):
    ds = open_dataset("mura", mura_root, body_parts=["elbow"])
    assert set(ds.csv["body_part"]) == {"XR_ELBOW"} and len(ds) == 4
    assert ds.skipped.total == 3
    with pytest.raises(DataError, match="XR_KNEE"):
        open_dataset("mura", mura_root, body_parts=["XR_KNEE"])


def test_mura_label_errors(mura_root):
    studies = mura_root / "train_labeled_studies.csv"
    text = studies.read_text()
    studies.write_text(text.replace("study1_positive/,1", "study1_positive/,0", 1))
    with pytest.raises(DataError, match="disagrees with the study folder"):
        open_dataset("mura", mura_root)
    studies.write_text(text.replace(",1\n", ",abnormal\n", 1))
    with pytest.raises(DataError, match="must be 0 or 1"):
        open_dataset("mura", mura_root)
    studies.write_text("\n".join(text.splitlines()[1:]) + "\n")
    with pytest.raises(DataError, match="missing from train_labeled_studies"):
        open_dataset("mura", mura_root)


def test_nih_maps_onto_chexpert_and_masks_the_rest(tmp_path):
    root = tmp_path / "nih"
    (root / "images_001" / "images").mkdir(parents=True)
    (root / "images_001" / "images" / "00000001_000.png").write_bytes(b"")
    (root / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA\n"
        "00000001_001.png,No Finding,1,1,58,M,PA\n"
        "00000002_000.png,Mass|Nodule,0,2,81,F,AP\n"
    )
    (root / "test_list.txt").write_text("00000002_000.png\n")
    ds = open_dataset("nih", root, policy="u-ones")
    col = CHEXPERT_LABELS.index
    assert ds.raw_labels[:, col("Cardiomegaly")].tolist() == [1, 0, 0]
    assert ds.raw_labels[:, col("Pleural Effusion")].tolist() == [1, 0, 0]
    assert ds.raw_labels[:, col("No Finding")].tolist() == [0, 1, 0]
    # "Lung Opacity" is not an NIH label: masked even though blanks count as negatives.
    assert np.isnan(ds.labels[:, col("Lung Opacity")]).all()
    assert ds.csv["path"][0].endswith("images_001/images/00000001_000.png")
    assert len(open_dataset("nih", root, split="test")) == 1
    (root / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,Cardiomegally,0,1,58,M,PA\n"
    )
    with pytest.raises(DataError, match="Cardiomegally"):
        open_dataset("nih", root)


def test_folder_per_class_with_split_folders(tmp_path):
    for split, cls, name in [
        ("train", "normal", "a.png"),
        ("train", "pneumonia", "b.jpg"),
        ("train", "pneumonia", "c.dcm"),
        ("train", "pneumonia", "notes.txt"),
    ]:
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / cls / name).write_bytes(b"x")
    ds = open_dataset("folder", tmp_path, split="train")
    assert ds.pathologies == ["normal", "pneumonia"]
    assert ds.raw_labels.tolist() == [[1, 0], [0, 1], [0, 1]]
    assert ds.skipped.counts == {"not an image file (by suffix)": 1}
    with pytest.raises(DataError, match="two class"):
        open_dataset("folder", tmp_path / "train" / "normal")


def test_csv_dataset(tmp_path):
    (tmp_path / "labels.csv").write_text("path,patient,effusion,mass\nimgs/a.png,p1,1,0\n/abs/b.png,p2,-1,\n")
    ds = open_dataset("csv", tmp_path / "labels.csv", patient_column="patient", policy="u-zeros;blank=mask")
    assert ds.pathologies == ["effusion", "mass"]
    assert ds.csv["path"].tolist() == [str(tmp_path / "imgs/a.png"), "/abs/b.png"]
    np.testing.assert_array_equal(ds.labels, [[1, 0], [0, np.nan]])
    (tmp_path / "bad.csv").write_text("path,effusion\na.png,maybe\n")
    with pytest.raises(DataError, match="line 2 effusion .not a number") as err:
        open_dataset("csv", tmp_path / "bad.csv")
    assert "maybe" not in str(err.value)  # the kind of problem, never the file's bytes


def test_patient_split_never_shares_a_patient(mura_root, chexpert_root):
    ds = open_dataset("chexpert", chexpert_root)
    for seed in range(5):
        train, val = split_by_patient(ds, 0.34, seed=seed)
        assert len(train) + len(val) == len(ds)
        assert not set(ds.csv["patient_id"][train]) & set(ds.csv["patient_id"][val])
    mura = open_dataset("mura", mura_root)
    kept = subsample_groups(mura, fraction=0.5, seed=1)
    assert mura.csv["study_id"][kept].nunique() == 2
    # whole studies only: every image of a kept study is kept
    kept_studies = set(mura.csv["study_id"][kept])
    assert len(kept) == mura.csv["study_id"].isin(kept_studies).sum()


def test_cli_inspect_json(chexpert_root, capsys):
    assert main(["inspect", "chexpert", str(chexpert_root), "--policy", "u-zeros", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["patients"] == 3
    assert out["labels"]["Atelectasis"] == {"positive": 1, "negative": 1, "uncertain": 1, "blank": 1}
    assert out["targets"]["Atelectasis"] == {"positive": 1, "negative": 3, "masked": 0}


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["inspect", "mura", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: label file not found") and "Traceback" not in err


# -- real data ------------------------------------------------------------------------------------------
VALID_POSITIVES = {
    "No Finding": 38,
    "Enlarged Cardiomediastinum": 109,
    "Cardiomegaly": 68,
    "Lung Opacity": 126,
    "Lung Lesion": 1,
    "Edema": 45,
    "Consolidation": 33,
    "Pneumonia": 8,
    "Atelectasis": 80,
    "Pneumothorax": 8,
    "Pleural Effusion": 67,
    "Pleural Other": 1,
    "Fracture": 0,
    "Support Devices": 107,
}


@pytest.mark.real_data
def test_real_chexpert_valid(shared_data, capsys):
    root = shared_data / "chexpert-small-valid" / "CheXpert-v1.0-small"
    assert main(["inspect", "chexpert", str(root), "--split", "valid", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 234 and out["patients"] == 200
    assert out["views"] == {"Frontal": 202, "Lateral": 32}
    assert {k: v["positive"] for k, v in out["labels"].items()} == VALID_POSITIVES
    ds = open_dataset("chexpert", root, split="valid")
    assert all(__import__("os").path.exists(p) for p in ds.csv["path"])


@pytest.mark.real_data
def test_real_chexpert_train_csv(shared_data, capsys):
    csv = shared_data / "chexpert-train-labels" / "train.csv.gz"
    assert main(["inspect", "chexpert", str(csv), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 223_414 and out["patients"] == 64_540
    assert out["labels"]["Atelectasis"] == {
        "positive": 33376,
        "negative": 1328,
        "uncertain": 33739,
        "blank": 154971,
    }
    assert out["labels"]["Edema"] == {
        "positive": 52246,
        "negative": 20726,
        "uncertain": 12984,
        "blank": 137458,
    }
    a = CHEXPERT_LABELS.index("Atelectasis")
    expected = {
        "u-ones": (33376 + 33739, 1328 + 154971),
        "u-zeros": (33376, 1328 + 33739 + 154971),
        "u-ignore": (33376, 1328 + 154971),
    }
    ds = open_dataset("chexpert", csv)
    for policy, (pos, neg) in expected.items():
        ds._policy_spec = policy
        column = ds.labels[:, a]
        assert (column == 1).sum() == pos and (column == 0).sum() == neg, policy
    ds._policy_spec = "u-ones;blank=mask"
    assert np.isnan(ds.labels[:, a]).sum() == 154971
    assert open_dataset("chexpert", csv, frontal_only=True).csv.shape[0] == 191_027


@pytest.mark.real_data
@pytest.mark.parametrize(("split", "images", "studies"), [("train", 1133, 558), ("valid", 256, 125)])
def test_real_mura(shared_data, capsys, split, images, studies):
    root = shared_data / "mura-humerus-64" / "MURA-v1.1"
    assert main(["inspect", "mura", str(root), "--split", split, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == images and out["studies"] == studies
    labelled = (root / f"{split}_labeled_studies.csv").read_text().split()
    positives = sum(line.endswith(",1") for line in labelled)
    assert out["study_labels"] == {"positive": positives, "negative": len(labelled) - positives}


@pytest.mark.real_data
def test_real_pneumoniamnist_folder(shared_data):
    root = shared_data / "pneumoniamnist" / "png"
    ds = open_dataset("folder", root, split="val")
    assert ds.pathologies == ["normal", "pneumonia"] and len(ds) == 270


def test_errors_name_no_file_contents(tmp_path):
    """A file that is not what it should be: the error names the path and the kind of problem only."""
    secret = "SECRET_TOKEN=abc123"
    environ_like = tmp_path / "environ"
    environ_like.write_bytes(f"PATH=/usr/bin\0{secret}\0HOME=/root\n".encode())
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"path,Label\n\xff\xfe" + secret.encode() + b",1\n")
    for path in (environ_like, binary):
        with pytest.raises(DataError) as err:
            open_dataset("csv", path)
        assert str(path) in str(err.value) and secret not in str(err.value) and "abc123" not in str(err.value)
