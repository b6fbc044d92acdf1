"""The Celery inference worker: loads the served model once, batches requests, answers with
probabilities and heatmaps.

Run with a thread pool (requests wait in threads while the batcher runs the model)::

    celery -A xrayfm_inference.worker worker --pool=threads --concurrency=16 --loglevel=INFO

Two runtimes (``XRAYFM_RUNTIME``). ``onnxruntime`` (the CPU image's, and ``make up``'s) serves the
version's stored ONNX graph without torch (:mod:`xrayfm.inference.onnx_serving`): nothing on that path
imports torch, so the CPU image carries none. A version without stored graphs is not served: the load
error (in the log and in /ready) says how to export them. ``torch`` (the GPU image's,
docker-compose.gpu.yml) runs the torch model eagerly and serves every explanation method.

The methods that need gradients (``grad_rollout``, ``gradcam``) are answered on a torch-free worker
with a rejection naming the runtime and the methods it serves (the gateway answers 422
``method_unavailable``), not with a torch model loaded beside the graph for them: every worker would
then hold the model twice and carry torch, doubling the fleet's memory and the CPU image's size for a
method few requests ask for. A deployment that needs them runs torch workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import signals
from celery.exceptions import Reject
from redis.exceptions import RedisError

from xrayfm.errors import XrayfmError
from xrayfm.explain.methods import METHODS as EXPLAIN_METHODS
from xrayfm_inference import metrics
from xrayfm_inference.batcher import MicroBatcher
from xrayfm_inference.heartbeat import Heartbeat
from xrayfm_inference.swap import ServingWatcher
from xrayfm_stack.celery import inference_celery
from xrayfm_stack.protocol import (
    PREDICT_STUDY_TASK,
    PREDICT_TASK,
    DomainInfo,
    InferenceTimeout,
    JobLost,
    ModelInfo,
    ModelMap,
    PredictRequest,
    RejectionReason,
    StudyAnswer,
    Timings,
    WorkerAnswer,
    WorkerRejection,
)
from xrayfm_stack.settings import InferenceSettings
from xrayfm_stack.store import graphs_record, resolve_model

log = logging.getLogger("xrayfm.worker")

SETTINGS = InferenceSettings.from_env()
app = inference_celery(SETTINGS.queue)


class WorkerNotReady(XrayfmError):
    """The worker has no model loaded (it failed to load, or is still loading)."""


@dataclass
class Runtime:
    """What a running worker holds: the model (behind its predictor and batcher) or the load error.

    The predictor is replaced as a whole (one attribute) when a promoted version loads; each batch reads
    it once, so a batch in flight finishes on the model it started with."""

    predictor: Any = None
    batcher: MicroBatcher | None = None
    heartbeat: Heartbeat | None = None
    watcher: ServingWatcher | None = None
    error: str | None = None
    loading: bool = True
    threads: int | None = None  # the Celery pool's threads: no batch can be larger

    @property
    def served(self) -> Any:
        """The served model (``xrayfm.inference.ServedModel``), or None."""
        predictor = self.predictor
        return None if predictor is None else predictor.served

    def describe(self) -> dict[str, Any]:
        """The heartbeat's content."""
        stuck = self.batcher is not None and self.batcher.busy_for() > SETTINGS.queue.task_time_limit_s
        return {
            "ready": self.served is not None and not stuck,
            "loading": self.loading,
            "error": self.error or ("a batch has run longer than the time limit" if stuck else None),
            "model": model_info(self.predictor).model_dump() if self.served is not None else None,
            "swap_error": self.watcher.error if self.watcher is not None else None,
            "batch_max": self.batcher.max_batch if self.batcher is not None else SETTINGS.batch_max,
            "pid": os.getpid(),
        }


RUNTIME = Runtime()


