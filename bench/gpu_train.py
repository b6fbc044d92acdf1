"""GPU training throughput of ViT-B/16 at 224 px: a plain fp32 loop against a tuned one, plus LoRA and the
project's own loop, each next to the ceiling that the measured bf16 matmul rate allows.

Configurations (random data already on the GPU, so the model's compute is what is measured):

- ``fp32-eager``:   fp32, batch 32, eager, timm's fused attention OFF, TF32 off, AdamW (foreach).
- ``bf16-tuned``:   bf16 autocast, fused attention (scaled_dot_product_attention), batch 128,
                    torch.compile, fused AdamW, TF32 on.
- ``lora-tuned``:   as bf16-tuned with PEFT LoRA (rank 8 on qkv, head trainable): frozen backbone.
- ``mae-tuned``:    as bf16-tuned, the MAE objective (``xrayfm.train.mae``): the encoder sees 25 % of the
                    patches, a 512-wide 8-block decoder (MAE's) all of them; its own ceiling.
- ``xrayfm-loop``:  the project's loop (`xrayfm.train.fit`: bf16, compile, DataLoader workers) on a
                    synthetic-phantom cache: adds data loading, masking, logging (skip with --no-loop).
- ``xrayfm-loop-mae``: the same loop with ``--objective mae``.

Ceiling: images/s = measured dense bf16 matmul FLOP/s / FLOP per training image (~3 x forward:
6 N T + 12 L T^2 D for a ViT with N parameters, T tokens, L blocks, width D; ~106 GFLOP for ViT-B/16;
for MAE the sum of the encoder on the visible tokens and the decoder on all tokens).

    python bench/gpu_train.py                 # on a GPU machine
    python bench/gpu_train.py --smoke         # tiny sizes on CPU: checks that the script works
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Setup:
    name: str
    batch: int
    bf16: bool
    compile: bool
    fused_attn: bool
    lora: bool = False
    mae: bool = False


# MAE's decoder for ViT-B (He et al. 2022); the smoke run uses a tiny one.
MAE_DECODER = {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
SMOKE_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
MASK_RATIO = 0.75


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int, repeats: int) -> float:
    """Measured dense matmul FLOP/s in bf16 (the ceiling's numerator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def vit_train_flops(model: torch.nn.Module) -> float:
    """FLOP per training image of a timm ViT: 6 N T (matmuls, forward + backward) + 12 L T^2 D (attention)."""
    n = sum(p.numel() for p in model.parameters())
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    depth, width = len(model.blocks), model.embed_dim
    return 6 * n * tokens + 12 * depth * tokens**2 * width


def mae_train_flops(encoder: torch.nn.Module, decoder_dim: int, decoder_depth: int) -> float:
    """FLOP per MAE training image: the encoder on the visible tokens + the decoder on all tokens."""
    n_enc = sum(p.numel() for p in encoder.parameters())
    tokens = encoder.patch_embed.num_patches
    visible = round(tokens * (1 - MASK_RATIO)) + getattr(encoder, "num_prefix_tokens", 1)
    n_dec = decoder_depth * 12 * decoder_dim**2
    return (
        6 * n_enc * visible
        + 12 * len(encoder.blocks) * visible**2 * encoder.embed_dim
        + 6 * n_dec * tokens
        + 12 * decoder_depth * tokens**2 * decoder_dim
    )


def build(spec: dict[str, Any], setup: Setup, device: torch.device, decoder: dict[str, int] | None = None):
    import timm.layers

    from xrayfm.models.backbones import create_model
    from xrayfm.models.lora import LoraSettings, apply_lora

    timm.layers.set_fused_attn(setup.fused_attn)  # read when the attention modules are built
    torch.manual_seed(0)
    if setup.mae:
        from xrayfm.train.mae import MaskedAutoencoder

        encoder = create_model(**{**spec, "num_classes": 0})
        model = MaskedAutoencoder(encoder, MASK_RATIO, norm_pix_loss=True, **(decoder or MAE_DECODER))
    else:
        model = create_model(**spec)
    if setup.lora:
        model = apply_lora(model, LoraSettings(rank=8, alpha=16, dropout=0.0, targets=("qkv",)))
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" and setup.bf16)
    forward = torch.compile(model) if setup.compile else model
    return model, forward, optimizer, params


def images_per_s(
    spec: dict[str, Any],
    setup: Setup,
    device: torch.device,
    steps: int,
    warmup: int,
    decoder: dict[str, int] | None = None,
) -> dict:
    """Steady-state images/s and peak memory of one configuration."""
    torch.backends.cuda.matmul.allow_tf32 = setup.bf16
    torch.backends.cudnn.allow_tf32 = setup.bf16
    model, forward, optimizer, params = build(spec, setup, device, decoder)
    images = torch.randn(setup.batch, 3, spec["img_size"], spec["img_size"], device=device)
    targets = (torch.rand(setup.batch, spec["num_classes"], device=device) > 0.5).float()
    noise = torch.rand(setup.batch, model.num_patches, device=device) if setup.mae else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if setup.bf16 else nullcontext()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            if setup.mae:
                loss = forward(images, noise)
            else:
                logits = forward(images)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    sync(device)
    rate = steps * setup.batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    trainable = sum(p.numel() for p in params)
    del model, forward, optimizer
    return {"images_per_s": rate, "peak_gib": peak, "trainable_params": trainable}


def project_loop(
    spec_kwargs: dict,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    compile: bool,
    workers: int,
    device: str,
    mae: dict[str, int] | None = None,
) -> float:
    """Images/s of `xrayfm.train` on a synthetic cache (steady state, from its per-step log); ``mae``:
    the MAE objective with this decoder."""
    import csv

    from xrayfm.data import open_dataset
    from xrayfm.data.cache import prepare_cache
    from xrayfm.data.synth import synth_chest
    from xrayfm.train import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        n = (warmup + steps + 1) * batch * 10 // 9 + 16
        root = Path(tmp) / "CheXpert-synthetic"
        synth_chest(root, n=n, seed=0, size=size, valid_fraction=0.05, progress=False)
        prepare_cache(
            open_dataset("chexpert", root, split="train"), Path(tmp) / "cache", size=size, progress=False
        )
        config = PretrainConfig(
            out=str(Path(tmp) / "run"),
            cache=str(Path(tmp) / "cache"),
            size=size,
            model=spec_kwargs["name"],
            model_kwargs={
                k: v for k, v in spec_kwargs.items() if k not in ("name", "img_size", "num_classes")
            },
            labels=None if mae else ["Cardiomegaly", "Pleural Effusion", "Lung Opacity"],
            **({"objective": "mae", "mask_ratio": MASK_RATIO, **mae} if mae else {}),
            epochs=1,
            max_steps=warmup + steps,
            batch_size=batch,
            augment=False,
            drop_path_rate=0.0,
            val_fraction=0.05,
            compile=compile,
            num_workers=workers,
            log_every=1,
            tensorboard=False,
            progress_bar=False,
            device=device,
        )
        pretrain(config)
        rows = list(csv.DictReader(open(Path(tmp) / "run" / "log.csv")))
    first, last = rows[warmup - 1], rows[-1]
    return (
        (int(last["step"]) - int(first["step"]))
        * batch
        / (float(last["elapsed_s"]) - float(first["elapsed_s"]))
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny ViT, few steps, CPU allowed: checks the script"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument(
        "--warmup", type=int, default=8, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--tuned-batch", type=int, default=128, help="batch of the tuned configurations")
    parser.add_argument("--no-loop", action="store_true", help="skip the project-loop measurement")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the project loop")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no GPU here: run with --smoke to check the script on CPU")
    if args.smoke:
        spec = dict(
            name="vit_tiny_patch16_224",
            num_classes=14,
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=48,
            num_heads=2,
        )
        base_batch, tuned_batch, steps, warmup, n = 4, 8, 2, 1, 256
        compile_ok = device.type == "cuda"  # inductor on CPU needs a compiler toolchain and minutes
        decoder = SMOKE_DECODER
    else:
        spec = dict(name="vit_base_patch16_224", num_classes=14, img_size=224)
        base_batch, tuned_batch, steps, warmup, n = 32, args.tuned_batch, args.steps, args.warmup, 8192
        compile_ok = True
        decoder = MAE_DECODER

    from xrayfm.models.backbones import create_model

    with torch.device("meta"):
        flops_per_image = vit_train_flops(create_model(**spec))
        mae_flops = mae_train_flops(
            create_model(**{**spec, "num_classes": 0}), decoder["decoder_dim"], decoder["decoder_depth"]
        )
    peak = matmul_flops(device, n, repeats=20 if not args.smoke else 3)
    ceiling, mae_ceiling = peak / flops_per_image, peak / mae_flops
    setups = [
        Setup("fp32-eager", base_batch, bf16=False, compile=False, fused_attn=False),
        Setup("bf16-tuned", tuned_batch, bf16=True, compile=compile_ok, fused_attn=True),
        Setup("lora-tuned", tuned_batch, bf16=True, compile=compile_ok, fused_attn=True, lora=True),
        Setup("mae-tuned", tuned_batch, bf16=True, compile=compile_ok, fused_attn=True, mae=True),
    ]
    rows = []
    for setup in setups:
        r = images_per_s(spec, setup, device, steps, warmup, decoder)
        limit = mae_ceiling if setup.mae else ceiling
        rows.append({**setup.__dict__, **r, "of_ceiling": r["images_per_s"] / limit})
    loops = (
        [] if args.no_loop else [("xrayfm-loop", None, ceiling), ("xrayfm-loop-mae", decoder, mae_ceiling)]
    )
    for name, mae, limit in loops:
        rate = project_loop(
            spec,
            spec["img_size"],
            tuned_batch,
            steps,
            warmup,
            compile_ok,
            0 if args.smoke else args.workers,
            device.type,
            mae,
        )
        rows.append(
            {
                "name": name,
                "batch": tuned_batch,
                "bf16": device.type == "cuda",
                "compile": compile_ok,
                "fused_attn": True,
                "lora": False,
                "mae": mae is not None,
                "images_per_s": rate,
                "peak_gib": None,
                "trainable_params": None,
                "of_ceiling": rate / limit,
            }
        )

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": spec,
        "bf16_matmul_tflops": peak / 1e12,
        "train_gflop_per_image": flops_per_image / 1e9,
        "ceiling_images_per_s": ceiling,
        "mae_decoder": decoder,
        "mae_train_gflop_per_image": mae_flops / 1e9,
        "mae_ceiling_images_per_s": mae_ceiling,
        "rows": rows,
        "smoke": args.smoke,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['device']}: bf16 matmul {peak / 1e12:.3f} TFLOP/s; {flops_per_image / 1e9:.3f} GFLOP per training "
        f"image -> ceiling {ceiling:,.0f} images/s; MAE {mae_flops / 1e9:.3f} GFLOP -> {mae_ceiling:,.0f} images/s"
    )
    print(
        f"{'config':15s} {'batch':>5s} {'images/s':>10s} {'of ceiling':>10s} {'peak GiB':>8s} {'trainable':>12s}"
    )
    for r in rows:
        mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        trainable = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        print(
            f"{r['name']:15s} {r['batch']:5d} {r['images_per_s']:10.1f} {100 * r['of_ceiling']:9.1f}% {mem:>8s} "
            f"{trainable:>12s}"
        )
    base = rows[0]["images_per_s"]
    print("of ceiling: MAE rows against the MAE ceiling, the others against the supervised one")
    print(
        "speed-up over fp32-eager: "
        + ", ".join(f"{r['name']} x{r['images_per_s'] / base:.2f}" for r in rows[1:])
    )


if __name__ == "__main__":
    main()
