"""The training worker: ``celery -A xrayfm_training.worker worker --pool=solo -Q xrayfm-training``.

One job at a time per worker process. A job: take its Redis lock (renewed while it runs), resume from
its run folder's ``last/`` when an earlier attempt left one, train with the library while recording
progress and honouring cancel, then publish ``best/`` as a new store version (once per job, however often
it ran). An evaluate job evaluates a checkpoint and records the result with its store version; a calibrate
job calibrates one to a site's images and publishes the result as the next version of its name. A job that
fails records why; a redelivered job that already finished, or is still running elsewhere, is not run
again; a job whose worker died is queued again by the other workers (xrayfm_training.recovery). Each job
has its own log (xrayfm_training.joblog).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery.signals import worker_ready, worker_shutting_down
from celery.utils.log import get_task_logger

from xrayfm.errors import XrayfmError
from xrayfm.registry import store_ref
from xrayfm.utils import to_jsonable
from xrayfm_stack import store as model_store
from xrayfm_stack.celery import BOOTSTRAP_TASK, TRAIN_TASK, training_celery
from xrayfm_stack.jobs import TERMINAL, BootstrapState, JobRecords
from xrayfm_stack.settings import TrainingSettings
from xrayfm_stack.spec import job_kind, register_runner, resolve_store_ref
from xrayfm_training import bootstrap, graphs
from xrayfm_training.joblog import JobLog
from xrayfm_training.publish import publish_run
from xrayfm_training.recovery import (
    BOOTSTRAP_LOCK,
    OrphanWatch,
    reconcile_queued,
    recover_bootstrap,
    recover_orphans,
)

settings = TrainingSettings.from_env()
app = training_celery(settings)
log = get_task_logger("xrayfm.training")
log.setLevel(logging.INFO)
# Set when the worker is asked to stop (SIGTERM, e.g. `docker compose stop`): the running job saves its
# state at the next step and hands itself back; another worker (or this one, restarted) resumes it.
shutting_down = threading.Event()


class _LockKeeper(threading.Thread):
    """Renews the job's lock while it runs; `lost` is set if it lapsed (another worker may take over)."""

    def __init__(self, records: JobRecords, job_id: str, owner: str, ttl_s: float) -> None:
        super().__init__(daemon=True, name=f"lock-{job_id[:8]}")
        self.records, self.job_id, self.owner, self.ttl_s = records, job_id, owner, ttl_s
        self.stop = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.ttl_s / 3):
            try:
                if not self.records.renew(self.job_id, self.owner, self.ttl_s):
                    self.lost.set()
                    return
            except Exception:  # Redis blip: try again at the next beat; the TTL leaves room for two misses
                log.warning("job %s: could not renew its lock", self.job_id)


def _wait_for_lock(records: JobRecords, job_id: str, owner: str, ttl_s: float) -> bool:
    """Take the lock, waiting up to a little over its TTL (a dead holder's lock lapses in that time)."""
    deadline = time.monotonic() + ttl_s * 1.5
    while time.monotonic() < deadline:
        if records.acquire(job_id, owner, ttl_s):
            return True
        if (records.get(job_id) or {}).get("status") in TERMINAL:
            return False
        time.sleep(min(1.0, ttl_s / 4))
    return False


@contextmanager
def _holding_lock(
    records: JobRecords, lock_id: str, ttl_s: float, wait: bool
) -> Iterator[_LockKeeper | None]:
    """Hold `lock_id`'s lock, renewed, for the block; yields None when another worker holds it.

    `wait`: wait a little over the TTL for a dead holder's lock to lapse first (:func:`_wait_for_lock`)."""
    owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    taken = _wait_for_lock(records, lock_id, owner, ttl_s) if wait else records.acquire(lock_id, owner, ttl_s)
    if not taken:
        yield None
        return
    keeper = _LockKeeper(records, lock_id, owner, ttl_s)
    keeper.start()
    try:
        yield keeper
    finally:
        keeper.stop.set()
        records.release(lock_id, owner)


