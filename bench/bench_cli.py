"""How fast the `xrayfm` command starts: `xrayfm --help` against `python -c "import torch"`, side by side.

Each command runs in a fresh interpreter, in interleaved rounds (so a busy machine slows all alike); the
median of the rounds is reported, and the ratio help / torch. The goal: `xrayfm --help` in at most 0.2x
of the torch import.

    .venv/bin/python bench/bench_cli.py             # 7 rounds, a table
    .venv/bin/python bench/bench_cli.py --json      # one JSON object
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL = 0.2


def xrayfm_command() -> list[str]:
    """The installed `xrayfm` script next to this interpreter, else `python -m xrayfm.cli`."""
    script = Path(sys.executable).with_name("xrayfm")
    if script.exists():
        return [str(script)]
    found = shutil.which("xrayfm")
    return [found] if found else [sys.executable, "-m", "xrayfm.cli"]


def commands() -> dict[str, list[str]]:
    """What is timed: the two measured commands and, for context, the bare interpreter and a sub-command."""
    xrayfm = xrayfm_command()
    return {
        "xrayfm --help": [*xrayfm, "--help"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "xrayfm pretrain --help": [*xrayfm, "pretrain", "--help"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }


def time_once(command: list[str]) -> float:
    """Wall time (s) of one run; the command must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, object]:
    """Median wall time per command over `rounds` interleaved rounds, and the help / torch ratio."""
    cmds = commands()
    for command in cmds.values():  # warm the file cache; not counted
        time_once(command)
    samples: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(rounds):
        for name, command in cmds.items():
            samples[name].append(time_once(command))
    median = {name: statistics.median(values) for name, values in samples.items()}
    ratio = median["xrayfm --help"] / median['python -c "import torch"']
    return {
        "rounds": rounds,
        "median_s": {name: round(value, 3) for name, value in median.items()},
        "samples_s": {name: [round(v, 3) for v in values] for name, values in samples.items()},
        "ratio_help_to_torch": round(ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio <= GOAL,
        "python": sys.version.split()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=7, help="fresh interpreters per command (default 7, >= 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    result = measure(args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"median wall time of {args.rounds} fresh interpreters each (interleaved)")
    for name, value in result["median_s"].items():  # type: ignore[union-attr]
        print(f"  {name:28s} {value:7.3f} s")
    verdict = "meets" if result["meets_goal"] else "MISSES"
    print(
        f"ratio xrayfm --help / import torch: {result['ratio_help_to_torch']:.3f} ({verdict} the goal <= {GOAL})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
