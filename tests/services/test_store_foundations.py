"""The model store keeps a LoRA adapter's foundation once, by content (``foundations/<sha256>/``), still
loads versions stored the old way (a copied ``<name>-foundation`` version), and its garbage collector
removes unreferenced foundations and stale leftovers, never a version nor what a publish is about to use.
Real files in tmp dirs, tiny ViTs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests import helpers
from xrayfm import audit
from xrayfm.errors import XrayfmError
from xrayfm.models.checkpoint import load_any
from xrayfm.utils import sha256_folder
from xrayfm_stack import store as model_store
from xrayfm_training import publish

REPO = Path(__file__).resolve().parents[2]


def make_tiny_checkpoint(folder: Path, labels: tuple[str, ...] = ("Abnormal",)) -> Path:
    """A tiny 2-block ViT at 64 px (tests/helpers.py)."""
    return helpers.make_tiny_checkpoint(folder, list(labels), 64)


@pytest.fixture(autouse=True)
def no_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is under test here, not the ONNX export (tests/services/test_onnx_serving.py)."""
    monkeypatch.setattr(publish, "_graphs", lambda *_a, **_k: {"error": "not exported in this test"})


def make_adapter(folder: Path, foundation: Path, seed: int) -> Path:
    """A LoRA adapter on `foundation` with random, non-zero B matrices (so it changes the outputs)."""
    from xrayfm.models.checkpoint import load_checkpoint, save_adapted
    from xrayfm.models.lora import LoraSettings, apply_lora

    base, meta = load_checkpoint(foundation)
    peft_model = apply_lora(base, LoraSettings(rank=4, alpha=8, dropout=0.0, targets=("qkv",)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "weights")}
    return save_adapted(folder, peft_model, {**meta, "foundation": str(foundation), "method": "lora"})


def outputs(folder: Path) -> torch.Tensor:
    model, _ = load_any(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 3, 64, 64))


def blobs(store: Path) -> list[str]:
    root = store / model_store.FOUNDATIONS_DIR
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.rglob(".*") if p.name != model_store.LOCK_FILE)


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Path]:
    """A foundation outside the store and two adapters trained on it (two LoRA jobs' best/ folders)."""
    foundation = make_tiny_checkpoint(tmp_path / "runs/pretrain/best")
    return {
        "foundation": foundation,
        "a": make_adapter(tmp_path / "runs/job-a/best", foundation, seed=1),
        "b": make_adapter(tmp_path / "runs/job-b/best", foundation, seed=2),
    }


def test_two_lora_publishes_store_their_foundation_once_and_load(tmp_path: Path, runs) -> None:
    store = tmp_path / "store"
    expected = {key: outputs(runs[key]) for key in ("a", "b")}
    sha = sha256_folder(runs["foundation"])
    for key in ("a", "b"):
        publish.publish_run(store, f"bone-{key}", runs[key], f"job-{key}", "adapt")

    assert blobs(store) == [sha]  # one copy, named by its content
    assert sha256_folder(store / "foundations" / sha) == sha
    assert sorted(p.name for p in (store / "models").iterdir()) == ["bone-a", "bone-b"]  # no *-foundation
    assert leftovers(store) == []  # staging folders gone
    rows = {row["name"]: row for row in model_store.list_versions(store)}
    for key in ("a", "b"):
        folder = store / f"models/bone-{key}/1"
        lineage = rows[f"bone-{key}"]["lineage"]["foundation"]
        assert lineage["form"] == "blob" and lineage["folder_sha256"] == sha
        assert (
            lineage["sha256"]
            == json.loads((runs["foundation"] / "meta.json").read_text())["weights"]["sha256"]
        )
        assert (
            json.loads((folder / "meta.json").read_text())["foundation"]["path"]
            == f"../../../foundations/{sha}"
        )
        assert not (folder / "model.safetensors").exists()  # the adapter alone
    assert model_store.referenced_foundations(store) == {sha: ["bone-a/1", "bone-b/1"]}

    shutil.rmtree(runs["foundation"])  # the store alone now: the adapters load and predict as before
    shutil.copytree(store, tmp_path / "moved")  # and from a copy of the store elsewhere
    for key in ("a", "b"):
        torch.testing.assert_close(outputs(store / f"models/bone-{key}/1"), expected[key])
        torch.testing.assert_close(outputs(tmp_path / f"moved/models/bone-{key}/1"), expected[key])


