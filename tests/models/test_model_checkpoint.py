"""Safe checkpoints: round trips, no pickle, atomic replace, exact training resume, adapted-model lineage."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xrayfm.errors import XrayfmError
from xrayfm.models import (
    LoraSettings,
    apply_lora,
    load_adapted,
    load_checkpoint,
    load_training_state,
    new_head,
    save_adapted,
    save_checkpoint,
    save_training_state,
)
from xrayfm.models import checkpoint as checkpoint_module
from xrayfm.utils import sha256_file


def _meta(spec: dict, **extra) -> dict:
    return {
        "model": spec,
        "labels": ["Atelectasis", "Cardiomegaly", "Edema"],
        "preprocessing": {"size": 32, "mean": [0.5], "std": [0.5], "channels": 3, "mode": "L"},
        "manifest_hash": "abc123",
        **extra,
    }


def _assert_safe_files(folder) -> None:
    """Every file is safetensors (8-byte header length + JSON header) or JSON; none is a pickle."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", data[:8])
            json.loads(data[8 : 8 + header_len])
            load_file(path)
            continue
        assert not data.startswith((b"\x80", b"PK")), f"{path} looks like a pickle or a torch.save zip"
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".md", f"unexpected file {path}"  # PEFT's model card


def test_checkpoint_round_trip(tiny_vit, tiny_spec, images, tmp_path):
    model = tiny_vit(seed=1).eval()
    metrics = {"auroc": {"Atelectasis": 0.8, "Edema": float("nan")}}
    folder = save_checkpoint(tmp_path / "ckpt", model, _meta(tiny_spec, metrics=metrics))
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]
    _assert_safe_files(folder)
    loaded, meta = load_checkpoint(folder)
    assert not loaded.training
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    assert meta["labels"] == ["Atelectasis", "Cardiomegaly", "Edema"]
    assert meta["manifest_hash"] == "abc123"
    assert meta["metrics"]["auroc"]["Edema"] is None  # NaN stored as strict-JSON null
    assert set(meta["versions"]) >= {"xrayfm", "torch", "timm", "peft"}
    assert meta["created"] and meta["weights"]["sha256"] == sha256_file(folder / "model.safetensors")


def test_checkpoint_of_wrapped_model_has_plain_keys(tiny_vit, tiny_spec, tmp_path):
    model = tiny_vit(seed=1)
    wrapped = torch.nn.DataParallel(model)  # like DDP / torch.compile: prefixes state_dict keys
    assert next(iter(wrapped.state_dict())).startswith("module.")
    folder = save_checkpoint(tmp_path / "ckpt", wrapped, _meta(tiny_spec))
    assert load_file(folder / "model.safetensors").keys() == model.state_dict().keys()


def test_checkpoint_refuses_mismatched_architecture(tiny_vit, tiny_spec, tmp_path):
    model = tiny_vit()
    with pytest.raises(XrayfmError, match="does not rebuild"):  # meta that would rebuild another model
        save_checkpoint(tmp_path / "bad", model, _meta({**tiny_spec, "depth": 3}))
    assert not (tmp_path / "bad").exists()
    folder = save_checkpoint(tmp_path / "ckpt", model, _meta(tiny_spec))
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    small = {"name": "vit_small_patch16_224", "num_classes": 3, "img_size": 32, "depth": 2}  # width 384
    for other in ({**tiny_spec, "embed_dim": 64}, small, {**tiny_spec, "num_classes": 4}):
        meta_path.write_text(json.dumps({**meta, "model": other}))
        with pytest.raises(XrayfmError, match="do not match"):
            load_checkpoint(folder)
    meta_path.write_text(json.dumps({**meta, "model": {**tiny_spec, "name": "no_such_net"}}))
    with pytest.raises(XrayfmError, match="unknown timm model"):
        load_checkpoint(folder)


def test_checkpoint_detects_changed_weights(tiny_vit, tiny_spec, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", tiny_vit(seed=1), _meta(tiny_spec))
    other = tiny_vit(seed=2)
    checkpoint_module._save_tensors(other.state_dict(), folder / "model.safetensors")
    with pytest.raises(XrayfmError, match="sha256"):
        load_checkpoint(folder)


def test_failed_save_leaves_previous_checkpoint(tiny_vit, tiny_spec, images, monkeypatch, tmp_path):
    first = tiny_vit(seed=1).eval()
    save_checkpoint(tmp_path / "ckpt", first, _meta(tiny_spec))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write_json", disk_full)  # fails after the weights are written
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path / "ckpt", tiny_vit(seed=2), _meta(tiny_spec))
    monkeypatch.undo()
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(images), first(images), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "temporary folders left behind"
    # and a successful save does replace it
    second = tiny_vit(seed=2).eval()
    save_checkpoint(tmp_path / "ckpt", second, _meta(tiny_spec))
    torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt")[0](images), second(images), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ------------------------------------------------------------------------------------------ training state
