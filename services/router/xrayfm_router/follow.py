"""Follow Orthanc's changes feed: each ``StableStudy`` is sent to the gateway and answered back into the study.

For one study (:meth:`Router.answer`):

1. its instances, but the stack's own results (Orthanc's REST API);
2. skipped when the same instances were answered before (a key in Redis: the study's Orthanc id, holding a
   SHA-256 of its instance ids, kept ``XRAYFM_ROUTER_REMEMBER_DAYS``);
3. STOW-RS to the gateway's ``/dicomweb/studies/{study}`` (dicomweb-client): the gateway skips the series
   its domain gate refuses (and records why) and answers the rest together; 409 means it answered none;
4. the answer (``GET`` the response's Retrieve URL: the job) becomes an SR and one heatmap SC per image,
   stored into the study with STOW-RS; their UIDs are derived from the sources and the model, so storing
   them again makes no second copy;
5. a ``study_result`` record in the audit log (the model, the job, the SR's UID; no patient data).

The position in the feed is kept in Redis after each change, so a restart goes on where it stopped. A
study that fails for a passing reason (the gateway or Orthanc unreachable, 503, 504) is tried again after
``XRAYFM_ROUTER_POLL_S``, doubled with each failure in a row up to a minute, and the feed waits for it;
one the gateway refuses for good (4xx) is logged and passed. Logs name studies by their Orthanc id (a hash), never by a DICOM field.
"""

from __future__ import annotations

import hashlib
import io
import logging
import signal
import threading
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import pydicom
import redis
import requests
from dicomweb_client import DICOMwebClient

from xrayfm import audit
from xrayfm_router.pacs import Orthanc
from xrayfm_router.results import Source, build
from xrayfm_stack.protocol import JobStatus, StudyPrediction
from xrayfm_stack.settings import RouterSettings

log = logging.getLogger("xrayfm.router")
WHO = "router"  # the audit records' `who`
MAX_BACKOFF_S = 60.0  # the longest wait between tries while the gateway or Orthanc fails
PASSING = (httpx.TransportError, requests.ConnectionError, requests.Timeout, redis.ConnectionError)


class Passing(Exception):
    """A failure worth trying again later (nothing is marked done)."""


def describe(exc: Exception) -> str:
    """An error in words without the data it was about: an HTTP error's status and the body's error code
    (a URL may hold a study's UID), else the exception's type."""
    response = getattr(exc, "response", None)
    if response is None:
        return type(exc).__name__
    try:
        code = response.json().get("error")
    except ValueError:
        code = None
    return f"HTTP {response.status_code}" + (f" {code}" if isinstance(code, str) else "")


