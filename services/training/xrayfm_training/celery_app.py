"""The Celery application of training jobs, shared by the gateway (to send) and the worker (to run).

Long jobs: late acknowledgement (a job whose worker died is redelivered), one message per worker at a
time, and a visibility timeout of hours; a redelivered job that is still running elsewhere is recognised
by its Redis lock (see xrayfm_training.worker) and not run twice. The message carries the job id only:
the spec lives in the job record.
"""

from __future__ import annotations

from celery import Celery

from xrayfm_inference.celery_app import reliable_queue_conf
from xrayfm_training.settings import TrainingSettings

TRAIN_TASK = "xrayfm.train_job"
BOOTSTRAP_TASK = "xrayfm.bootstrap_demo"


def make_celery(settings: TrainingSettings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the environment)."""
    settings = TrainingSettings.from_env() if settings is None else settings
    app = Celery("xrayfm-training", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        **reliable_queue_conf(settings.queue, settings.visibility_timeout_s),
        task_routes={TRAIN_TASK: {"queue": settings.queue}, BOOTSTRAP_TASK: {"queue": settings.queue}},
        task_ignore_result=True,  # the job record in Redis is the result
    )
    return app


def submit(app: Celery, settings: TrainingSettings, job_id: str) -> None:
    """Queue the job `job_id` (its record must exist)."""
    app.send_task(TRAIN_TASK, args=(job_id,), task_id=job_id, queue=settings.queue)
