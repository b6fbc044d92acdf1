"""The training commands: documented options generated from the configs, --config files, --json output."""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.train.train_helpers import CHEST_LABELS, TINY_MODEL
from xrayfm.cli import main
from xrayfm.errors import XrayfmError
from xrayfm.train.config import (
    AdaptConfig,
    CalibrateConfig,
    CVConfig,
    EvaluateConfig,
    PretrainConfig,
    TuneConfig,
    bounds_text,
    field_type,
    settings_of,
)

# Each config class with the fewest settings that make it valid.
MINIMAL = {
    PretrainConfig: {"cache": "c"},
    AdaptConfig: {"cache": "c", "foundation": "f"},
    CVConfig: {"cache": "c", "foundation": "f"},
    TuneConfig: {"cache": "c", "foundation": "f"},
    EvaluateConfig: {"model": "m", "cache": "c"},
    CalibrateConfig: {"model": "m", "data": ["folder:/x"]},
}


@pytest.mark.parametrize(
    "argv, config",
    [
        (["pretrain"], PretrainConfig),
        (["adapt"], AdaptConfig),
        (["evaluate"], None),
        (["experiment", "label-efficiency"], AdaptConfig),
    ],
)
def test_help_documents_every_option(argv, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if config is None:
        assert "--out" in text and "--n-bootstrap" in text and "checkpoint" in text
        return
    skipped = {"method", "label_fraction", "resume", "report_on"} if argv[0] == "experiment" else set()
    for f in settings_of(config).values():
        if f.name not in skipped:
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            # The help text of the field is shown (first few words, as argparse may wrap the rest).
            assert " ".join(f.help.split()[:3]) in text, f.name


def test_experiment_without_subcommand_prints_help(capsys):
    assert main(["experiment"]) == 2
    assert "label-efficiency" in capsys.readouterr().out


def test_config_file_with_command_line_overrides(tmp_path, capsys):
    spec = PretrainConfig(out=str(tmp_path / "run"), cache="somewhere", epochs=7, lr=1e-4, labels=["A", "B"])
    spec.to_json(tmp_path / "job.json")
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(tmp_path / "job.json"),
                "--lr",
                "0.002",
                "--no-augment",
                "--model-kwargs",
                '{"depth": 3}',
                "--print-config",
            ]
        )
        == 0
    )
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["epochs"] == 7 and resolved["labels"] == ["A", "B"]  # from the file
    assert resolved["lr"] == 0.002 and resolved["augment"] is False  # from the command line
    assert resolved["model_kwargs"] == {"depth": 3}
    assert PretrainConfig.from_dict(resolved).to_dict() == resolved


