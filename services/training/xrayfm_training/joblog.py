"""A job's own log: ``job.log`` in its run folder (whole) and its last lines in Redis (for the API and UI).

Lines are the worker's events about this job (start, resume, epoch metrics, lost workers, a failure); never
images or patient fields. Each line also goes to the worker's log. A failure's traceback, which may quote
the data it failed on, goes to ``job.log`` and the worker's log only, not to Redis and so not to the API.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from xrayfm_stack.jobs import JobRecords

log = logging.getLogger("xrayfm.training")


class JobLog:
    """Write lines to one job's log; a failing write never stops the job (logs are best effort)."""

    def __init__(self, records: JobRecords, job_id: str, run_dir: Path | None = None) -> None:
        self.records, self.job_id = records, job_id
        self.path = None if run_dir is None else Path(run_dir) / "job.log"
        self._last_progress = 0.0
        self._last_metrics: Any = None
        self._folder_made = False

    def __call__(self, message: str, level: int = logging.INFO, detail: str | None = None) -> None:
        """Log `message` everywhere; `detail` (a traceback, which may quote data) only to ``job.log`` and the
        worker's own log, never to Redis, from where the API serves the log."""
        log.log(level, "job %s: %s%s", self.job_id, message, f"\n{detail}" if detail else "")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        line = f"{stamp} {logging.getLevelName(level)} {message}"
        try:
            self.records.append_log(self.job_id, line)
        except Exception:
            log.warning("job %s: could not append to its Redis log", self.job_id)
        if self.path is not None:
            try:
                if not self._folder_made:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._folder_made = True
                with self.path.open("a") as handle:
                    handle.write(line + "\n" + (detail.rstrip() + "\n" if detail else ""))
            except OSError:
                log.warning("job %s: could not write %s", self.job_id, self.path)

    def progress(self, info: dict[str, Any], every_s: float = 30.0) -> None:
        """A progress line: at each new set of validation metrics, at the end, else at most every `every_s`."""
        now = time.monotonic()
        metrics = info.get("metrics") or None
        new_metrics = metrics is not None and metrics != self._last_metrics
        finished = info.get("step") == info.get("total_steps")
        if not (new_metrics or finished or now - self._last_progress >= every_s):
            return
        self._last_progress, self._last_metrics = now, metrics
        parts = [f"epoch {info.get('epoch')}", f"step {info.get('step')}/{info.get('total_steps')}"]
        if isinstance(info.get("loss"), int | float):
            parts.append(f"loss {info['loss']:.4f}")
        if isinstance(info.get("eta_s"), int | float):
            parts.append(f"ETA {info['eta_s'] / 60:.1f} min")
        if new_metrics:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                     if not isinstance(v, dict | list) and k not in ("epoch", "step")}  # fmt: skip
            parts.append(f"validation {shown}")
        self(", ".join(parts))
