"""Orphaned jobs: a job whose worker died (killed, node lost, out of memory) is queued again.

Celery on Redis would redeliver the dead worker's message only after the visibility timeout (hours, so
that long jobs are not redelivered while they run). Instead, every training worker checks, every lock TTL,
for jobs that say they are running but whose lock lapsed: nobody renews it, so their worker is gone. Such
a job is queued again (and resumes from its run folder's ``last/``); one being cancelled becomes
cancelled; one whose worker died ``max_attempts`` times fails, with the reason (a job handed back by a
worker that was shut down cleanly does not count: it saved its state and lost nothing). The check and the
status change are one atomic Redis step (:meth:`JobRecords.claim_orphan`), so two workers never both
re-queue a job and a job finishing at that moment is never touched. The late redelivery of the original
message, if it ever comes, finds the job finished or locked and is dropped (xrayfm_training.worker). The
first-start bootstrap (xrayfm_training.bootstrap) is watched the same way: under way without its lock, it
is queued again and carries on with the jobs it had created. And a job recorded as queued whose message
the broker lost (:func:`reconcile_queued`) is sent again, so a broker restored from an older state loses
no job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xrayfm_stack.jobs import BootstrapState, JobRecords
from xrayfm_training.joblog import JobLog

BOOTSTRAP_LOCK = "bootstrap"  # the bootstrap task's lock: JobRecords.lock_key(BOOTSTRAP_LOCK)

log = logging.getLogger("xrayfm.training")


def recover_orphans(
    records: JobRecords, max_attempts: int, requeue: Callable[[str, int], None], runs_dir: Path | None = None
) -> list[str]:
    """Re-queue (or end) every running job whose lock lapsed; returns their ids.

    `requeue(job_id, n)` sends the job's message again (n: its re-queue count); `runs_dir` holds the jobs'
    run folders (for their ``job.log``)."""
    recovered = []
    for job_id in records.active_ids():
        old = records.claim_orphan(job_id)
        if old is None:
            continue
        recovered.append(job_id)
        job = records.get(job_id) or {}
        attempts, requeued = int(job.get("attempts") or 0), int(job.get("requeued") or 0)
        lost = attempts - int(job.get("handed_back") or 0)  # attempts whose worker died
        say = JobLog(records, job_id, None if runs_dir is None else Path(runs_dir) / job_id)
        if old == "cancelling":
            records.update(job_id, status="cancelled", finished=time.time())
            say("its worker was lost while it was being cancelled: cancelled", logging.WARNING)
        elif lost >= max_attempts:
            error = (f"its worker was lost {lost} times (killed, or out of memory); "
                     f"gave up after XRAYFM_TRAINING_MAX_ATTEMPTS={max_attempts}")  # fmt: skip
            records.update(job_id, status="failed", finished=time.time(), error=error)
            say(error, logging.ERROR)
        else:
            try:
                requeue(job_id, requeued + 1)
            except Exception:  # broker unreachable: leave it running-without-lock, the next check retries
                records.update(job_id, status=old)
                log.warning("job %s: could not re-queue it; will retry", job_id)
                continue
            records.update(job_id, requeued=requeued + 1)
            say(f"no worker holds it after attempt {attempts} (its worker stopped or died); queued again, "
                "it resumes from its last saved state", logging.WARNING)  # fmt: skip
    return recovered


UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered messages not yet acknowledged (its default name)


def messages_held(redis: Any, queue: str) -> bytes:
    """Every message the broker holds for `queue`: waiting (its lists) or delivered and not yet
    acknowledged (kombu's Redis transport), as one blob to search for job ids."""
    lists = [queue.encode(), *redis.scan_iter(match=f"{queue}\x06\x16*")]  # kombu's priority lists
    pipe = redis.pipeline()
    for key in lists:
        pipe.lrange(key, 0, -1)
    pipe.hvals(UNACKED_KEY)
    return b"\n".join(item for items in pipe.execute() for item in items)


def reconcile_queued(
    records: JobRecords, queue: str, requeue: Callable[[str, int], None], older_than_s: float = 60.0
) -> list[str]:
    """Send again every job the records say is queued but whose message the broker no longer holds (its
    Redis lost data, or the message was never sent); returns their ids. Jobs updated in the last
    `older_than_s` seconds are left alone (their message may be on its way). A job sent twice runs once:
    the second message finds it locked or finished and is dropped."""
    pending = records.queued_ids(older_than_s)
    if not pending:
        return []
    held = messages_held(records.redis, queue)
    resent = []
    for job_id in pending:
        if job_id.encode() in held:
            continue
        requeued = int((records.get(job_id) or {}).get("requeued") or 0)
        requeue(job_id, requeued + 1)
        records.update(job_id, requeued=requeued + 1)
        JobLog(records, job_id, None)(
            "queued, but the broker held no message for it: sent again", logging.WARNING
        )
        resent.append(job_id)
    return resent


def recover_bootstrap(state: BootstrapState, records: JobRecords, requeue: Callable[[], None]) -> bool:
    """Queue an interrupted first-start bootstrap again (its worker died); True when it did."""
    if not state.claim_orphan(records.lock_key(BOOTSTRAP_LOCK)):
        return False
    try:
        requeue()
    except Exception:  # broker unreachable: mark it under way again, the next check retries
        state.set(stage="interrupted")
        log.warning("could not re-queue the interrupted bootstrap; will retry")
        return False
    log.warning("the first-start bootstrap was interrupted (its worker stopped or died): queued again")
    return True


class OrphanWatch(threading.Thread):
    """Runs each of `checks` every `interval_s` seconds until stopped (a daemon thread)."""

    def __init__(self, interval_s: float, checks: list[Callable[[], object]]) -> None:
        super().__init__(daemon=True, name="orphan-watch")
        self.interval_s, self.checks = interval_s, checks
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            for check in self.checks:
                try:
                    check()
                except Exception:  # Redis blip: try again at the next beat
                    log.warning("could not check for orphaned training jobs", exc_info=True)
            if self.stop.wait(self.interval_s):
                return