def test_config_file_may_leave_settings_to_the_command_line(tmp_path, capsys):
    (tmp_path / "job.json").write_text(json.dumps({"epochs": 2, "model": "vit_small_patch16_224"}))
    assert main(["pretrain", "--config", str(tmp_path / "job.json"), "--cache", "c", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["epochs"], resolved["model"], resolved["cache"]) == (2, "vit_small_patch16_224", "c")


def test_bad_config_files_and_values_are_clear_errors(tmp_path, capsys):
    (tmp_path / "job.json").write_text(json.dumps({"out": "x", "cache": "c", "learning_rate": 1}))
    assert main(["pretrain", "--config", str(tmp_path / "job.json")]) == 1
    assert "unknown PretrainConfig settings: learning_rate" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text(json.dumps({"kind": "mura", "root": "", "cache": ""}))
    assert main(["pretrain", "--config", str(tmp_path / "empty.json")]) == 1  # "" is not "unset"
    assert "empty PretrainConfig settings: cache, root" in capsys.readouterr().err
    (tmp_path / "typed.json").write_text(
        json.dumps({"cache": ["c"], "epochs": 2.5, "lr": 1, "labels": ["A"]})
    )
    assert main(["pretrain", "--config", str(tmp_path / "typed.json")]) == 1  # a list is not a path
    err = capsys.readouterr().err
    assert (
        "wrong type of PretrainConfig settings: cache (list, expected str | None), epochs (float, expected int)"
        in err
    )
    assert main(["adapt", "--cache", "c", "--print-config"]) == 1
    assert "--foundation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--metric", "accuracy"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("cls", MINIMAL, ids=lambda cls: cls.__name__)
def test_every_number_has_a_documented_range_holding_its_default(cls):
    for f in settings_of(cls).values():
        if field_type(cls, f.name) in (int, float):
            bounded = {"ge", "gt"} & set(f.bounds) and {"le", "lt"} & set(f.bounds)
            assert bounded and bounds_text(f), f"{cls.__name__}.{f.name} has no lower and upper bound"
    cls.from_dict(MINIMAL[cls])  # every default lies in its range


def test_numbers_outside_their_range_are_refused_by_the_library_and_the_cli(capsys):
    with pytest.raises(XrayfmError, match=re.escape("lr=nan (must lie in (0, 10])")):
        PretrainConfig(cache="c", lr=math.nan).validate()
    with pytest.raises(XrayfmError, match=re.escape("epochs=1000000000 (must lie in [1, 10000])")):
        AdaptConfig.from_dict({**MINIMAL[AdaptConfig], "epochs": 10**9})
    with pytest.raises(
        XrayfmError, match=re.escape("n_bootstrap=<a 31-digit number> (must lie in [0, 100000])")
    ):
        EvaluateConfig.from_dict({**MINIMAL[EvaluateConfig], "n_bootstrap": 10**30})
    with pytest.raises(XrayfmError, match="model_kwargs: only finite numbers"):
        PretrainConfig.from_json('{"cache": "c", "model_kwargs": {"depth": [2, Infinity]}}')
    with pytest.raises(XrayfmError, match=re.escape("space: lr must lie in (0, 10]")):
        TuneConfig.from_dict({**MINIMAL[TuneConfig], "space": {"lr": {"low": 1e-5, "high": 100}}})
    with pytest.raises(XrayfmError, match=re.escape("seed=-1 (must lie in [0, 4294967295])")):
        CalibrateConfig.from_dict({**MINIMAL[CalibrateConfig], "seed": -1})
    assert main(["pretrain", "--cache", "c", "--lr", "inf", "--print-config"]) == 1
    assert "lr=inf (must lie in (0, 10])" in capsys.readouterr().err
    assert main(["evaluate", "m", "--out", "e", "--cache", "c", "--num-workers", "10000"]) == 1
    assert "num_workers=10000 (must lie in [0, 256])" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (AdamW) (default: 0.0003; range (0, 10])" in text
    assert "number of epochs (default: 10; range [1, 10000])" in text


def test_model_is_a_timm_architecture_never_a_hub_reference(tmp_path):
    for name in ("hf-hub:attacker/evil-model", "hf_hub:org/name", "timm/vit_base_patch16_224", "../x", ""):
        with pytest.raises(XrayfmError, match=re.escape(f"model {name!r} (a timm architecture name")):
            PretrainConfig(cache="c", model=name).validate()
    PretrainConfig(cache="c", model="vit_base_patch16_224.augreg_in21k").validate()  # a pretrained tag
    from xrayfm.train import pretrain

    # checked against timm's registry before any data is read (the cache does not exist)
    config = PretrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "none"), model="vit_no_such_net")
    with pytest.raises(XrayfmError, match="unknown timm model 'vit_no_such_net'"):
        pretrain(config)


def test_pretrain_then_evaluate_with_json_output(chest_cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "pretrain",
        "--cache",
        str(chest_cache),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--labels",
        ",".join(CHEST_LABELS),
        "--model",
        TINY_MODEL["model"],
        "--size",
        "32",
        "--model-kwargs",
        json.dumps(TINY_MODEL["model_kwargs"]),
        "--no-augment",
        "--no-tensorboard",
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["labels"] == CHEST_LABELS
    assert (
        main(
            [
                "evaluate",
                str(out / "best"),
                "--cache",
                str(chest_cache),
                "--out",
                str(tmp_path / "eval"),
                "--n-bootstrap",
                "10",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "mean_auroc"
    assert sorted(result["report"]["labels"]) == sorted(CHEST_LABELS)
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "predictions.csv").exists()
