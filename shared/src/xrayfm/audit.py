"""The audit trail: who did what to which model or job, and how it ended. Torch-free.

One JSON object per line, appended only, each chained to the one before::

    {"action": "promote", "detail": null, "hash": "<sha256>", "model": {"name": "chest", "version": "3",
     "sha256": null}, "outcome": "ok", "prev": "<hash of the line before>", "reason": null,
     "request_id": "9f0c...", "seq": 41, "status": 200, "target": "model:chest/3",
     "time": "2025-05-01T09:12:03.114Z", "who": "3fa2c81b90de"}

``hash`` is the SHA-256 of the line's canonical JSON (keys sorted, no spaces, ASCII) without ``hash``;
``prev`` is the line before's ``hash`` (64 zeros for the first line) and ``seq`` counts from 0. A sidecar
``<log>.head`` holds the last line's ``seq`` and ``hash``. :func:`verify` finds:

- an edited line (its hash no longer matches), a deleted, inserted or moved line (``seq``/``prev`` break),
  lines deleted from the start (the first line is not ``seq`` 0), a line cut short by a crash;
- lines cut from the end, by the head: it names a record the log no longer reaches.

It cannot find, on its own: a rewrite of the whole chain from some line on together with the head (anyone
who can write both files can recompute every hash; there is no secret), nor the log and its head deleted
together (the next write starts a new log). Both are caught by an anchor kept elsewhere: copy the head
(``xrayfm audit verify --json`` prints it) off the machine now and then, and check against it
(``--anchor SEQ:HASH``). A crash between writing a line and its head leaves the head one line behind,
which is not an error (the next append repairs it).

Writers lock the log (flock) around read-last-hash + append + head, so several gateway processes may share
one file. A line holds no patient data: callers pass codes, ids, model names and outcomes only, never an
image, a file name or anything from a DICOM header (:mod:`xrayfm_gateway.audit` writes the stack's log).
:func:`to_fhir` turns a record into a FHIR R4B ``AuditEvent`` (the same resource as R4, what hospitals'
EHRs mostly speak; it needs the ``hospital`` extra, ``fhir.resources``).

The chain is written here by hand: no well-kept library offers a hash-chained JSON-lines log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from xrayfm.errors import XrayfmError

log = logging.getLogger("xrayfm.audit")

GENESIS = "0" * 64  # the `prev` of the first line
HEAD_SUFFIX = ".head"
HEAD_BYTES = 128  # the head is rewritten in place at this fixed size (JSON padded with spaces)
TAIL_BYTES = 16384  # how far back an append looks for the last line (make_record keeps a line < 10 KB)
ACTIONS = (
    "predict", "predict_study", "predict_job", "train_submit", "calibrate", "train_cancel", "train_delete",
    "promote", "rollback", "operating_point_set", "operating_point_clear", "study_result", "series_skipped",
    "store_gc",
)  # fmt: skip
OUTCOMES = ("requested", "ok", "refused", "failed")  # requested: written before an admin action runs
FIELDS = ("seq", "time", "who", "action", "outcome", "status", "reason", "target", "model", "request_id",
          "detail", "prev", "hash")  # fmt: skip
MAX_TEXT = 200  # characters of any one string in a record
MAX_DETAIL = 2000  # characters of a record's `detail`, as JSON
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def now_iso() -> str:
    """The time now, UTC, ISO 8601 with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical(obj: Any) -> bytes:
    """The bytes a record is hashed and written as: keys sorted, no spaces, ASCII, strict JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the record's canonical JSON without its ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise XrayfmError(f"audit {what} must be text of at most {MAX_TEXT} characters")
    return value


def make_record(
    action: str,
    outcome: str,
    *,
    who: str,
    status: int | None = None,
    reason: str | None = None,
    target: str | None = None,
    model: Mapping[str, Any] | None = None,
    request_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A checked record, not yet chained (:func:`append` adds ``seq``, ``time``, ``prev`` and ``hash``).

    `action` and `reason` are codes (``promote``, ``unauthorized``); `who` a key's hash or ``anonymous``;
    `target` what was acted on (``job:<id>``, ``model:<name>/<version>``); `model` the model's name,
    version and sha256 where known; `detail` a few more facts (codes and numbers, no patient data)."""
    if action not in ACTIONS:
        raise XrayfmError(f"audit action must be one of {ACTIONS}, got {action!r}")
    if outcome not in OUTCOMES:
        raise XrayfmError(f"audit outcome must be one of {OUTCOMES}, got {outcome!r}")
    if reason is not None and not _CODE.match(str(reason)):
        raise XrayfmError(f"audit reason must be a lower-case code, got {reason!r}")
    try:
        too_long = detail is not None and len(canonical(dict(detail))) > MAX_DETAIL
    except (TypeError, ValueError) as exc:
        raise XrayfmError(f"audit detail must be plain JSON: {exc}") from None
    if too_long:
        raise XrayfmError(f"audit detail longer than {MAX_DETAIL} characters as JSON")
    facts = None
    if model is not None:
        facts = {k: _text(model.get(k), f"model {k}") for k in ("name", "version", "sha256")}
    return {
        "who": _text(who, "who") or "anonymous",
        "action": action,
        "outcome": outcome,
        "status": None if status is None else int(status),
        "reason": reason,
        "target": _text(target, "target"),
        "model": facts,
        "request_id": _text(request_id, "request_id"),
        "detail": None if detail is None else dict(detail),
    }


