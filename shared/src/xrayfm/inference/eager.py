"""The torch predictor: a checkpoint loaded as a torch model (:func:`load_served_model`) and run eagerly
(:class:`Predictor`), every explanation method included (rollout, gradient rollout, Grad-CAM). Imported
from :mod:`xrayfm.inference` on first use, so that the torch-free serving path never loads torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xrayfm.data.images import fit_square
from xrayfm.data.transforms import build_transform
from xrayfm.domain.features import capture_features
from xrayfm.errors import XrayfmError
from xrayfm.explain import explain, gradcam, methods_for, predict_with_rollout
from xrayfm.inference import PredictorBase, ServedModel
from xrayfm.models.checkpoint import load_any
from xrayfm.registry import resolve_checkpoint_dir


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device when present, else the CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XrayfmError(f"XRAYFM_DEVICE={requested} but no CUDA device is available")
    return device


def load_served_model(
    path: str | Path, device: str = "auto", *, name: str | None = None, version: str | None = None
) -> ServedModel:
    """Load a checkpoint folder (full or LoRA-adapted) for inference: on `device`, eval mode, frozen.

    `name`/`version` (e.g. from a model store) are used when the metadata does not carry its own.
    """
    path = resolve_checkpoint_dir(path)  # a shipped model's name (xrayfm/...) is its folder in the package
    model, meta = load_any(path)
    target = pick_device(device)
    model = model.to(target).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    served = ServedModel.from_checkpoint(path, dict(meta), model, target, name, version)
    _check_outputs(served)
    return served


def _check_outputs(served: ServedModel) -> None:
    """One dummy forward: the head must have one output per label (caught at start, not per request)."""
    pre = served.preprocessing
    dummy = torch.zeros(1, pre.channels, pre.size, pre.size, device=served.device)
    with torch.no_grad():
        out = served.model(dummy)
    if out.ndim != 2 or out.shape[1] != len(served.labels):
        raise XrayfmError(
            f"model {served.name} outputs {tuple(out.shape)}, "
            f"but its metadata lists {len(served.labels)} labels"
        )


class Predictor(PredictorBase):
    """Runs the served torch model on batches; thread-compatible (one batch at a time, from the batcher)."""

    def __init__(self, served: ServedModel) -> None:
        super().__init__(served)
        pre = served.preprocessing
        self.transform = build_transform(
            train=False, size=pre.size, mean=pre.mean, std=pre.std, channels=pre.channels
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """The explanation methods this model supports, its default first (ViT: rollout, grad_rollout;
        CNN: gradcam). The others raise an XrayfmError ("rollout needs a ViT" on a CNN)."""
        return methods_for(self.served.model)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 H x W images -> a normalised float batch [B, C, S, S] on the model's device."""
        pre = self.served.preprocessing
        tensors = [self.transform(torch.tensor(fit_square(img, pre.size, pre.mode))[None]) for img in images]
        return torch.stack(tensors).to(self.served.device)

    def forward(
        self, batch: torch.Tensor, explain_maps: bool, method: str | None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits [B, L] and, when asked, explanation maps [B, h, w] in [0, 1] (`method` None: the
        model's default)."""
        model = self.served.model
        if not explain_maps:
            with torch.inference_mode():
                return model(batch), None
        method = self.method(method)
        if method == "rollout":
            logits, maps = predict_with_rollout(model, batch)  # one pass gives both
            return logits, maps.detach().cpu().numpy()
        with torch.no_grad():
            logits = model(batch)
        if method == "gradcam" and len(self.served.labels) == 1 and not self.served.multiclass:
            # One output: map the evidence for the decision shown, the label's when it is predicted,
            # against it (the negated logit) when the answer is the negative label. The label's own map
            # is often all zero for a negative answer (Grad-CAM keeps positive evidence only).
            positive = self.served.probabilities(logits)[:, 0] >= self.served.threshold
            sign = torch.where(torch.as_tensor(positive), 1.0, -1.0)
            return logits, gradcam(model, batch, 0, sign=sign).detach().cpu().numpy()
        return logits, explain(model, batch, method=method)  # class-specific: each image's top class

    def run(
        self, batch: torch.Tensor, explain_maps: bool, method: str | None
    ) -> tuple[torch.Tensor | np.ndarray, np.ndarray | None, str, np.ndarray | None]:
        """:meth:`forward` plus the name of the runtime that ran it (a subclass may fall back to torch)
        and the features [B, D] the domain gate scores (captured from the same forward pass)."""
        with capture_features(self.served.model) as record:
            logits, maps = self.forward(batch, explain_maps, method)
        features = None if record.features is None else record.features.detach().float().cpu().numpy()
        return logits, maps, self.runtime, features

    def synchronize(self, batch: torch.Tensor) -> None:
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)

    def release_memory(self) -> None:
        """Give cached GPU memory back (after a batch too large for it)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
