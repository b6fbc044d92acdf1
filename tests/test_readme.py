"""The command reference (docs/cli.md) is the one generated from the parsers, so it matches `--help`."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_readme_command_reference_is_current():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "readme_cli.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_reference_names_every_command():
    sys.path.insert(0, str(REPO / "scripts"))
    import readme_cli

    from xrayfm.cli import build_parser

    text = (REPO / "docs" / "cli.md").read_text()
    for command, _, parser in readme_cli._leaf_commands(build_parser()):
        assert f"#### `{command}`" in text
        for action in parser._actions:
            for option in action.option_strings:
                if option != "-h" and option != "--help":
                    assert f"`{option}`" in text, f"{command} {option}"
