"""The docs: the command reference (docs/cli.md) is the one generated from the parsers, so it matches
`--help`; the READMEs stay short; the docs describe the system, not the history of its work; the quick
start posts a radiograph that the repository ships, with its licence."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from tests.helpers import REPO


def test_readme_command_reference_is_current():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "readme_cli.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_reference_names_every_command():
    spec = importlib.util.spec_from_file_location("readme_cli", REPO / "scripts" / "readme_cli.py")
    readme_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_cli)

    from xrayfm.cli import build_parser

    text = (REPO / "docs" / "cli.md").read_text()
    for command, _, parser in readme_cli._leaf_commands(build_parser()):
        assert f"#### `{command}`" in text
        for action in parser._actions:
            for option in action.option_strings:
                if option != "-h" and option != "--help":
                    assert f"`{option}`" in text, f"{command} {option}"


README_MAX_LINES = 250
SERVICES_README_MAX_LINES = 300
SAMPLE = "docs/samples/paediatric-chest-pneumonia.jpeg"

# An issue reference ("#14", "issue 15") and the narration of work sessions ("the fifth pass", "this session",
# "since 2026-12-03"): docs say what the system is and does, with each figure's command and machine.
ISSUE_NUMBER = re.compile(r"(?<![\w&/])#\d+\b|\bissues?\s+#?\d+", re.IGNORECASE)
PASS_HISTORY = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|previous|earlier|later|last|next|"
    r"another) (pass|session)(es|s)?\b|\bthis (pass|session)\b|\bsessions? of 20\d\d|\b(since|until) 20\d\d-\d\d-\d\d",
    re.IGNORECASE,
)


def _docs() -> list:
    return [
        REPO / "README.md",
        REPO / "services" / "README.md",
        REPO / "services" / "training" / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
    ]


def test_readmes_stay_short():
    readme = (REPO / "README.md").read_text().splitlines()
    services = (REPO / "services" / "README.md").read_text().splitlines()
    assert len(readme) <= README_MAX_LINES, f"README.md has {len(readme)} lines: move detail into docs/"
    assert len(services) <= SERVICES_README_MAX_LINES, f"services/README.md has {len(services)} lines"


def test_docs_name_no_issue_numbers_and_narrate_no_passes():
    found = []
    for path in _docs():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in (ISSUE_NUMBER, PASS_HISTORY):
                match = pattern.search(line)
                if match:
                    found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r}")
    assert not found, "\n".join(found)


def test_history_patterns_catch_what_they_are_for():
    assert ISSUE_NUMBER.search("Where #14's goals stand") and ISSUE_NUMBER.search("(issue 15)")
    assert PASS_HISTORY.search("**Fifth pass, 2026-12-03**") and PASS_HISTORY.search(
        "since 2026-12-03 a worker"
    )
    assert not ISSUE_NUMBER.search("[Training](#training) and `&#123;`")
    assert not PASS_HISTORY.search("One forward pass gives both; an ONNX Runtime session")
    assert not PASS_HISTORY.search("a threshold that passes 97 %; this passes")


def test_quick_start_posts_the_shipped_sample_with_its_licence():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert f'-F "file=@{SAMPLE}"' in quick_start
    assert "make up" in quick_start and "make down" in quick_start
    sample = REPO / SAMPLE
    assert sample.read_bytes()[:3] == b"\xff\xd8\xff", "the sample is a JPEG"
    attribution = (sample.parent / "ATTRIBUTION.md").read_text()
    assert sample.name in attribution and "CC BY 4.0" in attribution and "Kermany" in attribution
    from xrayfm_local.launcher import SAMPLE as launcher_sample  # make up's closing hint posts it too

    assert launcher_sample == sample
