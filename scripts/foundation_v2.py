"""Foundation v2: MAE pre-training on every permissively licensed radiograph here, sources balanced.

The pool (``../shared/data``; terms in each folder's PROVENANCE.md):

| source | images | terms | default weight |
|---|---:|---|---:|
| Kermany 2018 train (paediatric chests) | 5,216 | CC BY 4.0 | 0.50 |
| NIH-1000 train_val (adult chests, 64 px) | 779 | NIH, no restriction | 0.38 |
| MHH COVID-19 (adult chests) | 243 | CC BY 3.0 | 0.12 |

- **Balance**: the adult half is split between NIH and MHH in proportion to their images, so an adult
  image is drawn about as often from either. Unweighted, the paediatric set would be 84 % of the draws.
- **Held out**: NIH's test patients (the pool excludes them), MURA and CheXpert (never pooled: their terms
  forbid shipping derived weights), and PneumoniaMNIST (its test split is Kermany's test split; its
  train split is these Kermany train images again at 28 px).
- **Left out**: the two DICOMs of ``dicom-radiographs`` (MIT). Two images cannot be balanced against
  thousands, and they are the API's test fixtures.

Two arms with the same token count (64 patches) and the same image-views, so the same compute:
``64p8`` (64 px, 8 px patches: v1's geometry) and ``128p16`` (128 px, 16 px patches). The NIH copy here is
64 px, so at 128 px its images are upsampled.

Each arm runs ``xrayfm pretrain --objective mae`` under ``OUT/<arm>/run``. A rerun resumes from
``last/``. The default schedule is 930,000 image-views, 5x v1's 185,920.

    python scripts/foundation_v2.py --out /work/runs/v2 --arm 64p8            # CPU: hours; GPU: minutes
    python scripts/foundation_v2.py --out /work/runs/v2 --arm 128p16
    python scripts/foundation_v2.py --out /tmp/v2-smoke --arm 64p8 --max-steps 3   # check the pool
    python scripts/foundation_v2.py --out /work/runs/v2 --print-pool          # the pool JSON only

Torchrun works as for any pretrain (``--torchrun N``). Ship the winner with ``scripts/ship_foundation.py``
as ``cxr-vit-tiny-mae-v2``, with a model card stating the weights above.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

V1_IMAGE_VIEWS = 185_920
ARMS = {"64p8": (64, 8), "128p16": (128, 16)}
WEIGHTS = {"kermany": 0.50, "nih": 0.38, "mhh": 0.12}


def pool(data: Path, weights: dict[str, float]) -> dict[str, Any]:
    """The weighted pool of the permissively licensed radiographs under `data` (absolute paths)."""
    data = data.resolve()
    nih = str(data / "nih-cxr14-1000-64")
    sources = {
        "kermany": {
            "kind": "images",
            "root": str(data / "kermany-pneumonia" / "labels.csv"),
            "patient_column": "patient_id",
            "name": "kermany-train",
        },
        "nih": {"kind": "nih", "root": nih, "split": "train", "name": "nih-1000-train_val"},
        "mhh": {
            "kind": "images",
            "root": str(data / "mhh-covid19-cxr" / "data.csv"),
            "path_template": "png/{image_id}.png",
            "patient_column": "patient_id",
            "name": "mhh-covid19",
        },
    }
    return {
        "sources": [{**source, "weight": weights[key]} for key, source in sources.items()],
        "exclude": [{"kind": "nih", "root": nih, "split": "test"}],
    }


def command(args: argparse.Namespace, pool_json: str, run: Path) -> list[str]:
    """The ``xrayfm pretrain`` command line of one arm (v1's recipe, the arm's size and patch)."""
    size, patch = ARMS[args.arm]
    # The schedule is counted in steps (image-views / batch); epochs only bound it from above.
    steps = args.max_steps or math.ceil(args.image_views / args.batch_size)
    kwargs = {"patch_size": patch, "global_pool": "avg", "fc_norm": False}
    xrayfm = Path(sys.executable).with_name("xrayfm")
    launcher = [str(xrayfm)]
    if args.torchrun > 1:
        launcher = [
            str(Path(sys.executable).with_name("torchrun")),
            f"--nproc-per-node={args.torchrun}",
            str(xrayfm),
        ]
    argv = [
        *launcher, "pretrain", "--objective", "mae", "--pool", pool_json,
        "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--size", str(size),
        "--drop-path-rate", "0", "--mask-ratio", "0.75", "--decoder-dim", "128", "--decoder-depth", "2",
        "--decoder-heads", "4", "--batch-size", str(args.batch_size), "--lr", "5e-4", "--weight-decay", "0.05",
        "--warmup-fraction", "0.05", "--epochs", "10000", "--max-steps", str(steps), "--save-every", "100",
        "--log-every", "10",
        "--seed", "0", "--device", args.device, "--no-progress-bar", "--json", "--out", str(run),
    ]  # fmt: skip
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="experiment folder (outside the repository)")
    parser.add_argument("--data", default="../shared/data", help="the real-data folder")
    parser.add_argument("--arm", choices=sorted(ARMS), default="64p8", help="image size / patch size")
    parser.add_argument(
        "--image-views", type=int, default=5 * V1_IMAGE_VIEWS, help="training images seen (default: 5x v1)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (v1: 64)")
    parser.add_argument(
        "--weights",
        default=",".join(f"{k}={v}" for k, v in WEIGHTS.items()),
        help="source weights KEY=W,... over kermany, nih, mhh",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--torchrun", type=int, default=1, help="processes under torchrun (GPUs or CPU ranks)"
    )
    parser.add_argument("--max-steps", type=int, help="train this many steps instead (a smoke check)")
    parser.add_argument("--print-pool", action="store_true", help="print the pool JSON and train nothing")
    args = parser.parse_args()

    weights = {k: float(v) for k, v in (item.split("=") for item in args.weights.split(","))}
    if set(weights) != set(WEIGHTS):
        raise SystemExit(f"--weights needs exactly {', '.join(WEIGHTS)}, got {', '.join(weights)}")
    spec = pool(Path(args.data), weights)
    if args.print_pool:
        print(json.dumps(spec, indent=1))
        return
    if shutil.which(str(Path(sys.executable).with_name("xrayfm"))) is None:
        raise SystemExit("the xrayfm command is not installed beside this Python (make install)")
    run = Path(args.out) / args.arm / "run"
    run.parent.mkdir(parents=True, exist_ok=True)
    (run.parent / "pool.json").write_text(json.dumps(spec, indent=1) + "\n")
    argv = command(args, json.dumps(spec), run)
    (run.parent / "command.txt").write_text(" ".join(argv) + "\n")
    raise SystemExit(subprocess.call(argv))


if __name__ == "__main__":
    main()
