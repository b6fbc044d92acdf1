"""The training commands: documented options generated from the configs, --config files, --json output."""

from __future__ import annotations

import dataclasses
import json

import pytest

from train_helpers import CHEST_LABELS, TINY_MODEL
from xrayfm.cli import main
from xrayfm.train.config import AdaptConfig, PretrainConfig


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
    for f in dataclasses.fields(config):
        if f.name not in skipped:
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            # The help text of the field is shown (first few words, as argparse may wrap the rest).
            assert " ".join(f.metadata["help"].split()[:3]) in text, f.name


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