def _objects(tiny_vit, seed: int):
    """Model with dropout + drop-path, AdamW and a warm-up/cosine schedule."""
    model = tiny_vit(seed=seed, drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.99))
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> torch.Tensor:
    """One step whose data and dropout masks depend on the torch, numpy and python RNGs."""
    model.train()
    scale = float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
    images = torch.randn(4, 3, 32, 32) * scale
    targets = (torch.rand(4, 3) > 0.5).float()
    logits = model(images)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return logits.detach()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_training_resume_is_exact(tiny_vit, tmp_path):
    total, split = 6, 3
    _seed_all(0)
    model, optimizer, scheduler = _objects(tiny_vit, seed=0)
    _seed_all(1)
    straight = [_step(model, optimizer, scheduler) for _ in range(total)]

    _seed_all(0)
    model_a, optimizer_a, scheduler_a = _objects(tiny_vit, seed=0)
    _seed_all(1)
    for _ in range(split):
        _step(model_a, optimizer_a, scheduler_a)
    folder = save_training_state(
        tmp_path / "state", model_a, optimizer_a, scheduler_a, epoch=1, step=split, extra={"best_auc": 0.5}
    )
    _assert_safe_files(folder)

    # fresh objects, other init and other RNG positions: everything must come from the files
    model_b, optimizer_b, scheduler_b = _objects(tiny_vit, seed=42)
    _seed_all(42)
    info = load_training_state(folder, model_b, optimizer_b, scheduler_b)
    assert info == {"epoch": 1, "step": split, "extra": {"best_auc": 0.5}}
    assert scheduler_b.last_epoch == split
    resumed = [_step(model_b, optimizer_b, scheduler_b) for _ in range(total - split)]

    for a, b in zip(straight[split:], resumed, strict=True):  # same data and dropout masks, step by step
        assert torch.equal(a, b)
    for (name, p), q in zip(model.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert optimizer_b.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer_b.param_groups[0]["betas"] == (0.9, 0.99)
    state, state_b = optimizer.state_dict()["state"], optimizer_b.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state)


def test_training_state_refuses_unsafe_extra(tiny_vit, tmp_path):
    model, optimizer, scheduler = _objects(tiny_vit, seed=0)
    with pytest.raises(XrayfmError, match="extra.callback"):
        save_training_state(
            tmp_path / "s", model, optimizer, scheduler, epoch=0, step=0, extra={"callback": print}
        )
    assert not (tmp_path / "s").exists()


def test_training_state_needs_matching_optimizer(tiny_vit, tmp_path):
    model, optimizer, scheduler = _objects(tiny_vit, seed=0)
    folder = save_training_state(tmp_path / "s", model, optimizer, scheduler, epoch=0, step=0)
    other_model, _, _ = _objects(tiny_vit, seed=0)
    sgd = torch.optim.SGD([next(other_model.parameters())], lr=0.1)
    with pytest.raises(XrayfmError, match="optimizer"):
        load_training_state(folder, other_model, sgd, None)


# ------------------------------------------------------------------------------------------ adapted models
def test_adapted_round_trip_and_lineage(tiny_vit, tiny_spec, images, tmp_path):
    foundation = save_checkpoint(tmp_path / "foundation", tiny_vit(seed=1), _meta(tiny_spec))
    base, _ = load_checkpoint(foundation)
    new_head(base, 2)  # the downstream task has 2 labels
    model = apply_lora(base, LoraSettings(rank=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()
    for _ in range(2):
        loss = model(images).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = model(images).detach()

    folder = save_adapted(
        tmp_path / "adapted", model, {"foundation": str(foundation), "task": "pneumothorax"}
    )
    _assert_safe_files(folder)
    adapter_bytes = sum(p.stat().st_size for p in (folder / "adapter").glob("*.safetensors"))
    assert adapter_bytes < 0.25 * (foundation / "model.safetensors").stat().st_size

    loaded, meta = load_adapted(folder)
    assert meta["task"] == "pneumothorax" and meta["model"]["num_classes"] == 2
    assert meta["foundation"] == {
        "path": str(foundation.resolve()),
        "sha256": sha256_file(foundation / "model.safetensors"),
    }
    torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)

    # the foundation is replaced by another model: loading must refuse, not silently mix
    save_checkpoint(tmp_path / "foundation", tiny_vit(seed=2), _meta(tiny_spec))
    with pytest.raises(XrayfmError, match="not the one"):
        load_adapted(folder)
    with pytest.raises(XrayfmError, match="not found"):
        load_adapted(folder, foundation=tmp_path / "elsewhere")
    with pytest.raises(XrayfmError, match="foundation"):
        save_adapted(tmp_path / "x", model, {"task": "no lineage"})