class _OnTheWay:
    """Requests taken from the queue whose image is not yet in the batcher (the batcher waits for them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n

    def __call__(self) -> int:
        return self._count


ON_THE_WAY = _OnTheWay()
AUTO_BATCH_LIMIT = 64  # XRAYFM_BATCH_MAX=auto measures sizes up to this (and the pool's threads)


def model_info(predictor: Any) -> ModelInfo:
    """The served model's identity with the deployment's runtime (torch, onnxruntime, onnxruntime-int8)."""
    return ModelInfo(
        **{
            **predictor.served.info(),
            "runtime": predictor.runtime,
            "runtime_reason": predictor.runtime_reason,
        }
    )


_START_LOCK = threading.Lock()


def start_runtime(hostname: str, threads: int | None = None) -> Runtime:
    """Load the model, start the batcher, the metrics endpoint and the heartbeat (once per process);
    `threads` is the Celery pool's size (it bounds the batches)."""
    with _START_LOCK:
        if RUNTIME.heartbeat is not None:
            return RUNTIME
        RUNTIME.threads = threads
        if SETTINGS.metrics_port:
            from prometheus_client import start_http_server

            try:
                start_http_server(SETTINGS.metrics_port, addr=SETTINGS.metrics_addr)
            except OSError as exc:  # serving matters more than metrics: say so and go on
                log.error(
                    "no metrics endpoint on %s:%s: %s", SETTINGS.metrics_addr, SETTINGS.metrics_port, exc
                )
        RUNTIME.heartbeat = Heartbeat(SETTINGS.queue, hostname, RUNTIME.describe).start()
        ref = None
        try:
            ref = resolve_model(SETTINGS.model_path, SETTINGS.model_store)
            _load_model(ref)
        except Exception as exc:  # the worker stays up and says why in its heartbeat (/ready shows it)
            RUNTIME.error = f"model failed to load: {exc}"
            log.error(RUNTIME.error)
        finally:
            RUNTIME.loading = False
        if (
            SETTINGS.model_path is None and SETTINGS.model_poll_s > 0
        ):  # serving from the store: follow promotions
            served_ref = ref if RUNTIME.predictor is not None else None
            RUNTIME.watcher = ServingWatcher(
                SETTINGS.model_store, SETTINGS.model_poll_s, _load_model, served_ref, retune=_retune
            ).start()
        RUNTIME.heartbeat.beat()
        return RUNTIME


def _run_batch(images: list, explain_maps: bool, method: str) -> list[tuple[Any, Any]]:
    """One batch on the predictor current at this batch boundary: (that predictor, its result) per image.

    The heatmaps stay over the model's input: the gateway draws them (:func:`_answer`)."""
    predictor = RUNTIME.predictor  # read once: a swap during this batch does not touch it
    method = _method_for(predictor, method)
    results = predictor.predict(images, explain_maps=explain_maps, method=method, draw=False, judge=False)
    return [(predictor, result) for result in results]


def _judge(predictor: Any, result: Any, image: Any, request: PredictRequest) -> DomainInfo | None:
    """The served version's domain verdict on one image (None when the deployment's policy is off)."""
    if request.domain_policy == "off":
        return None
    from xrayfm.domain import InputFacts

    verdict = predictor.served.judge(image, result.features, InputFacts.from_dict(request.facts))
    return DomainInfo.model_validate(verdict.to_dict())


def _out_of_domain(predictor: Any, domain: DomainInfo, which: str = "the image") -> dict[str, Any]:
    """The rejection of an image outside the version's domain (the gateway answers 422 out_of_domain)."""
    served = predictor.served
    reasons = "; ".join(r.message for r in domain.reasons)
    message = (
        f"{which} is outside the domain of model {served.name}/{served.version} "
        f"({served.domain.description}): {reasons}. No prediction is given."
    )
    metrics.REQUESTS.labels("out_of_domain").inc()
    reason = RejectionReason(
        type="out_of_domain", message=message, domain=domain, model=model_info(predictor)
    )
    return WorkerRejection(error=reason).model_dump(mode="json")


def _warning(domain: DomainInfo | None) -> str | None:
    """The flag policy's warning on an out-of-domain answer."""
    if domain is None or domain.in_domain:
        return None
    reasons = "; ".join(r.message for r in domain.reasons)
    return f"outside this model's domain ({reasons}): do not trust this answer"


def _judged_answer(future: Any, image: Any, request: PredictRequest, which: str = "the image") -> Any:
    """One image's :class:`WorkerAnswer` with the served version's domain verdict (and the flag policy's
    warning); or, when the image is out of domain and the policy refuses it, the rejection (a dict)."""
    predictor, result = _result(future)
    domain = _judge(predictor, result, image, request)
    if domain is not None and not domain.in_domain and request.domain_policy == "refuse":
        return _out_of_domain(predictor, domain, which)
    answer = _answer(predictor, result, image.shape)
    answer.domain, answer.warning = domain, _warning(domain)
    return answer


