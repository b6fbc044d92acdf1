"""Multi-process training under real torchrun (2 CPU processes, gloo) against one process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import xrayfm
from tests.train.train_helpers import CHEST_LABELS, TINY_MODEL
from xrayfm.models.backbones import create_model


def _argv(cache: Path, out: Path, batch_size: int) -> list[str]:
    # No augmentation, no stochastic depth: both runs see exactly the same computation.
    return [
        "-m",
        "xrayfm.cli",
        "pretrain",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        str(batch_size),
        "--labels",
        ",".join(CHEST_LABELS),
        "--model",
        TINY_MODEL["model"],
        "--size",
        "32",
        "--model-kwargs",
        json.dumps(TINY_MODEL["model_kwargs"]),
        "--no-augment",
        "--drop-path-rate",
        "0",
        "--no-tensorboard",
        "--device",
        "cpu",
        "--log-every",
        "1",
        "--json",
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(xrayfm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(chest_cache, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    ddp = _run([*torchrun, *_argv(chest_cache, tmp_path / "ddp", batch_size=4)])
    single = _run([sys.executable, *_argv(chest_cache, tmp_path / "single", batch_size=8)])

    ddp_summary, single_summary = json.loads(ddp.stdout), json.loads(single.stdout)  # rank 0 alone prints
    assert ddp_summary["world_size"] == 2 and single_summary["world_size"] == 1
    assert ddp_summary["global_batch"] == single_summary["global_batch"] == 8
    assert ddp_summary["step"] == single_summary["step"] > 2
    assert ddp_summary["rank_weight_max_diff"] == 0.0  # the ranks stayed in sync

    a = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "last" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    # Both started from the same seeded init and really trained away from it.
    torch.manual_seed(0)
    spec = json.loads((tmp_path / "single" / "best" / "meta.json").read_text())["model"]
    init = create_model(**spec).state_dict()
    assert sum(not torch.allclose(b[n], init[n], atol=1e-3) for n in b) > len(b) // 2
    # Validation predictions were gathered from both ranks: the same metrics as one process.
    history = [json.loads((tmp_path / r / "summary.json").read_text())["history"] for r in ("ddp", "single")]
    for h_ddp, h_one in zip(*history, strict=True):
        assert h_ddp["val_loss"] == pytest.approx(h_one["val_loss"], rel=1e-4)
    # Rank 0 alone wrote the logs: one row per step.
    assert len((tmp_path / "ddp" / "log.csv").read_text().splitlines()) == 1 + ddp_summary["step"]