# -- writing ------------------------------------------------------------------------------------------
def head_path(path: str | os.PathLike) -> Path:
    """The sidecar holding the last line's ``seq`` and ``hash``."""
    return Path(f"{os.fspath(path)}{HEAD_SUFFIX}")


def _parse_head(data: bytes) -> dict[str, Any] | None:
    try:
        head = json.loads(data)
        return {"seq": int(head["seq"]), "hash": str(head["hash"])}
    except (ValueError, KeyError, TypeError):
        return None


def read_head(path: str | os.PathLike) -> dict[str, Any] | None:
    """The log's head ``{"seq", "hash"}``, or None when there is none (or it is unreadable)."""
    try:
        return _parse_head(head_path(path).read_bytes())
    except OSError:
        return None


def _last_line(handle: BinaryIO) -> tuple[dict[str, Any] | None, bool]:
    """(the last complete line, as a record, or None; whether the file ends in a newline)."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return None, True
    handle.seek(max(0, size - TAIL_BYTES))
    tail = handle.read()
    lines = tail.rsplit(b"\n", 2)[:-1]  # the part after the last newline is not a complete line
    try:
        last = json.loads(lines[-1]) if lines else None
    except ValueError:
        last = None
    valid = isinstance(last, dict) and isinstance(last.get("seq"), int) and isinstance(last.get("hash"), str)
    return (last if valid else None), tail.endswith(b"\n")


def append(path: str | os.PathLike, record: Mapping[str, Any], *, durable: bool = False) -> dict[str, Any]:
    """Append `record` (from :func:`make_record`) to the log at `path`, chained; returns it as written.

    Under an exclusive flock of the log: read the head and the last line, write the line, rewrite the head
    in place (a fixed size: one small write, no rename; about a dozen system calls in all).
    `durable`: fsync both before returning (admin actions). Without it a crash may lose the last lines and
    leave the head ahead of the log, which :func:`verify` then reports. A log whose end no longer reaches
    its head (lines cut) is chained on from the head, so that the gap stays visible."""
    target = Path(path)
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # held until the file is closed, even if this process dies
        head_fd = os.open(head_path(target), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            head = _parse_head(os.pread(head_fd, HEAD_BYTES, 0))
            last, ends_clean = _last_line(handle)
            if last is not None and (
                head is None or (last["seq"], last.get("prev")) == (head["seq"] + 1, head["hash"])
            ):
                seq, prev = last["seq"] + 1, last["hash"]  # no head yet, or a crash kept it one line behind
            elif head is not None:
                if last is None or last["seq"] < head["seq"]:
                    log.warning(
                        "audit log %s ends before its head (record %d): lines were cut", target, head["seq"]
                    )
                seq, prev = head["seq"] + 1, head["hash"]
            else:
                seq, prev = 0, GENESIS
            chained = {**record, "seq": seq, "time": now_iso(), "prev": prev}
            chained["hash"] = record_hash(chained)
            # After a line cut short by a crash, start a new line: the broken one stays visible to verify.
            handle.write((b"" if ends_clean else b"\n") + canonical(chained) + b"\n")
            handle.flush()
            os.pwrite(
                head_fd, json.dumps({"seq": seq, "hash": chained["hash"]}).encode().ljust(HEAD_BYTES), 0
            )
            os.ftruncate(head_fd, HEAD_BYTES)
            if durable:
                os.fsync(handle.fileno())
                os.fsync(head_fd)
        finally:
            os.close(head_fd)
    return chained


# -- reading and checking -----------------------------------------------------------------------------
def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the raw line with its newline if it has one) for every line of the log."""
    try:
        with open(path, "rb") as handle:
            yield from enumerate(handle, start=1)
    except FileNotFoundError:
        raise XrayfmError(f"no audit log at {path}") from None