def test_a_foundation_that_is_a_store_version_is_referenced_not_copied(tmp_path: Path) -> None:
    store = tmp_path / "store"
    version = model_store.add_version(
        store, "chest-fm", make_tiny_checkpoint(tmp_path / "fm"), {"job_id": "p"}
    )
    foundation = model_store.version_dir(store, "chest-fm", version)
    adapter = make_adapter(tmp_path / "runs/a/best", foundation, seed=3)
    publish.publish_run(store, "bone", adapter, "job-a", "adapt")
    assert blobs(store) == []
    info = json.loads((store / "models/bone/1/version.json").read_text())
    assert info["lineage"]["foundation"] == {
        "form": "version", "name": "chest-fm", "version": "1",
        "sha256": json.loads((foundation / "meta.json").read_text())["weights"]["sha256"],
    }  # fmt: skip
    torch.testing.assert_close(outputs(store / "models/bone/1"), outputs(adapter))


def old_style_store(tmp_path: Path, runs: dict[str, Path]) -> Path:
    """A store as publishes wrote it before foundations were stored by content: the foundation copied in
    as the version ``bone-foundation/1`` and the adapter pointing at it."""
    store = tmp_path / "old-store"
    model_store.add_version(
        store, "bone-foundation", runs["foundation"], {"job_id": "job-a", "kind": "foundation"}
    )
    staged = tmp_path / "staged"
    shutil.copytree(runs["a"], staged)
    meta = json.loads((staged / "meta.json").read_text())
    meta["foundation"] = {**meta["foundation"], "path": "../../bone-foundation/1"}
    (staged / "meta.json").write_text(json.dumps(meta))
    lineage = {
        "foundation": {"name": "bone-foundation", "version": "1", "sha256": meta["foundation"]["sha256"]}
    }
    model_store.add_version(store, "bone", staged, {"job_id": "job-a", "kind": "adapt", "lineage": lineage})
    return store


def test_an_old_style_store_still_loads_and_gc_keeps_it(tmp_path: Path, runs) -> None:
    expected = outputs(runs["a"])
    store = old_style_store(tmp_path, runs)
    shutil.rmtree(runs["foundation"])
    torch.testing.assert_close(outputs(store / "models/bone/1"), expected)
    report = model_store.gc(store, grace_s=0)
    assert report["removed"] == [] and report["kept"] == {}
    assert sorted(str(p.relative_to(store)) for p in (store / "models").glob("*/*")) == [
        "models/bone-foundation/1",
        "models/bone/1",
    ]
    torch.testing.assert_close(outputs(store / "models/bone/1"), expected)


def test_gc_removes_an_unreferenced_blob_and_stale_leftovers_only(tmp_path: Path, runs) -> None:
    store = tmp_path / "store"
    publish.publish_run(store, "bone", runs["a"], "job-a", "adapt")
    [used] = blobs(store)
    other = make_tiny_checkpoint(tmp_path / "other-fm", labels=("X", "Y"))
    unused = sha256_folder(other)
    shutil.copytree(other, store / "foundations" / unused)  # e.g. left by a version deleted by hand
    hour_ago = time.time() - 3600
    stale = [
        store / "models/bone/.incoming-dead",
        store / "foundations/.incoming-dead",
        store / ".publish-dead",
    ]
    for path in stale:
        (path / "v").mkdir(parents=True)
        (path / "v/weights.bin").write_bytes(b"x" * 1000)
        for inner in (path / "v/weights.bin", path / "v", path):
            os.utime(inner, (hour_ago, hour_ago))
    stale_file = store / ".serving.json.abc123.tmp"  # an interrupted atomic write
    stale_file.write_text("{")
    os.utime(stale_file, (hour_ago, hour_ago))
    fresh = store / "models/bone/.incoming-now"  # a publish writing right now
    (fresh / "v").mkdir(parents=True)

    dry = model_store.gc(store, dry_run=True, grace_s=600)
    expected = sorted([f"foundations/{unused}"] + [str(p.relative_to(store)) for p in [*stale, stale_file]])
    assert sorted(item["path"] for item in dry["removed"]) == expected
    assert dry["freed_bytes"] >= 3000 and dry["kept"] == {used: ["bone/1"]}
    assert (store / "foundations" / unused).is_dir() and all(p.exists() for p in stale)  # dry: nothing gone

    report = model_store.gc(store, grace_s=600)
    assert sorted(item["path"] for item in report["removed"]) == expected
    assert blobs(store) == [used] and not any(p.exists() for p in [*stale, stale_file])
    assert fresh.is_dir() and (store / "models/bone/1").is_dir()
    assert leftovers(store) == [".incoming-now"]
    torch.testing.assert_close(outputs(store / "models/bone/1"), outputs(runs["a"]))