def _answer(predictor: Any, result: Any, image_shape: tuple[int, ...]) -> WorkerAnswer:
    """One image's answer on the wire, with its heatmap as the model's map and the geometry to draw it on
    (the image's aspect, at most XRAYFM_HEATMAP_SIDE on the long side): the gateway draws the PNG, off
    this CPU (:class:`ModelMap`). The model named is the one that ran its batch."""
    from xrayfm.data.images import shape_within

    t0 = time.perf_counter()
    model_map = None
    if result.model_map is not None:
        pre = predictor.served.preprocessing
        out_shape = shape_within(image_shape, SETTINGS.heatmap_side)
        model_map = ModelMap.from_array(result.model_map, pre.size, pre.mode, out_shape)
    pack_ms = 1000 * (time.perf_counter() - t0)
    return WorkerAnswer(
        prediction=result.prediction,
        probability=result.probability,
        probabilities=result.probabilities,
        model_map=model_map,
        explain_method=result.explain_method,
        model=model_info(predictor),
        timings=Timings(**{**result.timings, "postprocess_ms": result.timings["postprocess_ms"] + pack_ms}),
        batch_size=result.batch_size,
        runtime=result.runtime,
    )


def _predictor_for(ref) -> Any:
    """The predictor of `ref` for XRAYFM_RUNTIME: the version's stored graph without torch
    (``onnxruntime``), or the torch model (``torch``)."""
    if SETTINGS.runtime == "onnxruntime":
        from xrayfm.inference.onnx_serving import load_graph_predictor

        if SETTINGS.device not in ("auto", "cpu"):
            raise XrayfmError(
                f"XRAYFM_RUNTIME=onnxruntime runs on the CPU (XRAYFM_DEVICE={SETTINGS.device}); "
                "use XRAYFM_RUNTIME=torch for a GPU"
            )
        return load_graph_predictor(
            ref.path,
            graphs_record(ref.path),
            quantize=SETTINGS.quantize,
            threads=SETTINGS.torch_threads,
            name=ref.name,
            version=ref.version,
        )
    import torch

    from xrayfm.inference import load_served_model
    from xrayfm.inference.runtime import make_predictor

    if SETTINGS.torch_threads:
        torch.set_num_threads(SETTINGS.torch_threads)
    served = load_served_model(ref.path, SETTINGS.device, name=ref.name, version=ref.version)
    return make_predictor(
        served,
        SETTINGS.runtime,
        quantize=SETTINGS.quantize,
        cache_dir=SETTINGS.runtime_cache,
        threads=SETTINGS.torch_threads,
        folder=Path(ref.path),
        graphs=graphs_record(ref.path),
    )


def _load_model(ref) -> None:
    """Load `ref` (a ``store.ModelRef``), warm it up, then serve it: at start, or to replace the model
    served now (the swap happens only once the new model answered its warm-up)."""
    t0 = time.perf_counter()
    predictor = _predictor_for(ref)
    served = predictor.served
    maps = bool(predictor.methods)  # a CNN on the torch-free runtime draws no maps (Grad-CAM needs torch)
    predictor.predict(
        [_warmup_image()],
        explain_maps=maps,
        method=_method_for(predictor, SETTINGS.explain_method) if maps else None,
    )
    batch_max = _batch_max_for(predictor)
    previous = RUNTIME.served
    if RUNTIME.batcher is not None:  # a swap: the new model's size first, so a heartbeat naming it shows it
        RUNTIME.batcher.max_batch = batch_max
    RUNTIME.predictor = predictor  # the atomic swap: the next batch runs on the new model
    if RUNTIME.batcher is None:
        RUNTIME.batcher = MicroBatcher(
            _run_batch,
            batch_max,
            SETTINGS.batch_wait_ms / 1000.0,
            on_batch=metrics.observe_batch,
            expected=ON_THE_WAY,
        )
    metrics.BATCH_MAX.set(batch_max)
    RUNTIME.error = None
    info = served.info()
    metrics.MODEL.info(
        {**{k: str(info[k]) for k in ("name", "version", "sha256", "device")}, "runtime": predictor.runtime}
    )
    metrics.MODEL_LOADED.set(1)
    log.info(
        "serving %s/%s (sha256 %s) on %s with %s (%s), loaded in %.1f s%s",
        served.name, served.version, served.sha256[:12], served.device, predictor.runtime,
        predictor.runtime_reason, time.perf_counter() - t0,
        f" (replaces {previous.name}/{previous.version})" if previous is not None else "",
    )  # fmt: skip


def _batch_max_for(predictor: Any) -> int:
    """XRAYFM_BATCH_MAX, or with ``auto`` the size this model runs best at here, measured now (within
    XRAYFM_BATCH_TUNE_S; at most the pool's threads, since each thread brings one image)."""
    if SETTINGS.batch_max is not None:
        return SETTINGS.batch_max
    from xrayfm.inference.batching import auto_batch_max

    limit = min(AUTO_BATCH_LIMIT, RUNTIME.threads or AUTO_BATCH_LIMIT)
    method = _method_for(predictor, SETTINGS.explain_method) if predictor.methods else None
    size, rates = auto_batch_max(predictor, limit, method=method, budget_s=SETTINGS.batch_tune_s)
    measured = ", ".join(f"{b}: {rate:.1f}" for b, rate in rates.items())
    log.info(
        "batch max %d (XRAYFM_BATCH_MAX=auto; images/s by batch size, %s maps: %s)", size, method, measured
    )
    return size


