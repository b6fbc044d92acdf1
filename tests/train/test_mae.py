"""MAE pre-training (``pretrain --objective mae``): masks, the pooled corpus, loss, exact resume, DDP, adapt."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import xrayfm
import xrayfm.registry
from tests.train.train_helpers import QUIET, SIZE, TINY_MODEL
from xrayfm.data import open_dataset
from xrayfm.errors import DataError, XrayfmError
from xrayfm.models.backbones import create_model
from xrayfm.models.checkpoint import load_any, load_checkpoint
from xrayfm.models.shipping import export_adapter, export_foundation, training_kinds
from xrayfm.train import AdaptConfig, PretrainConfig, adapt, pretrain
from xrayfm.train.distributed import DistEnv
from xrayfm.train.mae import MaskedAutoencoder, MaskedView, patchify, split_by_noise
from xrayfm.train.pool import UnlabelledImages, build_pool, check_no_leak, draw_weights
from xrayfm.train.sampler import RawImage

MAE = {"objective": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def _config(out, cache, **overrides) -> PretrainConfig:
    settings = dict(
        out=str(out),
        cache=None if cache is None else str(cache),
        epochs=1,
        batch_size=8,
        augment=False,
        drop_path_rate=0.0,
    )
    return PretrainConfig(**{**settings, **TINY_MODEL, **QUIET, **MAE, **overrides})


@pytest.fixture(scope="module")
def mae_run(chest_cache, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny MAE run on the synthetic chest phantoms (8 epochs): its folder and summary."""
    out = tmp_path_factory.mktemp("mae") / "run"
    return out, pretrain(_config(out, chest_cache, epochs=8, lr=1e-3))


# -- masks ------------------------------------------------------------------------------------------------
def test_masks_hide_the_same_share_of_every_sample_and_restore_the_order():
    noise = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    keep, restore, mask = split_by_noise(noise, 0.75)
    assert keep.shape == (5, 4) and mask.sum(1).tolist() == [12.0] * 5
    for b in range(5):  # the kept patches are the 4 lowest-noise ones, and exactly the unmasked ones
        assert set(keep[b].tolist()) == set(torch.argsort(noise[b])[:4].tolist())
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(keep[b].tolist())
    shuffled = torch.gather(torch.arange(16).expand(5, -1), 1, torch.argsort(noise, 1))
    assert torch.equal(torch.gather(shuffled, 1, restore), torch.arange(16).expand(5, -1))


def test_patchify_follows_the_vit_token_order():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # second patch: top row, right half
    embed = torch.nn.Conv2d(1, 1, 2, 2, bias=False)  # a ViT patch embedding sees the same pixels per token
    embed.weight.data = torch.arange(4.0).reshape(1, 1, 2, 2)
    tokens = embed(image).flatten(2).transpose(1, 2)[0, :, 0]
    assert torch.allclose(tokens, patches[0] @ torch.arange(4.0))


def test_a_sample_s_mask_depends_on_seed_epoch_and_sample_only(chest_cache):
    from xrayfm.data.torch_dataset import CachedDataset

    base = CachedDataset(chest_cache, transform=RawImage())
    view = MaskedView(base, RawImage(), seed=3, rows=np.arange(len(base)), num_patches=16)
    first = view[(5, 2)]["noise"]
    view[(0, 2)], view[(7, 1)]  # other draws in between change nothing
    assert torch.equal(view[(5, 2)]["noise"], first)
    assert not torch.equal(view[(5, 3)]["noise"], first)  # a new mask each epoch
    assert not torch.equal(view[(6, 2)]["noise"], first)
    other_seed = MaskedView(base, RawImage(), seed=4, rows=np.arange(len(base)), num_patches=16)
    assert not torch.equal(other_seed[(5, 2)]["noise"], first)


def test_mae_needs_a_vit():
    with pytest.raises(XrayfmError, match="VisionTransformer"):
        MaskedAutoencoder(create_model("resnet18", num_classes=0))


