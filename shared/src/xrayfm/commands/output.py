"""What the commands print: one strict JSON object for ``--json``."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(obj: Any) -> None:
    """One strict JSON object on stdout (what `--json` promises): NaN and numpy values made plain."""
    from xrayfm.utils import to_jsonable  # here, not at the top: numpy stays out of `xrayfm --help`

    json.dump(to_jsonable(obj), sys.stdout, indent=2, allow_nan=False, default=str)
    sys.stdout.write("\n")


__all__ = ["print_json"]