def _method_for(predictor: Any, method: str) -> str:
    """The deployment's default method (XRAYFM_EXPLAIN_METHOD) means the model's own when the model cannot
    do it (rollout on a CNN: Grad-CAM); any other method the model lacks is refused by the predictor."""
    return (
        predictor.default_method
        if method == SETTINGS.explain_method and method not in predictor.methods
        else method
    )


def _retune(folder: Path) -> None:
    """The served version's operating point changed: decide with it from the next batch on."""
    predictor = RUNTIME.predictor
    if predictor is not None:
        predictor.served.retune(folder)
        log.info(
            "decision threshold now %.4f (%s)", predictor.served.threshold, predictor.served.threshold_source
        )


def _warmup_image():
    import numpy as np

    return np.zeros((64, 64), dtype=np.uint8)


@signals.after_setup_logger.connect
def _quiet_task_logs(**_kwargs: Any) -> None:
    """Celery logs every task at INFO: "received", then "succeeded" with its return value, which here is
    a patient's prediction. Those lines go (patient data stays out of logs, and at hundreds of requests
    a second they cost the worker's CPU); requests are counted in the metrics, and failures still log."""
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)


@signals.celeryd_after_setup.connect
def _on_worker_setup(sender=None, instance=None, **_kwargs: Any) -> None:
    """Load the model once Celery has set up logging (``worker_init`` comes before it, and the lines
    saying what is served, and how fast, would be lost) and before the consumer takes any task."""
    start_runtime(sender or f"worker@{os.getpid()}", getattr(instance, "concurrency", None))


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_kwargs: Any) -> None:
    if RUNTIME.watcher is not None:
        RUNTIME.watcher.stop()
    if RUNTIME.heartbeat is not None:
        RUNTIME.heartbeat.stop()
    if RUNTIME.batcher is not None:
        RUNTIME.batcher.close()


# Both prediction tasks: STARTED is stored by _parse_all, with the image read (so track_started=False); and
# Celery formats each return value for its "succeeded" log line, silenced here (patient data), before it
# checks whether that line is logged, at its default of up to 1024 characters a request; so 1 (0 would
# mean no limit).
TASK_OPTIONS: dict[str, Any] = {"bind": True, "track_started": False, "resultrepr_maxsize": 1}


@app.task(name=PREDICT_TASK, **TASK_OPTIONS)
def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
    """One request (a :class:`PredictRequest`): grey pixels in, a :class:`WorkerAnswer` out. A request it
    cannot use is answered with a :class:`WorkerRejection`; a timeout or a missing model raises (the task
    fails with that message)."""
    picked_up = time.time()
    _require_model(self.request.id)
    ON_THE_WAY.add(1)
    try:
        try:
            [(request, image)] = _parse_all([payload], self.request)
        except XrayfmError as exc:
            return _rejected(str(exc))
        queue_wait = max(0.0, picked_up - request.submitted_at)
        metrics.QUEUE_WAIT_SECONDS.observe(queue_wait)
        future = RUNTIME.batcher.submit(image, request.explain, request.method)
    finally:
        ON_THE_WAY.add(-1)
    try:
        answer = _judged_answer(future, image, request)
    except XrayfmError as exc:  # e.g. an explanation method the served architecture or runtime lacks
        return _rejected(str(exc), getattr(exc, "kind", "bad_request"))
    if not isinstance(answer, WorkerAnswer):  # refused: out of the version's domain
        return answer
    metrics.REQUESTS.labels("ok").inc()
    answer.worker = self.request.hostname
    answer.timings.queue_wait_ms = 1000 * queue_wait
    answer.timings.worker_ms = 1000 * (time.time() - picked_up)
    return answer.model_dump(mode="json")