# -- settings ---------------------------------------------------------------------------------------------
def test_settings_that_cannot_work_are_refused(chest_cache, tmp_path):
    with pytest.raises(XrayfmError, match="objective"):
        _config(tmp_path, chest_cache, objective="dino").validate()
    with pytest.raises(XrayfmError, match="mask_ratio"):
        _config(tmp_path, chest_cache, mask_ratio=1.0).validate()
    with pytest.raises(XrayfmError, match="--pool is for --objective mae"):
        _config(tmp_path, None, objective="supervised", pool={"sources": [{"cache": "x"}]}).validate()
    with pytest.raises(XrayfmError, match="needs kind and root"):
        _config(tmp_path, None, pool={"sources": [{"kind": "nih"}]}).validate()
    with pytest.raises(XrayfmError, match="not both"):
        _config(tmp_path, chest_cache, pool={"sources": [{"cache": str(chest_cache)}]}).validate()
    with pytest.raises(XrayfmError, match="not a shipped model"):
        AdaptConfig(foundation="xrayfm/no-such-model", cache="c").validate()


def test_a_pool_comes_from_the_command_line_and_from_a_job_spec_alike(capsys):
    from xrayfm.cli import main

    pool = {"sources": [{"kind": "nih", "root": "NIH", "split": "train"}], "exclude": []}
    main(
        [
            "pretrain",
            "--objective",
            "mae",
            "--pool",
            json.dumps(pool),
            "--mask-ratio",
            "0.6",
            "--print-config",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["objective"] == "mae" and printed["pool"] == pool and printed["mask_ratio"] == 0.6
    spec = PretrainConfig.from_dict(printed)  # what the training worker does with a job's config
    assert spec == PretrainConfig.from_json(json.dumps(printed))
    assert PretrainConfig().objective == "supervised"  # the default is unchanged


# -- the pooled corpus -------------------------------------------------------------------------------------
def test_pool_drops_excluded_patients_and_duplicates_and_counts_them(chest_root, tmp_path):
    files = sorted((chest_root / "train").rglob("*.jpg"))[:13]
    listed = pd.DataFrame(
        {"path": [str(f) for f in files[:12]], "patient_id": [f"p{i // 2}" for i in range(12)]}
    )
    folder = tmp_path / "lists"  # one folder: the three lists are one dataset, so patient ids are shared
    folder.mkdir()
    listed.to_csv(folder / "all.csv", index=False)
    listed.iloc[[2]].to_csv(folder / "heldout.csv", index=False)  # patient p1 is held out
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(files[0], copy)  # the same pixels under another path
    again = {"path": [str(copy), str(files[1]), str(files[12])], "patient_id": ["q0", "q1", "q2"]}
    pd.DataFrame(again).to_csv(folder / "again.csv", index=False)
    images = {"kind": "images", "patient_column": "patient_id"}
    pool = {
        "sources": [
            {**images, "root": str(folder / "all.csv")},
            {**images, "root": str(folder / "again.csv")},
        ],
        "exclude": [{**images, "root": str(folder / "heldout.csv")}],
    }
    config = PretrainConfig(out=str(tmp_path / "run"), pool=pool, size=SIZE, objective="mae", **QUIET)
    data = build_pool(config, DistEnv())
    first, second = data.info["sources"]
    assert (first["usable"], first["excluded_patient"], first["images"], first["patients"]) == (12, 2, 10, 5)
    assert (second["duplicate_pixels"], second["duplicate_file"], second["images"]) == (1, 1, 1)
    assert data.info["exclude"][0]["patients"] == 1 and not data.info["exclude"][0]["default"]
    assert len(data.images) == data.info["images"] == 11
    assert not data.images.csv["patient_id"].str.endswith(":p1").any()
    assert set(data.images.csv["path"]) == {str(f) for f in files if f not in (files[2], files[3])}
    item = data.images[0]
    assert item["image"].dtype == torch.uint8 and item["labels"].numel() == 0


def test_pool_weights_give_each_source_its_share_of_the_draws(chest_root, tmp_path):
    files = sorted((chest_root / "train").rglob("*.jpg"))[:12]
    folder = tmp_path / "lists"
    folder.mkdir()
    for name, part in (("big", files[:10]), ("small", files[10:])):
        frame = {"path": [str(f) for f in part], "patient_id": [f"{name}{i}" for i in range(len(part))]}
        pd.DataFrame(frame).to_csv(folder / f"{name}.csv", index=False)
    images = {"kind": "images", "patient_column": "patient_id"}
    sources = [{**images, "root": str(folder / "big.csv")}, {**images, "root": str(folder / "small.csv")}]
    plain = PretrainConfig(
        out=str(tmp_path / "a"), pool={"sources": sources}, size=SIZE, objective="mae", **QUIET
    )
    data = build_pool(plain, DistEnv())
    assert data.info["sampling"] == "each image once an epoch"
    assert [s["share"] for s in data.info["sources"]] == [10 / 12, 2 / 12]
    assert draw_weights(data.images, data.info, np.arange(12)) is None

    weighted = {"sources": [{**sources[0], "weight": 1}, {**sources[1], "weight": 1}]}
    config = PretrainConfig(out=str(tmp_path / "b"), pool=weighted, size=SIZE, objective="mae", **QUIET)
    data = build_pool(config, DistEnv())
    assert data.info["sampling"] == "weighted by source"
    assert [s["share"] for s in data.info["sources"]] == [0.5, 0.5]
    rows = np.arange(1, 12)  # one image of the big source is in the validation split
    weights = draw_weights(data.images, data.info, rows)
    source = data.images.part[rows]
    assert weights.sum() == pytest.approx(1)
    assert weights[source == 0].sum() == pytest.approx(0.5) and weights[source == 1].sum() == pytest.approx(
        0.5
    )
    assert weights[source == 1][0] == pytest.approx(0.25) and weights[source == 0][0] == pytest.approx(
        0.5 / 9
    )


def test_an_image_list_can_name_its_files_by_a_template_that_stays_in_its_folder(chest_root, tmp_path):
    folder = tmp_path / "listed"
    (folder / "png").mkdir(parents=True)
    files = sorted((chest_root / "train").rglob("*.jpg"))[:4]
    for i, f in enumerate(files):
        shutil.copyfile(f, folder / "png" / f"id{i}.jpg")
    rows = {"image_id": [f"id{i}" for i in range(4)], "patient_id": ["a", "a", "b", "c"]}
    pd.DataFrame(rows).to_csv(folder / "data.csv", index=False)
    reader = UnlabelledImages(
        folder / "data.csv", path_template="png/{image_id}.jpg", patient_column="patient_id"
    )
    assert list(reader.csv["relpath"]) == [f"png/id{i}.jpg" for i in range(4)]
    assert reader.csv["patient_id"].nunique() == 3 and all(Path(p).is_file() for p in reader.csv["path"])
    with pytest.raises(DataError, match="leads outside its folder"):
        UnlabelledImages(folder / "data.csv", path_template="../{image_id}.jpg")
    for template in (
        "png/{missing}.jpg",
        "png/{image_id.__class__}.jpg",
        "png/{image_id!r}.jpg",
        "png/x.jpg",
    ):
        with pytest.raises(DataError, match="cannot be filled from its columns"):
            UnlabelledImages(folder / "data.csv", path_template=template)


@pytest.mark.real_data
def test_the_mhh_adult_chests_pool_by_patient(shared_data, tmp_path):
    """The CC BY 3.0 MHH COVID-19 radiographs (243 images of 71 patients) enter a pool through their
    data.csv, so that a patient's images stay on one side of the pool's validation split."""
    root = shared_data / "mhh-covid19-cxr" / "data.csv"
    reader = UnlabelledImages(root, path_template="png/{image_id}.png", patient_column="patient_id")
    assert len(reader) == 243 and reader.csv["patient_id"].nunique() == 71


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1, None], "give every source a weight, or none"),
        ([0, 1], "pool source 0: weight 0 must be a positive number"),
        ([1, "2"], "pool source 1: weight '2' must be a positive number"),
        ([-1.5, 1], "pool source 0: weight -1.5 must be a positive number"),
        ([float("inf"), 1], "pool: only finite numbers are allowed"),
    ],
)
def test_pool_weights_are_checked_when_the_spec_is_read(weights, message, tmp_path):
    sources = [{"cache": f"/c{i}", **({} if w is None else {"weight": w})} for i, w in enumerate(weights)]
    with pytest.raises(XrayfmError, match=message):
        PretrainConfig.from_dict({"out": str(tmp_path), "objective": "mae", "pool": {"sources": sources}})


