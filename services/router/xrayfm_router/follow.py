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
5. a ``study_result`` record in the audit log (the model, the job, the SR's UID; no patient data);
6. a short record of the study (:class:`~xrayfm_stack.protocol.StudyRecord`: the answer, each series answered
   or skipped with the gate's reason codes, the SR and SCs written, or what failed) first in a capped list
   in Redis (:mod:`xrayfm_stack.studies`), which the gateway's ``GET /studies`` serves to the UI. A study
   with no series for the model, and one refused for good, are listed too.

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
from dataclasses import dataclass
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
from xrayfm_stack import studies
from xrayfm_stack.protocol import JobStatus, SeriesOutcome, StudyPrediction, StudyRecord
from xrayfm_stack.settings import RouterSettings

log = logging.getLogger("xrayfm.router")
WHO = "router"  # the audit records' `who`
MAX_BACKOFF_S = 60.0  # the longest wait between tries while the gateway or Orthanc fails
PASSING = (httpx.TransportError, requests.ConnectionError, requests.Timeout, redis.ConnectionError)
# STOW-RS Failure Reasons (as the gateway uses them) in words; 0xC000 with a Retrieve URL: the gate refused
FAILURE_REASONS = {
    0x0110: "corrupt_image",
    0x0122: "not_an_image",
    0xA900: "other_study",
    0xC000: "own_result",
}


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


@dataclass
class Sent:
    """A study as the gateway took it: the instances it answered (in the answer's order), how many it did
    not, each series' outcome, and the job that answered (empty when none did)."""

    study_id: str
    answered: list[Source]
    skipped: int
    series: list[SeriesOutcome]
    job_url: str


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
        outcome = self.ask_gateway(study_id, sources)
        remember = int(self.settings.remember_days * 86400)
        self.redis.set(self.answered_key(study_id), fingerprint, ex=remember)
        return outcome

    def ask_gateway(self, study_id: str, sources: list[Source]) -> str:
        """STOW-RS the study's instances to the gateway; store its answer back (when it gave one)."""
        study_uid = str(sources[0].header.StudyInstanceUID)
        datasets = [pydicom.dcmread(io.BytesIO(s.data)) for s in sources]
        try:
            response = self.gateway.store_instances(datasets, study_instance_uid=study_uid)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 409:  # none answered: every series skipped (the gateway's audit says why)
                sent = self.read_response(study_id, sources, pydicom.Dataset.from_json(exc.response.json()))
                self.list_study(StudyRecord(study=study_id, outcome="skipped", series=sent.series))
                return "no series for the model"
            if status == 429 or status >= 500:
                raise Passing(f"gateway answered {status}") from None
            raise  # refused for good: logged by the caller, not tried again
        sent = self.read_response(study_id, sources, response)
        if not sent.job_url:
            return "no answer"
        return self.store_results(sent)

    def read_response(self, study_id: str, sources: list[Source], response: pydicom.Dataset) -> Sent:
        """What the STOW-RS `response` says of each instance and series; the gate's reason codes of a
        refused series from the refusing job its Failed SOP items name."""
        referenced = [str(i.ReferencedSOPInstanceUID) for i in response.get("ReferencedSOPSequence", [])]
        failed = {str(i.ReferencedSOPInstanceUID): i for i in response.get("FailedSOPSequence", [])}
        by_series: dict[str, list[str]] = {}
        for header in (s.header for s in sources):
            by_series.setdefault(str(header.SeriesInstanceUID), []).append(str(header.SOPInstanceUID))
        series = [self.series_outcome(uid, sops, set(referenced), failed) for uid, sops in by_series.items()]
        by_uid = {str(s.header.SOPInstanceUID): s for s in sources}
        answered = [by_uid[uid] for uid in referenced]
        job_url = str(response.get("RetrieveURL") or "")
        return Sent(study_id, answered, len(sources) - len(answered), series, job_url)

    def series_outcome(
        self, series_uid: str, sops: list[str], referenced: set[str], failed: dict[str, pydicom.Dataset]
    ) -> SeriesOutcome:
        """One series: answered when an instance of it was; the Failure Reason of its first failed instance
        in words, and the gate's reason codes when the gate refused it (its item names the refusing job)."""
        item = next((failed[uid] for uid in sops if uid in failed), None)
        reason, gate = None, []
        if item is not None and item.get("RetrieveURL"):
            reason, gate = "out_of_domain", self.gate_reasons(str(item.RetrieveURL))
        elif item is not None:
            code = int(item.get("FailureReason", 0))
            reason = FAILURE_REASONS.get(code, f"0x{code:04X}")
        answered = any(uid in referenced for uid in sops)
        tag = studies.series_tag(series_uid)
        return SeriesOutcome(series=tag, instances=len(sops), answered=answered, reason=reason, gate=gate)

    def job_status(self, job_url: str) -> JobStatus:
        """The job a STOW-RS Retrieve URL names. Asked of XRAYFM_GATEWAY_URL, not of the URL's host: that
        comes from the request's Host header, which dicomweb-client sends without the port on a small
        request."""
        job_id = urlparse(job_url).path.rstrip("/").rpartition("/")[2]
        response = self.gateway_http.get(f"{self.settings.gateway_url}/jobs/{job_id}")
        if response.status_code >= 500:
            raise Passing(f"gateway answered {response.status_code} for the job")
        response.raise_for_status()
        return JobStatus.model_validate(response.json())

    def gate_reasons(self, job_url: str) -> list[str]:
        """The domain gate's reason codes for the series its job refused (none when the job is gone)."""
        try:
            status = self.job_status(job_url)
        except httpx.HTTPStatusError:
            return []
        return [r.code for r in status.domain.reasons] if status.domain is not None else []

    def fetch_answer(self, job_url: str) -> StudyPrediction:
        """The gateway's answer to the job the STOW-RS response's Retrieve URL names."""
        status = self.job_status(job_url)
        if not isinstance(status.result, StudyPrediction):
            raise Passing(f"job {status.job_id} is {status.status}: {status.error}")
        return status.result

    def store_results(self, sent: Sent) -> str:
        """Build the SR and SCs of the answer, store them into the study, record the outcome."""
        answer = self.fetch_answer(sent.job_url)
        built = build(answer, sent.answered)
        try:
            self.orthanc.store([built.report, *built.captures])
        except requests.HTTPError as exc:
            self.record("failed", sent, answer, built.report, len(built.captures), reason="pacs_store_failed")
            raise Passing(f"Orthanc refused the results ({exc.response.status_code})") from None
        self.record("ok", sent, answer, built.report, len(built.captures))
        return f"answered by job {answer.job_id}: SR and {len(built.captures)} heatmap(s) stored"

    def record(
        self, outcome: str, sent: Sent, answer: StudyPrediction, report: Any, captures: int,
        reason: str | None = None,
    ) -> None:  # fmt: skip
        """The ``study_result`` audit record (model, job, SR UID, counts) and the study's line in the list
        (no patient data in either)."""
        model = answer.model
        audit.append(self.settings.audit_log, audit.make_record(
            "study_result", outcome, who=WHO, reason=reason, target=f"job:{answer.job_id}",
            model={"name": model.name, "version": model.version, "sha256": model.sha256},
            detail={"sr": str(report.SOPInstanceUID), "captures": captures, "images": len(answer.images),
                    "instances_skipped": sent.skipped, "prediction": answer.prediction},
        ), durable=True)  # fmt: skip
        ok = outcome == "ok"
        self.list_study(StudyRecord(
            study=sent.study_id, outcome="answered" if ok else "failed", job_id=answer.job_id,
            prediction=answer.prediction, probability=answer.probability, model=f"{model.name}/{model.version}",
            series=sent.series, sr_written=ok, captures=captures if ok else 0, error=reason,
        ))  # fmt: skip

    def list_study(self, record: StudyRecord) -> None:
        """Put the study's record first in the list ``GET /studies`` serves."""
        studies.push(self.redis, self.settings.prefix, record)

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
            self.list_study(StudyRecord(study=study_id, outcome="failed", error=describe(exc)))
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