@app.task(name=PREDICT_STUDY_TASK, **TASK_OPTIONS)
def predict_study(self, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """A study's images (a list of :class:`PredictRequest`), put through the micro-batcher together in this
    one call: each image's answer and the study's decision from the mean of their probabilities
    (:class:`StudyAnswer`). A request it cannot use rejects the whole study."""
    from xrayfm.inference import STUDY_AGGREGATION, Decision

    picked_up = time.time()
    _require_model(self.request.id)
    ON_THE_WAY.add(len(payloads))
    try:
        try:
            if not isinstance(payloads, list) or not payloads:
                raise XrayfmError("a study needs a non-empty list of images")
            parsed = _parse_all(payloads, self.request)
        except XrayfmError as exc:
            return _rejected(str(exc))
        queue_wait = max(0.0, picked_up - parsed[0][0].submitted_at)
        metrics.QUEUE_WAIT_SECONDS.observe(queue_wait)
        futures = [RUNTIME.batcher.submit(image, r.explain, r.method) for r, image in parsed]
    finally:
        ON_THE_WAY.add(-len(payloads) if isinstance(payloads, list) else 0)
    try:
        answers = []
        for k, (future, (request, image)) in enumerate(zip(futures, parsed, strict=True)):
            answer = _judged_answer(future, image, request, f"image {k + 1} of {len(parsed)} of the study")
            if not isinstance(answer, WorkerAnswer):  # refused: out of the version's domain
                return answer
            answers.append(answer)
    except XrayfmError as exc:
        return _rejected(str(exc), getattr(exc, "kind", "bad_request"))
    metrics.REQUESTS.labels("ok").inc(len(answers))
    study = RUNTIME.predictor.decide_study(
        [Decision(a.prediction, a.probability, a.probabilities) for a in answers]
    )
    worker_ms = 1000 * (time.time() - picked_up)
    return StudyAnswer(
        prediction=study.prediction,
        probability=study.probability,
        probabilities=study.probabilities,
        aggregation=STUDY_AGGREGATION,
        model=answers[0].model,
        images=answers,
        timings=Timings(queue_wait_ms=1000 * queue_wait, worker_ms=worker_ms),
        worker=self.request.hostname,
        warning=next(
            (f"image {k + 1}: {a.warning}" for k, a in enumerate(answers) if a.warning is not None), None
        ),
    ).model_dump(mode="json")


def _require_model(task_id: str) -> None:
    """No model here (it failed to load): give the message back for a worker that has one. The gateway
    sends nothing while no worker is ready, and its own timeout bounds the caller's wait."""
    if RUNTIME.batcher is None or RUNTIME.predictor is None:
        metrics.REQUESTS.labels("not_ready").inc()
        log.warning("no model loaded (%s); requeueing %s", RUNTIME.error, task_id)
        time.sleep(1.0)
        raise Reject(WorkerNotReady(RUNTIME.error or "no model loaded"), requeue=True)


def _parse_all(payloads: list[Any], task: Any) -> list[tuple[PredictRequest, Any]]:
    """A task's queued requests and their pixels, checked (XrayfmError when one does not follow the protocol).
    Marks the task STARTED and reads the requests' images from its inputs key, in one round
    trip (`task`: Celery's request context). Redis lost for longer than the result backend retries, or
    back without the images: :class:`JobLost` (the gateway answers 503, for the caller to send it again),
    never a rejection of the request."""
    requests = [PredictRequest.parse(payload) for payload in payloads]
    for request in requests:
        if request.method not in EXPLAIN_METHODS:
            raise XrayfmError(
                f"unknown explanation method {request.method!r}; choose one of {EXPLAIN_METHODS}"
            )
    try:
        stored = app.backend.start_and_read_inputs(task.id, task.hostname, len(requests))
        return [(request, request.image(data)) for request, data in zip(requests, stored, strict=True)]
    except (RedisError, JobLost) as exc:
        metrics.REQUESTS.labels("lost").inc(len(requests))
        if isinstance(exc, JobLost):
            raise
        raise JobLost(f"Redis unreachable: {exc}") from None


def _result(future) -> tuple[Any, Any]:
    """The batcher's (predictor, result) for one image, within XRAYFM_TASK_TIME_LIMIT (InferenceTimeout otherwise)."""
    try:
        return future.result(timeout=SETTINGS.queue.task_time_limit_s)
    except FutureTimeout:
        future.cancel()
        metrics.REQUESTS.labels("timeout").inc()
        raise InferenceTimeout(
            f"inference did not finish within XRAYFM_TASK_TIME_LIMIT={SETTINGS.queue.task_time_limit_s} s"
        ) from None


def _rejected(message: str, kind: str = "bad_request") -> dict[str, Any]:
    """The answer to a request the worker cannot use (the gateway turns it into a 422 of type `kind`)."""
    metrics.REQUESTS.labels("bad_request").inc()
    return WorkerRejection(error=RejectionReason(type=kind, message=message)).model_dump(mode="json")