@dataclass(frozen=True)
class AuditCheck:
    """What :func:`verify` found: intact or not, and where it first breaks."""

    intact: bool
    records: int  # good records before the first break (all of them when intact)
    line: int | None = None  # the first broken line (1-based); lines cut from the end: the first missing
    problem: str | None = None
    head: dict[str, Any] | None = None  # the last good record's {"seq", "hash"}: what to keep elsewhere

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _problem(raw: bytes, previous: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the line as a record, None) when it continues the chain after `previous`; (None, why) otherwise."""
    if not raw.endswith(b"\n"):
        return None, "the line is incomplete (a write was cut short)"
    try:
        record = json.loads(raw)
    except ValueError:
        return None, "the line is not JSON"
    if not isinstance(record, dict) or not set(FIELDS) <= set(record) or not isinstance(record["seq"], int):
        return None, "the line is not an audit record"
    try:
        edited = record_hash(record) != record["hash"]
    except ValueError:  # NaN and the like: json.loads reads them, canonical JSON has none
        return None, "the line is not an audit record"
    if edited:
        return None, "the line was edited: its content does not match its hash"
    if previous is None and (record["seq"], record["prev"]) != (0, GENESIS):
        return None, f"the log starts at record {record['seq']}, not 0: lines were deleted from its start"
    if previous is not None and (record["seq"], record["prev"]) != (previous["seq"] + 1, previous["hash"]):
        return None, (
            f"record {record['seq']} does not follow record {previous['seq']}: "
            "a line was deleted, inserted or moved"
        )
    return record, None


def verify(path: str | os.PathLike, anchor: tuple[int, str] | None = None) -> AuditCheck:
    """Walk the chain of the log at `path`; check that it reaches its head and `anchor` (a ``(seq, hash)``
    kept elsewhere) with the same hashes. The first problem found is reported."""
    head = read_head(path)
    points = {"head": (head["seq"], head["hash"]) if head else None, "anchor": anchor}
    previous: dict[str, Any] | None = None
    count = 0
    for line, raw in read_lines(path):
        record, problem = _problem(raw, previous)
        if record is not None:
            wrong = [
                name for name, p in points.items() if p and p[0] == record["seq"] and p[1] != record["hash"]
            ]
            problem = f"record {record['seq']} differs from the {wrong[0]}" if wrong else None
        if problem is not None:
            return AuditCheck(False, count, line, f"line {line}: {problem}", _point(previous))
        previous, count = record, count + 1
    last = previous["seq"] if previous else -1
    for name, point in points.items():
        if point and point[0] > last:
            problem = f"the log ends at record {last} but its {name} names record {point[0]}: lines were cut"
            return AuditCheck(False, count, count + 1, f"{problem} from the end", _point(previous))
    if count and head is None:
        problem = f"no head file {head_path(path)}: lines cut from the end could not be told"
        return AuditCheck(False, count, None, problem, _point(previous))
    return AuditCheck(True, count, head=_point(previous))


def _point(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if record is None else {"seq": record["seq"], "hash": record["hash"]}


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of an intact log, oldest first; XrayfmError naming the first break otherwise."""
    check = verify(path)
    if not check.intact:
        raise XrayfmError(f"{path}: {check.problem}")
    return [json.loads(raw) for _, raw in read_lines(path)]