def test_gc_refuses_a_store_whose_version_it_cannot_read(tmp_path: Path, runs) -> None:
    store = tmp_path / "store"
    publish.publish_run(store, "bone", runs["a"], "job-a", "adapt")
    (store / "models/bone/1/meta.json").write_text("{broken")
    with pytest.raises(XrayfmError, match="not valid JSON"):
        model_store.gc(store, grace_s=0)
    assert len(blobs(store)) == 1


def test_gc_during_a_publish_keeps_the_blob_it_is_about_to_reference(
    tmp_path: Path, runs, monkeypatch
) -> None:
    """A publish paused between staging its foundation and committing its version (another thread);
    gc runs meanwhile. The foundation is already in the store but unreferenced (a leftover), the worst
    case: only the publish's pin keeps gc from removing it."""
    store = tmp_path / "store"
    sha = sha256_folder(runs["foundation"])
    shutil.copytree(runs["foundation"], store / "foundations" / sha)
    staged, release = threading.Event(), threading.Event()
    real_add_version = publish.add_version

    def paused_add_version(*args, **kwargs):
        staged.set()
        assert release.wait(60)
        return real_add_version(*args, **kwargs)

    monkeypatch.setattr(publish, "add_version", paused_add_version)
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(v=publish.publish_run(store, "bone", runs["a"], "job-a", "adapt"))
    )
    thread.start()
    try:
        assert staged.wait(60)
        report = model_store.gc(store)  # the default grace period
        assert report["removed"] == [] and report["kept"] == {sha: ["pinned by a publish in progress"]}
        assert blobs(store) == [sha]
    finally:
        release.set()
        thread.join(60)
    assert result["v"][0] == "1" and blobs(store) == [sha]
    assert model_store.gc(store)["kept"] == {sha: ["bone/1"]}
    torch.testing.assert_close(outputs(store / "models/bone/1"), outputs(runs["a"]))


def test_gc_between_the_lower_level_steps(tmp_path: Path, runs) -> None:
    """stage_foundation, then gc, then add_version: a young staging folder survives gc with the copy it
    holds; a staging folder older than the grace period is removed, and the commit copies the foundation
    again from its source, so the version still loads."""
    store = tmp_path / "store"
    staging_adapter = tmp_path / "staged-a"
    for key, grace in (("a", 3600.0), ("b", 0.0)):
        staged = model_store.stage_foundation(store, runs["foundation"])
        removed = model_store.gc(store, grace_s=grace)["removed"]
        assert staged.staging.is_dir() == (grace > 0) and blobs(store) == (
            [] if key == "a" else [staged.sha256]
        )
        assert [item["kind"] for item in removed] == ([] if grace > 0 else ["temporary"])
        shutil.copytree(runs[key], staging_adapter, dirs_exist_ok=True)
        meta = json.loads((staging_adapter / "meta.json").read_text())
        meta["foundation"]["path"] = staged.relative_path
        (staging_adapter / "meta.json").write_text(json.dumps(meta))
        model_store.add_version(store, f"bone-{key}", staging_adapter, {"job_id": key}, foundation=staged)
        staged.release()
        assert blobs(store) == [staged.sha256] and not staged.staging.exists()
    # gc with grace 0 in the second round found the blob referenced by bone-a/1: only the staging went
    for key in ("a", "b"):
        torch.testing.assert_close(outputs(store / f"models/bone-{key}/1"), outputs(runs[key]))


def test_a_pin_older_than_the_grace_period_is_recopied_at_commit(tmp_path: Path, runs) -> None:
    store = tmp_path / "store"
    staged = model_store.stage_foundation(store, runs["foundation"])  # the store lacked it: a copy staged
    assert model_store.gc(store, grace_s=0)["removed"][0]["path"].startswith("foundations/.incoming-")
    staging_adapter = tmp_path / "staged"
    shutil.copytree(runs["a"], staging_adapter)
    meta = json.loads((staging_adapter / "meta.json").read_text())
    meta["foundation"]["path"] = staged.relative_path
    (staging_adapter / "meta.json").write_text(json.dumps(meta))
    model_store.add_version(store, "bone", staging_adapter, {"job_id": "a"}, foundation=staged)
    staged.release()
    assert blobs(store) == [staged.sha256] and leftovers(store) == []
    torch.testing.assert_close(outputs(store / "models/bone/1"), outputs(runs["a"]))


def test_concurrent_publishes_of_one_foundation_store_it_once(tmp_path: Path, runs) -> None:
    store = tmp_path / "store"
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            publish.publish_run(store, f"bone-{key}", runs[key], f"job-{key}", "adapt")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and blobs(store) == [sha256_folder(runs["foundation"])] and leftovers(store) == []
    for key in ("a", "b"):
        torch.testing.assert_close(outputs(store / f"models/bone-{key}/1"), outputs(runs[key]))


