"""Ship a foundation run inside the package: ``xrayfm/models/weights/<name>/`` (bf16 safetensors + meta.json),
keeping the MODEL_CARD.md already there. Refuses runs trained on CheXpert or MURA, and files over 25 MB.

    python scripts/ship_foundation.py runs/mae-real/run/best cxr-vit-tiny-mae
"""

from __future__ import annotations

import argparse
import json

from xrayfm.models.shipping import export_foundation
from xrayfm.registry import PREFIX, WEIGHTS_DIR

MAX_BYTES = 25 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="the run's best/ folder")
    parser.add_argument("name", help="the shipped name (without the xrayfm/ prefix)")
    args = parser.parse_args()
    dst = WEIGHTS_DIR / args.name
    card = dst / "MODEL_CARD.md"
    export_foundation(
        args.checkpoint, dst, card=card if card.is_file() else None, extra_meta={"name": PREFIX + args.name}
    )
    size = (dst / "model.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{dst / 'model.safetensors'} has {size / 2**20:.1f} MB, over the 25 MB limit")
    meta = json.loads((dst / "meta.json").read_text())
    print(
        f"{PREFIX}{args.name}: {size / 2**20:.1f} MB, sha256 {meta['weights']['sha256'][:16]}..., card: {card.is_file()}"
    )


if __name__ == "__main__":
    main()
