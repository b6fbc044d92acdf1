"""Regenerate docs/cli.md, the command reference, from the `xrayfm` argparse parsers (so it matches `--help`).

python scripts/readme_cli.py          # rewrite docs/cli.md
python scripts/readme_cli.py --check  # exit 1 when docs/cli.md is out of date (the test suite runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "cli.md"
HEADER = """# Command reference

Every `xrayfm` sub-command with its options, generated from the parsers by `python scripts/readme_cli.py`
(`tests/test_readme.py` fails when this file is out of date). `xrayfm COMMAND --help` prints the same.
"""


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "xrayfm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                children = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if children:
                    yield from _leaf_commands(sub, f"{prefix} {name}")
                else:
                    yield f"{prefix} {name}", helps.get(name, ""), sub


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": ""}
    return _cell(text)


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("+", "*") else "")
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs != 0 and action.metavar:
        names += f" {action.metavar}"
    elif action.choices and action.nargs != 0:
        names += " {" + ",".join(map(str, action.choices)) + "}"
    return names


def render() -> str:
    """The Markdown of every leaf sub-command: one-line summary, description, arguments table."""
    sys.path.insert(0, str(REPO / "shared" / "src"))
    from xrayfm.cli import build_parser

    out = [HEADER]
    for command, summary, parser in _leaf_commands(build_parser()):
        out += [f"#### `{command}`", "", _cell(summary) + ".", ""]
        if parser.description:
            out += [_cell(parser.description), ""]
        out += ["| argument | meaning |", "|---|---|"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out.append(f"| {_name(action)} | {_help(action)} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when out of date")
    args = parser.parse_args()
    new = render()
    if args.check:
        if not REFERENCE.exists() or REFERENCE.read_text() != new:
            print(f"{REFERENCE.relative_to(REPO)} is out of date: run python scripts/readme_cli.py")
            return 1
        return 0
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