def failure_text(exc: BaseException) -> str:
    """What a failed job's record says (and so the API): the library's own errors in full (they name paths
    and kinds of problems, never file contents); for anything else only its type and where it was raised,
    since its message may quote the data (the traceback is in the run folder's job.log)."""
    if isinstance(exc, XrayfmError):
        return f"{type(exc).__name__}: {exc}"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" in {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}{where} (unexpected; the traceback is in job.log in the job's run folder)"


def run_job(job_id: str, settings: TrainingSettings, records: JobRecords) -> dict[str, Any]:
    """Run one training job to its end (done, failed or cancelled); returns its final status."""
    job = records.get(job_id)
    if job is None:
        log.warning("job %s: no record (expired or never submitted); dropped", job_id)
        return {"status": "unknown"}
    if job["status"] in TERMINAL:
        log.info("job %s: already %s; redelivered message dropped", job_id, job["status"])
        return {"status": job["status"]}
    with _holding_lock(records, job_id, settings.lock_ttl_s, wait=True) as keeper:
        if keeper is None:
            log.info("job %s: running elsewhere (its lock is held); redelivered message dropped", job_id)
            return {"status": "running-elsewhere"}
        return _train(job, settings, records, keeper)


def _train(job: dict[str, Any], settings: TrainingSettings, records: JobRecords, keeper: _LockKeeper) -> dict:
    job_id, spec = job["job_id"], job["spec"]
    run_dir = (settings.runs_dir / job_id).resolve()
    say = JobLog(records, job_id, run_dir)
    if records.cancel_requested(job_id):
        records.update(job_id, status="cancelled", finished=time.time())
        say("cancelled before it started")
        return {"status": "cancelled"}
    resume = (run_dir / "last").is_dir()
    attempt = int(job.get("attempts") or 0) + 1
    records.update(job_id, status="running", started=time.time(), attempts=attempt,
                   worker=os.uname().nodename, resumed=resume, error=None)  # fmt: skip
    say(f"attempt {attempt}: {spec['kind']} {spec['name']} on {os.uname().nodename} (pid {os.getpid()}), "
        f"run folder {run_dir}" + (", resuming from its last checkpoint" if resume else ""))  # fmt: skip

    def progress(info: dict[str, Any]) -> None:
        try:
            records.update(job_id, progress=to_jsonable(info))
        except Exception:  # progress is best effort: never let a Redis blip kill hours of training
            log.warning("job %s: could not record progress", job_id)
        say.progress(info)

    def should_cancel() -> bool:
        if keeper.lost.is_set() or shutting_down.is_set():
            return True
        try:
            return records.cancel_requested(job_id)
        except Exception:  # Redis restarting: keep training; the lock keeper decides if the job is lost
            return False

    context = JobContext(job_id, job, spec, settings, records, run_dir, say, resume, progress, should_cancel,
                         keeper)  # fmt: skip
    try:
        runner = job_kind(spec["kind"]).runner
        if runner is None:
            raise XrayfmError(f"this training worker has no runner for {spec['kind']} jobs")
        return runner(context)
    except Exception as exc:
        error = failure_text(exc)
        say(f"failed: {error}", logging.ERROR, detail=traceback.format_exc())
        records.update(job_id, status="failed", finished=time.time(), error=error)
        return {"status": "failed"}


@dataclasses.dataclass
class JobContext:
    """What a runner gets: the job, its spec, where it runs, how it reports, when it should stop."""

    job_id: str
    job: dict[str, Any]
    spec: dict[str, Any]
    settings: TrainingSettings
    records: JobRecords
    run_dir: Path
    say: JobLog
    resume: bool
    progress: Callable[[dict[str, Any]], None]
    should_cancel: Callable[[], bool]
    keeper: _LockKeeper