class Router:
    """One router: Orthanc, the gateway, and its state in Redis."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.orthanc = Orthanc(settings)
        headers = {"X-API-Key": settings.api_key} if settings.api_key else None
        self.gateway = DICOMwebClient(f"{settings.gateway_url}/dicomweb", headers=headers)
        self.gateway.set_http_retry_params(retry=False)
        self.gateway_http = httpx.Client(headers=headers, timeout=settings.timeout_s)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self.stopping = threading.Event()

    # -- state -------------------------------------------------------------------------------------------
    @property
    def since_key(self) -> str:
        return f"{self.settings.prefix}:since"

    def answered_key(self, study_id: str) -> str:
        return f"{self.settings.prefix}:answered:{study_id}"

    def position(self) -> int:
        """Where the feed is read from: the saved position; else the start (backfill) or the latest change."""
        saved = self.redis.get(self.since_key)
        if saved is not None:
            return int(saved)
        since = 0 if self.settings.backfill else self.orthanc.last_change()
        self.redis.set(self.since_key, since)
        return since

    # -- one study ---------------------------------------------------------------------------------------
    def answer(self, study_id: str) -> str:
        """Answer one study (Orthanc id) unless it was answered with the same instances; what happened."""
        instances = self.orthanc.source_instances(study_id)
        if not instances:
            return "no source instance"
        fingerprint = hashlib.sha256("\n".join(instances).encode()).hexdigest()
        if self.redis.get(self.answered_key(study_id)) == fingerprint.encode():
            return "answered before"
        sources = []
        for instance_id in instances:
            data = self.orthanc.instance_file(instance_id)
            sources.append(Source(data, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)))
        outcome = self.ask_gateway(sources)
        remember = int(self.settings.remember_days * 86400)
        self.redis.set(self.answered_key(study_id), fingerprint, ex=remember)
        return outcome

    def ask_gateway(self, sources: list[Source]) -> str:
        """STOW-RS the study's instances to the gateway; store its answer back (when it gave one)."""
        study_uid = str(sources[0].header.StudyInstanceUID)
        datasets = [pydicom.dcmread(io.BytesIO(s.data)) for s in sources]
        try:
            response = self.gateway.store_instances(datasets, study_instance_uid=study_uid)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 409:  # none answered: every series skipped (the gateway's audit says why)
                return "no series for the model"
            if status == 429 or status >= 500:
                raise Passing(f"gateway answered {status}") from None
            raise  # refused for good: logged by the caller, not tried again
        referenced = [
            str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])
        ]
        job_url = str(response.get("RetrieveURL") or "")
        if not job_url:
            return "no answer"
        by_uid = {str(s.header.SOPInstanceUID): s for s in sources}  # referenced: in the answer's order
        return self.store_results(
            job_url, [by_uid[uid] for uid in referenced], len(sources) - len(referenced)
        )

    def fetch_answer(self, job_url: str) -> StudyPrediction:
        """The gateway's answer to the job the STOW-RS response's Retrieve URL names. Asked of
        XRAYFM_GATEWAY_URL, not of the URL's host: that comes from the request's Host header, which
        dicomweb-client sends without the port on a small request."""
        job_id = urlparse(job_url).path.rstrip("/").rpartition("/")[2]
        response = self.gateway_http.get(f"{self.settings.gateway_url}/jobs/{job_id}")
        if response.status_code >= 500:
            raise Passing(f"gateway answered {response.status_code} for the job")
        response.raise_for_status()
        status = JobStatus.model_validate(response.json())
        if not isinstance(status.result, StudyPrediction):
            raise Passing(f"job {status.job_id} is {status.status}: {status.error}")
        return status.result

    def store_results(self, job_url: str, sources: list[Source], skipped: int) -> str:
        """Build the SR and SCs of the answer, store them into the study, record ``study_result``."""
        answer = self.fetch_answer(job_url)
        built = build(answer, sources)
        try:
            self.orthanc.store([built.report, *built.captures])
        except requests.HTTPError as exc:
            self.record(
                "failed", answer, built.report, len(built.captures), skipped, reason="pacs_store_failed"
            )
            raise Passing(f"Orthanc refused the results ({exc.response.status_code})") from None
        self.record("ok", answer, built.report, len(built.captures), skipped)
        return f"answered by job {answer.job_id}: SR and {len(built.captures)} heatmap(s) stored"

    def record(
        self, outcome: str, answer: StudyPrediction, report: Any, captures: int, skipped: int,
        reason: str | None = None,
    ) -> None:  # fmt: skip
        """The ``study_result`` audit record: model, job, SR UID, counts (no patient data)."""
        model = answer.model
        audit.append(self.settings.audit_log, audit.make_record(
            "study_result", outcome, who=WHO, reason=reason, target=f"job:{answer.job_id}",
            model={"name": model.name, "version": model.version, "sha256": model.sha256},
            detail={"sr": str(report.SOPInstanceUID), "captures": captures, "images": len(answer.images),
                    "instances_skipped": skipped, "prediction": answer.prediction},
        ), durable=True)  # fmt: skip

    # -- the feed ----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Read one page of changes and handle it; True when the feed is read to its end."""
        since = self.position()
        page = self.orthanc.changes(since)
        for change in page["Changes"]:
            if change["ChangeType"] == "StableStudy":
                self.handle(change["ID"])
            self.redis.set(self.since_key, int(change["Seq"]))
        return bool(page["Done"])

    def handle(self, study_id: str) -> None:
        """Answer one study; a failure for good is logged and passed, a passing one raised (tried again)."""
        started = time.perf_counter()
        try:
            outcome = self.answer(study_id)
        except (Passing, *PASSING):
            raise
        except Exception as exc:  # refused for good (a 4xx, a study the library cannot use): passed
            log.error("study %s not answered: %s", study_id, describe(exc))
            return
        log.info("study %s: %s (%.1f s)", study_id, outcome, time.perf_counter() - started)

    def run(self) -> None:
        """Follow the feed until stopped (SIGTERM, SIGINT). After a passing failure it waits
        ``XRAYFM_ROUTER_POLL_S``, doubled with each failure in a row up to :data:`MAX_BACKOFF_S`."""
        log.info("following %s/changes, asking %s", self.settings.orthanc_url, self.settings.gateway_url)
        failures = 0
        while not self.stopping.is_set():
            try:
                done, failures = self.step(), 0
            except (Passing, *PASSING, httpx.HTTPStatusError) as exc:
                failures += 1
                log.warning("will try again (failure %d in a row): %s", failures, exc)
                done = True
            if done:
                self.stopping.wait(min(self.settings.poll_s * 2 ** min(failures, 16), MAX_BACKOFF_S))


def main() -> None:
    """``python -m xrayfm_router``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "dicomweb_client", "highdicom"):  # a line per request or module, naming UIDs
        logging.getLogger(chatty).setLevel(logging.WARNING)
    router = Router(RouterSettings.from_env())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: router.stopping.set())
    router.run()
