"""What a run writes as it goes: ``log.csv`` (per logged step), ``metrics.csv`` (per epoch), TensorBoard.

Only rank 0 logs (``enabled=False`` elsewhere). On resume, rows written after the resumed step (by the
run that was killed) are dropped, and TensorBoard purges its events after that step, so the logs of a
resumed run read like those of an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

STEP_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"]
EPOCH_BASE_COLUMNS = ["epoch", "step", "val_loss", "mean_auroc", "improved", "seconds"]


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep only the rows of ``path`` whose step is at most ``last_step``."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= last_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


class RunLog:
    """Per-step and per-epoch logs of one run (CSV + optional TensorBoard)."""

    def __init__(
        self, out: Path, enabled: bool, label_names: list[str], resume_step: int = 0, tensorboard: bool = True
    ) -> None:
        self.enabled = enabled
        self.steps_path, self.epochs_path = out / "log.csv", out / "metrics.csv"
        self.epoch_columns = EPOCH_BASE_COLUMNS + [f"auroc/{n}" for n in label_names]
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step > 0:
            _truncate_csv(self.steps_path, resume_step)
            _truncate_csv(self.epochs_path, resume_step)
        else:
            for path in (self.steps_path, self.epochs_path):
                path.unlink(missing_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )

    def _append(self, path: Path, columns: list[str], row: dict[str, Any]) -> None:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _clean(row.get(k)) for k in columns})

    def step(self, row: dict[str, Any]) -> None:
        """Log one training step (``STEP_COLUMNS``)."""
        if not self.enabled:
            return
        self._append(self.steps_path, STEP_COLUMNS, row)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_s"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def epoch(self, row: dict[str, Any]) -> None:
        """Log one validation (``EPOCH_BASE_COLUMNS`` + per-label AUROC)."""
        if not self.enabled:
            return
        self._append(self.epochs_path, self.epoch_columns, row)
        if self.writer is not None:
            for key in self.epoch_columns[2:]:
                value = row.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"val/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = ["RunLog"]
