"""The `xrayfm` console command.

Each feature area owns its sub-commands in a module of :mod:`xrayfm.commands` exposing
``register(subparsers)``; this file only collects them, so ``xrayfm --help`` lists everything. Building
the parser imports no torch, timm, peft, matplotlib or scikit-learn: the handlers import those when they
run (``tests/test_layers.py`` checks it, ``bench/bench_cli.py`` times it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xrayfm.errors import XrayfmError

# Modules that expose `register(subparsers: argparse._SubParsersAction) -> None`.
# Each registered parser sets `func=callable(args) -> int` via `set_defaults`.
COMMAND_MODULES = (
    "xrayfm.commands.data",
    "xrayfm.commands.train",
    "xrayfm.commands.explain",
    "xrayfm.commands.demo",
    "xrayfm.commands.feedback",
    "xrayfm.commands.gate",
    "xrayfm.commands.calibrate",
    "xrayfm.commands.audit",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    from xrayfm import __version__

    parser = argparse.ArgumentParser(
        prog="xrayfm",
        description="X-ray foundation models: prepare data, pre-train, adapt with LoRA, evaluate, explain.",
    )
    parser.add_argument("--version", action="version", version=f"xrayfm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xrayfm` command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except XrayfmError as exc:  # expected, user-facing failures: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