# -- FHIR ---------------------------------------------------------------------------------------------
# AuditEvent.action: Create, Delete, Execute; everything else changes what is served or run: Update.
FHIR_ACTION = {"train_submit": "C", "calibrate": "C", "study_result": "C", "train_delete": "D",
               "predict": "E", "predict_study": "E", "predict_job": "E", "series_skipped": "E",
               "store_gc": "D"}  # fmt: skip
FHIR_OUTCOME = {"ok": "0", "refused": "4", "failed": "8"}  # success, minor failure, serious failure
SYSTEM = "urn:xrayfm:audit"  # xrayfm's own codes and identifiers: actions, key hashes, targets, models


def _details(facts: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """AuditEvent.entity.detail items (type + valueString) of the facts that are set."""
    given = {k: v for k, v in facts.items() if v is not None}
    items = [{"type": k, "valueString": v if isinstance(v, str) else json.dumps(v)} for k, v in given.items()]
    return items or None


def _entity(kind: str, value: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    return {"what": {"identifier": {"system": f"{SYSTEM}:{kind}", "value": value}}, "detail": _details(facts)}


def to_fhir(record: Mapping[str, Any]) -> Any:
    """The record as a FHIR R4B ``AuditEvent`` (fhir.resources; validated as it is built)."""
    try:
        from fhir.resources.R4B.auditevent import AuditEvent
    except ImportError:
        raise XrayfmError("the FHIR export needs fhir.resources: pip install 'xrayfm[hospital]'") from None

    who = record["who"]
    agent = {"requestor": True}
    if who == "anonymous":
        agent["who"] = {"display": "anonymous (no key)"}
    else:
        agent["who"] = {"identifier": {"system": f"{SYSTEM}:api-key-sha256", "value": who}}
    chain = {k: record.get(k) for k in ("seq", "hash", "prev", "request_id")}
    entities = [{"name": "xrayfm audit record", "detail": _details(chain)}]
    if record.get("target"):
        entities.append(_entity("target", record["target"], record.get("detail") or {}))
    if record.get("model"):
        model = record["model"]
        entities.append(
            _entity("model", f"{model['name']}/{model['version']}", {"sha256": model.get("sha256")})
        )
    said = [str(p) for p in (record.get("status"), record.get("reason") or record["outcome"]) if p]
    return AuditEvent.model_validate(
        {
            "resourceType": "AuditEvent",
            "id": record["hash"],
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                "code": "rest",
                "display": "RESTful Operation",
            },
            "subtype": [{"system": f"{SYSTEM}:action", "code": record["action"]}],
            "action": FHIR_ACTION.get(record["action"], "U"),
            "recorded": record["time"],
            "outcome": FHIR_OUTCOME.get(record["outcome"]),
            "outcomeDesc": " ".join(said),
            "agent": [agent],
            "source": {
                "observer": {"display": "xrayfm gateway"},
                "type": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                        "code": "4",
                        "display": "Application Server",
                    }
                ],
            },
            "entity": entities,
        }
    )


def fhir_bundle(records: Iterable[Mapping[str, Any]]) -> Any:
    """A FHIR R4B ``Bundle`` (type collection) of the records' AuditEvents."""
    from fhir.resources.R4B.bundle import Bundle

    entries = [{"resource": to_fhir(r)} for r in records]
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "collection", "timestamp": now_iso(), "entry": entries}
    )


__all__ = ["ACTIONS", "AuditCheck", "append", "fhir_bundle", "load", "make_record", "read_head", "to_fhir",
           "verify"]  # fmt: skip