def test_pool_keeps_held_out_splits_out_by_default(chest_root, tmp_path):
    source = {"kind": "chexpert", "root": str(chest_root)}
    config = PretrainConfig(
        out=str(tmp_path / "run"),
        pool={"sources": [{**source, "split": "train"}]},
        size=SIZE,
        objective="mae",
        **QUIET,
    )
    data = build_pool(config, DistEnv())
    valid = open_dataset("chexpert", chest_root, split="valid")
    assert data.info["exclude"] == [
        {
            **source,
            "split": "valid",
            "default": True,
            "patients": valid.csv["patient_id"].nunique(),
            "images": len(valid),
        }
    ]
    assert check_no_leak(data.images, [valid]) == []
    assert check_no_leak(
        data.images, [open_dataset("chexpert", chest_root, split="train")]
    )  # the check bites
    refused = PretrainConfig(
        out=str(tmp_path / "r2"),
        pool={"sources": [{**source, "split": "valid"}]},
        size=SIZE,
        objective="mae",
        **QUIET,
    )
    with pytest.raises(DataError, match="held-out"):
        build_pool(refused, DistEnv())


# -- training -----------------------------------------------------------------------------------------------
def test_mae_reduces_its_loss_and_saves_the_encoder_as_a_foundation(mae_run, chest_cache):
    run, summary = mae_run
    assert summary["status"] == "completed" and summary["objective"] == "mae"
    val = [h["val_loss"] for h in summary["history"]]
    assert val[-1] < 0.85 * val[0], val  # fixed validation masks: the reconstruction really improves
    steps = [float(r["loss"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert np.mean(steps[-4:]) < 0.85 * np.mean(steps[:4])
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["kind"] == "foundation" and meta["objective"]["name"] == "mae"
    assert meta["model"]["num_classes"] == 0 and meta["metrics"]["val_loss"] == min(val)
    pool = meta["data"]["pool"]
    assert pool["images"] == meta["data"]["train"]["images"] + meta["data"]["val"]["images"]
    assert (
        pool["sources"][0]["cache"]["fingerprint"]
        == json.loads((chest_cache / "manifest.json").read_text())["fingerprint"]
    )
    encoder, _ = load_checkpoint(run / "best")  # a plain timm ViT: no decoder weights inside
    assert type(encoder).__name__ == "VisionTransformer"
    assert not any(k.startswith("decoder") for k in load_file(str(run / "best" / "model.safetensors")))


class Killed(Exception):
    """Stands for SIGKILL: the loop gets no chance to save anything."""


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_matches_uninterrupted_run(chest_cache, tmp_path):
    settings = dict(epochs=3, augment=True, drop_path_rate=0.2, save_every=2, warmup_fraction=0.2)
    reference = pretrain(_config(tmp_path / "ref", chest_cache, **settings))
    per_epoch = reference["steps_per_epoch"]
    kill_at = per_epoch + 3
    assert per_epoch >= 3 and kill_at % 2 == 1  # the last save is one step before the kill
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        if len(calls) > kill_at:
            raise Killed
        return False

    with pytest.raises(Killed):
        pretrain(_config(tmp_path / "killed", chest_cache, **settings), should_cancel=should_cancel)
    resumed = pretrain(_config(tmp_path / "killed", chest_cache, **settings, resume=True))
    assert resumed["resumed_from_step"] == kill_at - 1 and resumed["step"] == reference["step"]
    ref_w = load_file(str(tmp_path / "ref" / "last" / "model.safetensors"))
    res_w = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert ref_w.keys() == res_w.keys() and any(k.startswith("decoder") for k in ref_w)
    for name in ref_w:
        assert torch.allclose(ref_w[name], res_w[name], rtol=0, atol=1e-6), name
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx(
        [h["val_loss"] for h in reference["history"]]
    )
    losses = {
        r: [float(row["loss"]) for row in csv.DictReader(open(tmp_path / r / "log.csv"))]
        for r in ("ref", "killed")
    }
    assert losses["killed"] == pytest.approx(losses["ref"], abs=1e-6)


def _argv(cache: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "-m", "xrayfm.cli", "pretrain", "--objective", "mae", "--cache", str(cache), "--out", str(out),
        "--epochs", "2", "--batch-size", str(batch_size), "--model", TINY_MODEL["model"], "--size", str(SIZE),
        "--model-kwargs", json.dumps(TINY_MODEL["model_kwargs"]), "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--no-augment", "--drop-path-rate", "0", "--no-tensorboard", "--device", "cpu",
        "--log-every", "1", "--json",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(chest_cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(xrayfm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    runs = {}
    for name, cmd in (
        ("ddp", [*torchrun, *_argv(chest_cache, tmp_path / "ddp", 4)]),
        ("single", [sys.executable, *_argv(chest_cache, tmp_path / "single", 8)]),
    ):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = json.loads(result.stdout)
    assert runs["ddp"]["world_size"] == 2 and runs["single"]["world_size"] == 1
    assert runs["ddp"]["global_batch"] == runs["single"]["global_batch"] == 8
    assert runs["ddp"]["step"] == runs["single"]["step"] > 2
    assert runs["ddp"]["rank_weight_max_diff"] == 0.0
    a = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "last" / "model.safetensors"))
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("attn.qkv.bias"):  # the key bias has no true gradient (softmax ignores it): Adam
            third = len(x) // 3  # turns rounding noise into steps, so it is compared more loosely
            assert torch.allclose(x[third : 2 * third], y[third : 2 * third], atol=1e-4), name
            x, y = torch.cat([x[:third], x[2 * third :]]), torch.cat([y[:third], y[2 * third :]])
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), name
    history = [json.loads((tmp_path / r / "summary.json").read_text())["history"] for r in ("ddp", "single")]
    assert len(history[0]) == 2
    for h_ddp, h_one in zip(*history, strict=True):
        assert h_ddp["val_loss"] == pytest.approx(h_one["val_loss"], rel=1e-4)  # gathered from both ranks


# -- adaptation and shipping ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_mae_encoder_adapts_with_lora_and_ships_under_a_name(mae_run, bone_caches, tmp_path, monkeypatch):
    run, _ = mae_run
    shipped = tmp_path / "weights"
    export_foundation(run / "best", shipped / "test-mae")
    monkeypatch.setattr(xrayfm.registry, "WEIGHTS_DIR", shipped)
    assert xrayfm.registry.list_pretrained() == ["xrayfm/test-mae"]
    # timm style: the shipped weights (bf16 on disk) under a new head, no network.
    model = create_model("xrayfm/test-mae", pretrained=True, num_classes=2)
    encoder, _ = load_checkpoint(run / "best")
    for name, value in encoder.state_dict().items():
        assert torch.allclose(model.state_dict()[name], value, atol=1e-2, rtol=1e-2), name
    assert model.head.out_features == 2
    random = create_model("xrayfm/test-mae", pretrained=False, num_classes=2)
    assert not torch.allclose(random.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)

    train, valid = bone_caches
    for foundation in (str(run / "best"), "xrayfm/test-mae"):
        out = tmp_path / foundation.replace("/", "_")
        config = AdaptConfig(
            out=str(out), foundation=foundation, method="lora", cache=str(train), val_cache=str(valid),
            max_steps=3, batch_size=8, n_bootstrap=20, **QUIET,
        )  # fmt: skip
        summary = adapt(config)
        assert summary["status"] == "completed" and summary["trainable"]["fraction"] < 0.5
        meta = json.loads((out / "best" / "meta.json").read_text())
        assert meta["format"] == "xrayfm.adapted" and Path(meta["foundation"]["path"]).is_dir()
        assert (out / "report" / "report.json").is_file()

    # The adapter ships beside its foundation and loads by name, wherever the package lies.
    adapted = tmp_path / "xrayfm_test-mae" / "best"
    export_adapter(adapted, shipped / "test-lora", "xrayfm/test-mae", extra_meta={"intended_use": "tests"})
    assert xrayfm.registry.list_pretrained() == ["xrayfm/test-lora", "xrayfm/test-mae"]
    assert (
        json.loads((shipped / "test-lora" / "meta.json").read_text())["foundation"]["path"] == "../test-mae"
    )
    moved = tmp_path / "moved"
    shutil.copytree(shipped, moved)
    monkeypatch.setattr(xrayfm.registry, "WEIGHTS_DIR", moved)
    by_name, meta = load_any("xrayfm/test-lora")
    original, _ = load_any(adapted)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(by_name(x), original(x))
    assert meta["intended_use"] == "tests"
    # an adapter of another foundation (the fp32 run, not the shipped bf16 one) is refused
    with pytest.raises(XrayfmError, match="not adapted from the shipped"):
        export_adapter(
            tmp_path / str(run / "best").replace("/", "_") / "best", moved / "other", "xrayfm/test-mae"
        )
    with pytest.raises(XrayfmError, match="beside the shipped foundations"):
        export_adapter(adapted, tmp_path / "elsewhere", "xrayfm/test-mae")
    assert not (moved / "other").exists() and not (tmp_path / "elsewhere").exists()


def test_weights_trained_on_chexpert_or_mura_are_never_shipped(mae_run, tmp_path):
    run, _ = mae_run
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert training_kinds(meta) == set()  # synthetic phantoms in the CheXpert layout: not CheXpert data
    real = json.loads(json.dumps(meta))
    real["data"]["pool"]["sources"][0]["cache"]["synthetic"] = False
    real["data"]["train_cache"]["pool"][0]["synthetic"] = False
    assert training_kinds(real) == {"chexpert"}
    copy = tmp_path / "copy"
    shutil.copytree(run / "best", copy)
    (copy / "meta.json").write_text(json.dumps(real))
    with pytest.raises(XrayfmError, match="forbid shipping"):
        export_foundation(copy, tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


@pytest.mark.real_data
@pytest.mark.slow
def test_real_chest_pool_keeps_the_held_out_sets_out_and_trains(shared_data, tmp_path):
    nih = str(shared_data / "nih-cxr14-1000-64")
    pool = {
        "sources": [
            {
                "kind": "images",
                "root": str(shared_data / "kermany-pneumonia" / "labels.csv"),
                "patient_column": "patient_id",
            },
            {"kind": "nih", "root": nih, "split": "all"},
        ],
    }
    config = PretrainConfig(
        out=str(tmp_path / "run"), pool=pool, max_steps=2, batch_size=16, **{**TINY_MODEL, "size": 64},
        **QUIET, **MAE,
    )  # fmt: skip
    summary = pretrain(config)
    kermany, nih_all = summary["pool"]["sources"]
    assert (
        kermany["usable"] == 5216 and kermany["duplicate_pixels"] == 16
    )  # 15 exact-duplicate groups, 31 files
    assert kermany["patients"] == 1000 + 1635
    # NIH "all" loses exactly its test split (207 images, 59 patients), excluded by default.
    assert summary["pool"]["exclude"][0]["default"] and summary["pool"]["exclude"][0]["patients"] == 59
    assert nih_all["usable"] == 986 and nih_all["excluded_patient"] == 207 and nih_all["images"] == 779
    assert summary["status"] == "completed" and summary["data"]["synthetic"] is False


SHIPPED = "xrayfm/cxr-vit-tiny-mae"


def test_the_shipped_foundation_loads_by_name_with_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert SHIPPED in xrayfm.registry.list_pretrained()
    folder = xrayfm.registry.pretrained_dir(SHIPPED)
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["objective"]["name"] == "mae" and meta["data"]["synthetic"] is False
    assert training_kinds(meta) == {"images", "nih"}  # Kermany (CC BY 4.0) and NIH: never CheXpert or MURA
    assert {e["split"] for e in meta["data"]["pool"]["exclude"]} == {"test"}  # the NIH test patients
    card = (folder / "MODEL_CARD.md").read_text()
    for needed in ("CC BY 4.0", "Kermany", "Wang", "not for clinical use"):
        assert needed in card, needed
    assert "__" not in card  # no placeholder left: the metrics are reported, or said to be not measured yet
    assert "AUROC" in card or "Not measured yet" in card
    model = create_model(SHIPPED, pretrained=True, num_classes=2)
    weights = load_file(str(folder / "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values() if w.is_floating_point())
    assert torch.equal(model.blocks[3].mlp.fc1.weight, weights["blocks.3.mlp.fc1.weight"].float())
    encoder, loaded_meta = load_checkpoint(SHIPPED)  # also as a checkpoint folder, by name
    assert loaded_meta["weights"]["sha256"] == meta["weights"]["sha256"]
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, encoder.embed_dim) and torch.isfinite(features).all()
    AdaptConfig(foundation=SHIPPED, cache="any").validate()


@pytest.mark.real_data
def test_the_foundation_v2_pool_balances_its_sources_and_keeps_held_out_patients_out(shared_data, tmp_path):
    """scripts/foundation_v2.py's pool, built as pre-training builds it: every source read, NIH's test
    patients excluded, the draws weighted by source."""
    out = subprocess.run(
        [sys.executable, "scripts/foundation_v2.py", "--out", str(tmp_path), "--data", str(shared_data), "--print-pool"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    pool = json.loads(out.stdout)
    config = PretrainConfig(out=str(tmp_path / "run"), pool=pool, size=SIZE, objective="mae", **QUIET)
    data = build_pool(config, DistEnv())
    by_name = {s["name"]: s for s in data.info["sources"]}
    assert {n: s["images"] for n, s in by_name.items()} == {
        "kermany-train": 5200, "nih-1000-train_val": 779, "mhh-covid19": 243,
    }  # fmt: skip
    assert data.info["exclude"][0]["patients"] == 59 and data.info["sampling"] == "weighted by source"
    weights = draw_weights(data.images, data.info, np.arange(len(data.images)))
    kermany = data.images.part == list(by_name).index("kermany-train")
    assert weights[kermany].sum() == pytest.approx(0.5)  # 84 % of the images, half of the draws
