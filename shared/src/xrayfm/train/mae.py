"""Masked-autoencoder (MAE, He et al. 2022) pre-training of a timm ViT on a pooled, unlabelled corpus.

``xrayfm pretrain --objective mae``: each image is cut into patches, a random ``mask_ratio`` of them
(75 %) is hidden, the encoder (the timm ``VisionTransformer`` that ``adapt`` builds, made by
:func:`xrayfm.models.backbones.create_model`) sees only the visible ones, and a small decoder (timm
``Block``\\s, fixed 2-D sin-cos positions) predicts the hidden patches' pixels. The loss is the MSE on
hidden patches of per-patch normalised grey pixels (``norm_pix_loss``). ``best/`` holds the encoder
alone, a plain xrayfm checkpoint that ``adapt --foundation`` loads for LoRA, linear or full tuning.

Hand-written rather than ``lightly``: lightly 1.6 would bring pytorch-lightning and hydra-core into
every image (hard requirements, though its MAE modules need neither), and its ``random_token_mask``
draws one mask per *batch* from the global RNG. Here the mask of a sample is seeded by (seed, epoch,
sample), like its augmentation (:class:`MaskedView`), so a resumed run and a run on N processes see
exactly the masks of an uninterrupted single-process run; what remains is ~100 lines on timm's blocks.

The grey radiograph is repeated to the encoder's channels, so the target is the channel mean (the grey
image, up to an affine map that the per-patch normalisation removes): ``patch**2`` values per patch.
The training loop is the shared one (:func:`xrayfm.train.loop.fit`: bf16 on CUDA, DDP under torchrun,
exact resume, progress, logs) with this module's step loss and validation (reconstruction loss of the
validation images under fixed masks; it picks ``best/``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xrayfm.data.splits import split_by_patient
from xrayfm.data.transforms import build_transform, normalization_for
from xrayfm.errors import DataError, XrayfmError
from xrayfm.models.backbones import create_model
from xrayfm.models.checkpoint import save_checkpoint
from xrayfm.train.artifacts import model_spec, preprocessing
from xrayfm.train.config import PretrainConfig
from xrayfm.train.data import TaskData, describe_views
from xrayfm.train.distributed import DistEnv, all_reduce_sum, setup, teardown
from xrayfm.train.loop import fit, use_bf16
from xrayfm.train.pool import build_pool, draw_weights
from xrayfm.train.sampler import SeededView, mix_seed, shard_batches

MASK_STREAM = 0x4D4145  # "MAE": keeps the mask noise apart from the augmentation stream of a sample


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [H*W, dim] (MAE's): half the channels per axis."""
    if dim % 4:
        raise XrayfmError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        angles = axis[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, patch*patch*C], patches in row-major order (the ViT's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def split_by_noise(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept patch indices [B, K], restore order [B, L], mask [B, L] with 1 = hidden) from noise [B, L].

    The patches with the lowest noise stay visible; every sample keeps the same number K.
    """
    length = noise.shape[1]
    keep = max(1, int(round(length * (1 - mask_ratio))))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    return shuffle[:, :keep], restore, torch.gather(mask, 1, restore)


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder on the visible patches + a light decoder; ``forward`` returns the loss."""

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        init_encoder_positions: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.pos_embed is None:
            raise XrayfmError(
                f"mae needs a timm VisionTransformer with a position embedding (vit_*), got {type(encoder).__name__}"
            )
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, float(mask_ratio), bool(norm_pix_loss)
        embed = encoder.patch_embed
        self.patch = int(embed.patch_size[0])
        self.grid = tuple(int(g) for g in embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        if init_encoder_positions:  # MAE starts from sin-cos positions (they stay trainable here)
            with torch.no_grad():
                encoder.pos_embed[:, prefix:] = sincos_2d(self.grid, encoder.embed_dim)
                encoder.pos_embed[:, :prefix] = 0

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_2d(self.grid, decoder_dim)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch)  # grey pixels of a patch
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "encoder.cls_token", "encoder.reg_token", "mask_token"}

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, prefix + K, D] of the visible patches (positions added before dropping)."""
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(images))
        prefix = enc.num_prefix_tokens
        visible = torch.gather(x[:, prefix:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], visible], dim=1)
        return enc.norm(enc.blocks(enc.norm_pre(x)))

    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted patches [B, L, patch**2], mask [B, L] with 1 = hidden)."""
        keep, restore, mask = split_by_noise(noise, self.mask_ratio)
        x = self.decoder_embed(self.encode_visible(images, keep)[:, self.encoder.num_prefix_tokens :])
        hidden = self.mask_token.expand(x.shape[0], self.num_patches - x.shape[1], -1)
        x = torch.gather(torch.cat([x, hidden], dim=1), 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = self.decoder_blocks(x + self.decoder_pos)
        return self.decoder_pred(self.decoder_norm(x)), mask

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: the grey patches, each normalised when ``norm_pix_loss``."""
        target = patchify(images.float().mean(dim=1, keepdim=True), self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches of the batch."""
        pred, mask = self.reconstruct(images, noise)
        per_patch = (pred.float() - self.target(images)).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskedView(SeededView):
    """A SeededView whose items also carry ``noise`` [L]: the sample's mask, seeded by (seed, epoch, sample)."""

    def __init__(self, base: Any, transform: Callable, seed: int, rows: Any, num_patches: int) -> None:
        super().__init__(base, transform, seed, rows)
        self.num_patches = int(num_patches)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        item = super().__getitem__(key)
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, MASK_STREAM))
        item["noise"] = torch.rand(self.num_patches, generator=generator)
        return item


