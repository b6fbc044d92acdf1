"""CPU training throughput: the project's loop (`xrayfm.train.fit`) next to a bare timm forward+backward.

Both train the same model on the same batch size. The bare loop feeds one random batch held in memory
(model + loss + AdamW + clipping, nothing else); the project's loop reads a memory-mapped cache of
synthetic phantoms, applies the transforms, masks the loss, logs, and schedules the LR. The ratio says
what the engine costs on top of the model itself. Steady-state rates: the first steps (warm-up) are left out.

    PYTHONPATH=shared/src .venv/bin/python bench/bench_train.py            # defaults: tiny ViT, 64 px
    PYTHONPATH=shared/src .venv/bin/python bench/bench_train.py --augment --batch-size 64 --json
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from xrayfm.data import open_dataset
from xrayfm.data.cache import prepare_cache
from xrayfm.data.synth import synth_chest
from xrayfm.models.backbones import create_model
from xrayfm.train import PretrainConfig, pretrain
from xrayfm.train.artifacts import model_spec

LABELS = ["Cardiomegaly", "Pleural Effusion", "Lung Opacity"]


def bare_images_per_s(spec: dict, batch: int, steps: int, warmup: int) -> float:
    """Images/s of a bare timm training step on one random batch."""
    torch.manual_seed(0)
    model = create_model(**spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, spec.get("in_chans", 3), spec["img_size"], spec["img_size"])
    targets = (torch.rand(batch, spec["num_classes"]) > 0.5).float()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def loop_images_per_s(config: PretrainConfig, warmup: int) -> float:
    """Images/s of the project's loop, from its per-step log (steps after ``warmup``, validation excluded)."""
    summary = pretrain(config)
    rows = list(csv.DictReader(open(Path(config.out) / "log.csv")))
    first, last = rows[warmup - 1], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    return steps * summary["global_batch"] / (float(last["elapsed_s"]) - float(first["elapsed_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument(
        "--model-kwargs",
        default='{"patch_size": 16, "depth": 4, "embed_dim": 192, "num_heads": 3}',
        help="timm model arguments as JSON",
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--augment", action="store_true", help="the loop also augments (bare loop never does)"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the project's loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    steps_needed = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        n_images = (steps_needed + 1) * args.batch_size * 10 // 9 + 16  # ~10% goes to the validation split
        root = Path(tmp) / "CheXpert-synthetic"
        synth_chest(root, n=n_images, seed=0, size=args.size, valid_fraction=0.05, progress=False)
        cache = Path(tmp) / "cache"
        prepare_cache(open_dataset("chexpert", root, split="train"), cache, size=args.size, progress=False)
        config = PretrainConfig(
            out=str(Path(tmp) / "run"),
            cache=str(cache),
            labels=LABELS,
            size=args.size,
            model=args.model,
            model_kwargs=json.loads(args.model_kwargs),
            epochs=1,
            max_steps=steps_needed,
            batch_size=args.batch_size,
            augment=args.augment,
            drop_path_rate=0.0,
            val_fraction=0.05,
            num_workers=args.num_workers,
            log_every=1,
            tensorboard=False,
            progress_bar=False,
            device="cpu",
        )
        loop = loop_images_per_s(config, args.warmup)
    bare = bare_images_per_s(model_spec(config, len(LABELS)), args.batch_size, args.steps, args.warmup)
    result = {
        "model": args.model,
        "model_kwargs": json.loads(args.model_kwargs),
        "size": args.size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "augment": args.augment,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "bare_images_per_s": round(bare, 1),
        "loop_images_per_s": round(loop, 1),
        "loop_over_bare": round(loop / bare, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.model} {result['model_kwargs']} at {args.size} px, batch {args.batch_size}, "
        f"{result['threads']} threads, augment={args.augment}"
    )
    print(f"{'bare timm step':>22s}: {bare:8.1f} images/s")
    print(f"{'xrayfm training loop':>22s}: {loop:8.1f} images/s")
    print(f"{'loop / bare':>22s}: {loop / bare:8.3f}")


if __name__ == "__main__":
    main()
