"""What a failed training job tells the API: the library's own errors in full, anything else by type and
place only (its message may quote the data); the traceback stays in the run folder's job.log."""

from __future__ import annotations

from xrayfm.errors import DataError
from xrayfm_training.joblog import JobLog
from xrayfm_training.worker import failure_text


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_failure_text_keeps_library_errors_and_hides_other_messages():
    assert failure_text(_raised(DataError("/data/x.csv lacks the columns ['Edema']"))) == (
        "DataError: /data/x.csv lacks the columns ['Edema']"
    )
    text = failure_text(_raised(ValueError("could not convert string to float: 'SECRET=abc'")))
    assert text.startswith("ValueError in test_job_errors.py:") and "SECRET" not in text and "job.log" in text


def test_a_traceback_goes_to_job_log_not_to_redis(records, tmp_path):
    job_id = records.create({"kind": "pretrain", "name": "m", "config": {}})
    JobLog(records, job_id, tmp_path)("failed: ValueError", detail="Traceback ...\nValueError: 'SECRET=abc'")
    assert records.log_tail(job_id)[-1].endswith("failed: ValueError")
    assert "SECRET" not in "".join(records.log_tail(job_id))
    assert "SECRET=abc" in (tmp_path / "job.log").read_text()