def mae_step_loss(forward: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The loop's step loss: this rank's mean reconstruction error (equal shares, so DDP's mean is exact)."""
    return forward(batch["image"], batch["noise"])


@torch.no_grad()
def reconstruction_loss(
    model: MaskedAutoencoder,
    view: MaskedView,
    batch_size: int,
    env: DistEnv,
    device: torch.device,
    bf16: bool = False,
    num_workers: int = 0,
    progress: bool = False,
) -> float:
    """Mean reconstruction loss of ``view`` under its fixed (epoch 0) masks, over all processes."""
    batches = shard_batches(len(view), batch_size, env.rank, env.world_size)
    loader = DataLoader(
        view, batch_sampler=batches, num_workers=num_workers, generator=torch.Generator().manual_seed(0)
    )
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for batch in tqdm(loader, desc="validate", leave=False, disable=not (progress and env.is_main)):
        images, noise = batch["image"].to(device), batch["noise"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(images, noise)
        total += loss.double() * len(images)
        count += len(images)
    model.train(was_training)
    total, count = all_reduce_sum(total, env), all_reduce_sum(count, env)
    return float(total / count.clamp_min(1))


def pretrain_mae(
    config: PretrainConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """MAE pre-training of ``config.model`` on ``config.pool`` (or the one dataset/cache); the run summary.

    Writes what supervised pre-training writes; ``best/`` is the encoder (num_classes 0) with the pool,
    its per-source counts and the recipe in ``meta.json``. Under torchrun every process calls this.
    """
    config.validate()
    if config.objective != "mae":
        raise XrayfmError(f"pretrain_mae got objective {config.objective!r}")
    config = dataclasses.replace(config, metric="val_loss")  # the reconstruction loss picks best/
    env, device = setup(config.device)
    try:
        out = Path(config.out)
        mean, std = normalization_for(config.model)
        pool = build_pool(config, env)
        if pool.images.size != int(config.size):
            raise DataError(
                f"the pool caches hold {pool.images.size} px images, the model expects {config.size}"
            )
        spec = model_spec(config, 0)
        torch.manual_seed(config.seed)
        pretrained: bool | str = False
        if config.pretrained:
            pretrained = True if config.pretrained == "timm" else config.pretrained
        encoder = create_model(**spec, pretrained=pretrained)
        model = MaskedAutoencoder(
            encoder,
            config.mask_ratio,
            config.decoder_dim,
            config.decoder_depth,
            config.decoder_heads,
            config.norm_pix_loss,
            init_encoder_positions=not pretrained,
        )
        train_rows, val_rows = split_by_patient(pool.images, config.val_fraction, seed=config.split_seed)
        size, channels, n = int(config.size), config.channels, model.num_patches
        train_tf = build_transform(config.augment, size, mean, std, channels, hflip=config.hflip)
        val_tf = build_transform(False, size, mean, std, channels)
        info = {
            "train_cache": {
                "pool": [s["cache"] for s in pool.info["sources"]],
                "synthetic": pool.info["synthetic"],
            },
            "validation": "patient split of the pool",
            "val_fraction": config.val_fraction,
            "seed": config.split_seed,
        }
        data = TaskData(
            MaskedView(pool.images, train_tf, config.seed, train_rows, n),
            MaskedView(pool.images, val_tf, config.seed, val_rows, n),
            [],
            info,
            draw_weights(pool.images, pool.info, train_rows),
        )
        data_info = describe_views(data)
        recipe = {
            "name": "mae",
            "mask_ratio": config.mask_ratio,
            "decoder": {
                "dim": config.decoder_dim,
                "depth": config.decoder_depth,
                "heads": config.decoder_heads,
            },
            "norm_pix_loss": config.norm_pix_loss,
            "target": f"grey {model.patch}x{model.patch} patches",
        }
        meta: dict[str, Any] = {
            "kind": "foundation",
            "task": "self-supervised",
            "objective": recipe,
            "labels": [],
            "preprocessing": preprocessing(config, mean, std),
            "data": {**data_info, "pool": pool.info},
            "manifest_sha256": data_info["manifest_sha256"],
            "training": config.to_dict(),
        }
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config.to_json(out / "config.json")

        def save_best(best_model: nn.Module, path: Path, metrics: dict[str, Any]) -> None:
            save_checkpoint(path, best_model.encoder, {**meta, "model": spec, "metrics": metrics})

        def validate(current: nn.Module) -> dict[str, Any]:
            batch = config.eval_batch_size or 2 * config.batch_size
            bf16 = use_bf16(config, device)
            loss = reconstruction_loss(
                current, data.val, batch, env, device, bf16, config.num_workers, config.progress_bar
            )
            return {"val_loss": loss}

        summary = fit(
            model,
            data,
            config,
            save_best,
            env=env,
            device=device,
            progress=progress,
            should_cancel=should_cancel,
            step_loss=mae_step_loss,
            validate=validate,
        )
        return {
            "command": "pretrain",
            "objective": "mae",
            "out": str(out),
            **summary,
            "data": data_info,
            "pool": pool.info,
            "labels": [],
            "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        }
    finally:
        teardown()


__all__ = [
    "MaskedAutoencoder",
    "MaskedView",
    "mae_step_loss",
    "patchify",
    "pretrain_mae",
    "reconstruction_loss",
    "sincos_2d",
    "split_by_noise",
]
