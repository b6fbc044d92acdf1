"""Benchmark: predict + attention rollout vs predict alone, CPU, batch 1 (goal: rollout adds <= 15%).

    PYTHONPATH=shared/src .venv/bin/python bench/bench_rollout.py [--models vit_base_patch16_224 ...]

Random-init timm ViTs (no weights are downloaded). "predict" is a plain forward with timm's default
(fused) attention; "predict+rollout" is xrayfm's single forward that also captures attention (unfused) and
rolls it out. "unfused" is a plain forward with fused attention off, to show where the cost comes from.
Timings are interleaved (A, B, C, A, B, C, ...) and the median is reported, to be fair under load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from timm.layers import Attention

from xrayfm.explain import predict_with_rollout


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _unfused_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        return model(x)
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused


def bench(name: str, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per batch-1 call of each variant for the timm model `name`."""
    model = timm.create_model(name, pretrained=False, num_classes=14).eval()
    size = model.default_cfg["input_size"][-2:]
    x = torch.randn(1, 3, *size)
    variants = {
        "predict": lambda: model(x),
        "unfused": lambda: _unfused_forward(model, x),
        "predict+rollout": lambda: predict_with_rollout(model, x),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        for _ in range(repeats):
            for key, fn in variants.items():
                times[key].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, CPU threads {torch.get_num_threads()}, batch 1"
    )
    header = f"{'model':28s} {'predict ms':>11s} {'unfused ms':>11s} {'+rollout ms':>12s} {'ratio':>7s}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        t = bench(name, args.repeats, args.warmup)
        ratio = t["predict+rollout"] / t["predict"]
        flag = "ok" if ratio <= 1.15 else "over 15%"
        print(
            f"{name:28s} {t['predict'] * 1e3:11.1f} {t['unfused'] * 1e3:11.1f} "
            f"{t['predict+rollout'] * 1e3:12.1f} {ratio:7.3f}  {flag}"
        )


if __name__ == "__main__":
    main()