# -- the runners, one per job kind (registered in xrayfm_stack.spec's registry at the end of this module) --
def _fit(ctx: JobContext, fit: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train with the library's `fit` (pretrain, adapt, tune) on the job's config, in its run folder,
    resuming from it; store versions named by the config resolved to their folders."""
    kind = job_kind(ctx.spec["kind"])
    config_dict = {**ctx.spec["config"], "out": str(ctx.run_dir), "resume": ctx.resume}
    for field in kind.store_fields:
        if config_dict.get(field):
            config_dict[field] = resolve_store_ref(config_dict[field], ctx.settings.model_store)
    config = kind.config.from_dict(config_dict)
    return fit(config, progress=ctx.progress, should_cancel=ctx.should_cancel)


def _run_pretrain(ctx: JobContext) -> dict[str, Any]:
    from xrayfm.train import pretrain  # torch is imported here, not when the worker module loads

    return _conclude(ctx, _fit(ctx, pretrain), ctx.run_dir / "best", None)


def _run_adapt(ctx: JobContext) -> dict[str, Any]:
    from xrayfm.train import adapt

    return _conclude(ctx, _fit(ctx, adapt), ctx.run_dir / "best", None)


def _run_tune(ctx: JobContext) -> dict[str, Any]:
    """A tune job: the study resumes from its SQLite file; the best trial is published."""
    from xrayfm.train.tune import read_best, tune  # optuna too

    summary = _fit(ctx, tune)
    summary["status"] = "cancelled" if summary["cancelled"] else "completed"
    best_dir, lineage = ctx.run_dir / "best", None
    if not summary["cancelled"]:
        best = read_best(ctx.run_dir)
        best_dir = Path(best["checkpoint"])
        lineage = {"tune": {"job_id": ctx.job_id, "study": best.get("study"), "trial": best["number"],
                            "params": best["params"], "metric": best["metric"], "value": best["value"],
                            "trials": best.get("trials")}}  # fmt: skip
        summary |= {"metric": best["metric"], "best_metric": best["value"], "step": None}
    return _conclude(ctx, summary, best_dir, lineage)


def _conclude(
    ctx: JobContext, summary: dict[str, Any], best_dir: Path, lineage: dict | None
) -> dict[str, Any]:
    """A training run's end: cancelled (or handed back, or its lock lost), or published as a new version."""
    job_id, spec, records, say = ctx.job_id, ctx.spec, ctx.records, ctx.say
    if summary["status"] == "cancelled":
        if ctx.keeper.lost.is_set():
            say("lost its lock; stopped (another worker resumes it)", logging.WARNING)
            return {"status": "lock-lost"}
        if shutting_down.is_set() and not records.cancel_requested(job_id):
            # left "running" without a lock once released: the orphan check queues it again
            records.update(job_id, handed_back=int(ctx.job.get("handed_back") or 0) + 1)
            say(f"the worker is shutting down: stopped at step {summary.get('step')} with its state "
                "saved; it resumes there on the next free worker", logging.WARNING)  # fmt: skip
            return {"status": "handed-back"}
        records.update(job_id, status="cancelled", finished=time.time())
        say(f"cancelled at step {summary.get('step')}")
        return {"status": "cancelled"}
    version, info = publish_run(
        ctx.settings.model_store, spec["name"], best_dir, job_id, spec["kind"], lineage
    )
    result = to_jsonable({"status": summary["status"], "best_metric": summary.get("best_metric"),
                    "metric": summary.get("metric"), "best_epoch": summary.get("best_epoch"),
                    "steps": summary.get("step"), "seconds": summary.get("seconds"),
                    "resumed_from_step": summary.get("resumed_from_step"),
                    "metrics": info.get("metrics"), "report": summary.get("report")})  # fmt: skip
    model = {"name": spec["name"], "version": version}
    records.update(job_id, status="done", finished=time.time(), result=result, model=model)
    say(f"done ({summary['status']}, {summary.get('metric')} = {summary.get('best_metric')}); "
        f"stored as {spec['name']}/{version}")  # fmt: skip
    return {"status": "done", "model": model}


def _run_evaluate(ctx: JobContext) -> dict[str, Any]:
    """An evaluate job: report on the dataset split; a store version gets the result in its evaluations."""
    from xrayfm.train.config import EvaluateConfig
    from xrayfm.train.evaluation import evaluate_config

    job_id, spec, settings, records, run_dir, say = (ctx.job_id, ctx.spec, ctx.settings, ctx.records,
                                                     ctx.run_dir, ctx.say)  # fmt: skip
    ref = store_ref(spec["config"]["model"])
    model_dir = resolve_store_ref(spec["config"]["model"], settings.model_store)
    config = EvaluateConfig.from_dict({**spec["config"], "model": model_dir})
    summary = evaluate_config(config, run_dir)
    result = to_jsonable({k: summary.get(k) for k in ("metric", "value", "report")})
    synthetic = bool((summary.get("report") or {}).get("source", {}).get("synthetic"))
    if ref is not None:
        model_store.add_evaluation(settings.model_store, *ref, job_id, {
            "dataset": config.kind or "cache", "root": config.root or config.cache, "split": config.split,
            "metric": result["metric"], "value": result["value"], "synthetic": synthetic,
            # the candidate thresholds an admin can choose from (PUT /models/.../operating-point)
            "operating_points": (result.get("report") or {}).get("operating_points") or {},
            "created": time.time()})  # fmt: skip
    model = {"name": ref[0], "version": ref[1]} if ref else None
    records.update(job_id, status="done", finished=time.time(), result=result, model=model)
    say(f"done: {result['metric']} = {result['value']} on {config.kind or 'cache'} {config.split}")
    return {"status": "done"}


def _run_calibrate(ctx: JobContext) -> dict[str, Any]:
    """A calibrate job: the model calibrated to the site's images (xrayfm.inference.calibrate), published as
    the next version of the job's name with the source version in its lineage."""
    from xrayfm.inference.calibrate import calibrate_config
    from xrayfm.train.config import CalibrateConfig

    job_id, spec, settings, records, run_dir, say = (ctx.job_id, ctx.spec, ctx.settings, ctx.records,
                                                     ctx.run_dir, ctx.say)  # fmt: skip
    out = run_dir / "calibrated"
    shutil.rmtree(out, ignore_errors=True)  # an earlier attempt's, never published (publishing is last)
    config = CalibrateConfig.from_dict({**spec["config"], "out": str(out), "progress_bar": False})
    say(f"calibrating {config.model} on {', '.join(config.data)}")
    summary = calibrate_config(config, store=settings.model_store)
    source, ev = summary["source_model"], summary["evaluation"]
    lineage = {"calibrated_from": {k: source[k] for k in ("model", "name", "version", "sha256")},
               "calibration": {"method": summary["method"], "fit_images": summary["site"]["fit_images"],
                               "eval_images": summary["site"]["eval_images"],
                               "ece_before": ev["before"]["ece"], "ece_after": ev["after"]["ece"]}}  # fmt: skip
    version, _ = publish_run(settings.model_store, spec["name"], out, job_id, "calibrate", lineage)
    op = summary["operating_point"]
    result = to_jsonable({"metric": "ece", "value": ev["after"]["ece"], "method": summary["method"],
                          "evaluation": ev, "site": summary["site"], "gate": summary["gate"],
                          "operating_point": {"threshold": op["threshold"], "source": op["source"]},
                          "calibrated_from": lineage["calibrated_from"]})  # fmt: skip
    model = {"name": spec["name"], "version": version}
    records.update(job_id, status="done", finished=time.time(), result=result, model=model)
    say(f"done: {summary['method']} calibration, ECE {ev['before']['ece']:.4f} -> {ev['after']['ece']:.4f} on "
        f"{ev['after']['n']} evaluation images; stored as {spec['name']}/{version}")  # fmt: skip
    return {"status": "done", "model": model}


for _kind, _runner in (("pretrain", _run_pretrain), ("adapt", _run_adapt), ("tune", _run_tune),
                       ("evaluate", _run_evaluate), ("calibrate", _run_calibrate)):  # fmt: skip
    register_runner(_kind, _runner)


def _prepare_process() -> None:
    """What every task needs in this process: torch's thread count and the runs folder."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    Path(settings.runs_dir).mkdir(parents=True, exist_ok=True)


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> dict[str, Any]:
    """The queued training job `job_id` (its spec is in its Redis record)."""
    _prepare_process()
    return run_job(job_id, settings, JobRecords(settings.redis_url, settings.queue))


@app.task(name=BOOTSTRAP_TASK)
def bootstrap_job() -> dict[str, Any]:
    """First start: install the shipped model, or train the demo one on phantoms (xrayfm_training.bootstrap)."""
    _prepare_process()
    records = JobRecords(settings.redis_url, settings.queue)
    with _holding_lock(records, BOOTSTRAP_LOCK, settings.lock_ttl_s, wait=False) as keeper:
        if keeper is None:
            log.info("the bootstrap is running on another worker; message dropped")
            return {"stage": "running-elsewhere"}
        try:
            return bootstrap.run_bootstrap(settings, records, run_job)
        except bootstrap.Interrupted:
            log.warning("bootstrap interrupted by the shutdown; the next worker carries on")
            return {"stage": "interrupted"}
        except Exception:  # recorded in the bootstrap state (and so in /ready); the message is done with
            log.error("bootstrap failed:\n%s", traceback.format_exc())
            return {"stage": "failed"}


def _requeue(job_id: str, n: int) -> None:
    app.send_task(TRAIN_TASK, args=(job_id,), task_id=f"{job_id}.requeue-{n}", queue=settings.queue)


@worker_shutting_down.connect
def _hand_back_running_job(sig=None, how=None, exitcode=None, **_kwargs: Any) -> None:
    """Warm shutdown: the running job stops at its next step instead of holding the worker for hours."""
    shutting_down.set()


@worker_ready.connect
def _watch_orphans(sender=None, **_kwargs: Any) -> None:
    """Re-queue the jobs of dead workers, now and every lock TTL (xrayfm_training.recovery)."""
    records = JobRecords(settings.redis_url, settings.queue)
    state = BootstrapState(settings.redis_url, settings.queue)
    checks = [
        lambda: recover_orphans(records, settings.max_attempts, _requeue, settings.runs_dir),
        lambda: reconcile_queued(records, settings.queue, _requeue),
        lambda: recover_bootstrap(
            state, records, lambda: app.send_task(BOOTSTRAP_TASK, queue=settings.queue)
        ),
    ]
    OrphanWatch(settings.lock_ttl_s, checks).start()


@worker_ready.connect
def _backfill_graphs(sender=None, **_kwargs: Any) -> None:
    """In the background: ONNX graphs for stored versions without them (the CPU inference image serves
    only stored graphs; xrayfm_training.graphs). Nothing to do on an empty store (the bootstrap exports)."""

    def run() -> None:
        try:
            if not bootstrap.store_is_empty(Path(settings.model_store)):
                for outcome in graphs.backfill(Path(settings.model_store), tuple(settings.data_dirs)):
                    log.warning(
                        "ONNX graphs for %s: %s", outcome["version"], outcome.get("error", "exported")
                    )
        except Exception:  # a worker that cannot export still runs the jobs it is sent
            log.error("could not export missing ONNX graphs:\n%s", traceback.format_exc())

    threading.Thread(target=run, name="graph-backfill", daemon=True).start()


@worker_ready.connect
def _queue_bootstrap(sender=None, **_kwargs: Any) -> None:
    """With an empty model store and no bootstrap recorded yet, queue the first-start job (once)."""
    try:
        mode = settings.bootstrap
        if mode == "off" or not bootstrap.store_is_empty(Path(settings.model_store)):
            return
        if BootstrapState(settings.redis_url, settings.queue).claim(mode):
            log.warning(
                "empty model store %s: queueing the first-start bootstrap (%s)", settings.model_store, mode
            )
            app.send_task(BOOTSTRAP_TASK, queue=settings.queue)
    except Exception:  # a worker that cannot bootstrap still runs the jobs it is sent
        log.error("could not queue the bootstrap job:\n%s", traceback.format_exc())
