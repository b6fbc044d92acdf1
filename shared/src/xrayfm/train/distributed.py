"""torchrun / DDP plumbing: who am I, the global batch split, sums and gathers across processes.

Launch several processes with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
a plain ``python`` run is a world of one and none of this does anything. NCCL on GPUs, gloo on CPU.
Only rank 0 writes checkpoints and logs; every rank holds the whole (memory-mapped) dataset and reads
its own share of each global batch (see :mod:`xrayfm.train.sampler`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from xrayfm.errors import XrayfmError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (absent: a single process)."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise XrayfmError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise XrayfmError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank, world, local)


def setup(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group when launched by torchrun; pick this process's device.

    ``device``: ``auto`` (this rank's GPU when CUDA is available, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
    """
    env = env_from_environ()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise XrayfmError(f"device {device!r} asked for but CUDA is not available")
        dev = torch.device(f"cuda:{env.local_rank}") if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if env.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return env, dev


def teardown() -> None:
    """Leave the process group (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for a single process)."""
    if env.enabled:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``value`` over ranks (a new tensor; ``value`` itself is left unchanged)."""
    out = value.detach().clone()
    if env.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_flag(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (e.g. a cancel request seen by rank 0 only)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_rows(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` [n_rank, ...] along dim 0 in rank order (n may differ per rank).

    ``all_gather`` needs equal shapes, so each rank pads to the largest count and the padding is cut off.
    """
    if not env.enabled:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(env.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def max_weight_difference(model: nn.Module, env: DistEnv) -> float:
    """Largest absolute difference between this rank's parameters and rank 0's (0.0 for one process).

    A cheap end-of-training check that the ranks stayed in sync.
    """
    if not env.enabled:
        return 0.0
    worst = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())


__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "barrier",
    "broadcast_flag",
    "env_from_environ",
    "gather_rows",
    "max_weight_difference",
    "setup",
    "teardown",
]