def test_gc_command_reports_removes_and_audits(tmp_path: Path, runs, capsys) -> None:
    store = tmp_path / "store"
    publish.publish_run(store, "bone", runs["a"], "job-a", "adapt")
    other = make_tiny_checkpoint(tmp_path / "other-fm", labels=("X", "Y"))
    unused = sha256_folder(other)
    shutil.copytree(other, store / "foundations" / unused)
    log = tmp_path / "audit/audit.jsonl"

    assert model_store.main(["gc", "--store", str(store), "--dry-run", "--audit-log", str(log)]) == 0
    assert "would remove foundation" in capsys.readouterr().out and (store / "foundations" / unused).is_dir()
    assert not log.exists()  # a dry run changes nothing and is not recorded

    assert model_store.main(["gc", "--store", str(store), "--audit-log", str(log), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [item["path"] for item in report["removed"]] == [f"foundations/{unused}"]
    assert not (store / "foundations" / unused).exists() and len(blobs(store)) == 1
    records = audit.load(log)
    assert [(r["action"], r["outcome"]) for r in records] == [("store_gc", "requested"), ("store_gc", "ok")]
    assert records[1]["detail"]["foundations_removed"] == 1 and audit.verify(log).intact

    assert model_store.main(["gc", "--store", str(tmp_path / "nowhere"), "--audit-log", str(log)]) == 1
    assert "not a model store" in capsys.readouterr().err
    assert [(r["outcome"], r["reason"]) for r in audit.load(log)[2:]] == [
        ("requested", None),
        ("failed", "store_gc_failed"),
    ]


def test_gc_command_help_names_every_option() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("shared/src", "services/common")),
    }
    answer = subprocess.run(
        [sys.executable, "-m", "xrayfm_stack.store", "gc", "--help"], capture_output=True, text=True, env=env
    )
    assert answer.returncode == 0, answer.stderr
    for option in ("--store", "--dry-run", "--grace", "--audit-log", "--json"):
        assert option in answer.stdout


def test_first_start_stores_the_shipped_foundation_once(tmp_path: Path) -> None:
    """The shipped adapter's foundation (xrayfm/cxr-vit-tiny-mae) goes to foundations/<sha256> once,
    however often the shipped model is published, and the installed version predicts as the shipped one."""
    from xrayfm.registry import pretrained_dir
    from xrayfm_stack.settings import TrainingSettings
    from xrayfm_training.bootstrap import install_shipped

    shipped = TrainingSettings().bootstrap_model
    store = tmp_path / "store"
    ref = install_shipped(store, shipped)
    assert install_shipped(store, shipped) == ref  # first start again: idempotent
    publish.publish_run(store, ref["name"], pretrained_dir(shipped), "job-2", "shipped")  # a second version
    meta = json.loads((pretrained_dir(shipped) / "meta.json").read_text())
    sha = sha256_folder((pretrained_dir(shipped) / meta["foundation"]["path"]).resolve())
    assert blobs(store) == [sha] and [r["version"] for r in model_store.list_versions(store)] == ["1", "2"]
    row = model_store.list_versions(store)[0]
    assert (
        row["lineage"]["foundation"]["form"] == "blob"
        and row["lineage"]["foundation"]["folder_sha256"] == sha
    )
    model, _ = load_any(model_store.version_dir(store, ref["name"], "2"))
    reference, _ = load_any(shipped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_a_version_made_from_a_stored_adapter_references_the_same_blob(tmp_path: Path, runs) -> None:
    """A calibrate job's output: the stored adapter with its foundation path made absolute (into the
    store's foundations/); published again, it references that blob by its name, nothing is copied."""
    store = tmp_path / "store"
    publish.publish_run(store, "bone", runs["a"], "job-a", "adapt")
    [sha] = blobs(store)
    calibrated = tmp_path / "runs/cal/out"
    shutil.copytree(store / "models/bone/1", calibrated)
    meta = json.loads((calibrated / "meta.json").read_text())
    meta["foundation"]["path"] = str((store / "models/bone/1" / meta["foundation"]["path"]).resolve())
    (calibrated / "meta.json").write_text(json.dumps(meta))
    assert publish.publish_run(store, "bone", calibrated, "cal-1", "calibrate")[0] == "2"
    assert blobs(store) == [sha] and leftovers(store) == []
    assert json.loads((store / "models/bone/2/meta.json").read_text())["foundation"]["path"] == (
        f"../../../foundations/{sha}"
    )
    assert model_store.referenced_foundations(store) == {sha: ["bone/1", "bone/2"]}
    torch.testing.assert_close(outputs(store / "models/bone/2"), outputs(runs["a"]))
