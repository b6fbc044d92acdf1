"""The audit trail library (xrayfm.audit) and its CLI: the hash chain holds, and every way of tampering
with the file that it can see is seen, at the right line; the FHIR export validates."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from xrayfm import audit
from xrayfm.cli import main
from xrayfm.errors import XrayfmError


def _record(n: int = 0, **extra) -> dict:
    return audit.make_record("promote", "ok", who="3fa2c81b90de", status=200, target=f"model:m/{n}",
                             model={"name": "m", "version": str(n), "sha256": "ab" * 32}, **extra)  # fmt: skip


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    for n in range(5):
        audit.append(path, _record(n), durable=n % 2 == 0)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _check(path: Path) -> tuple[bool, int | None, str]:
    found = audit.verify(path)
    return found.intact, found.line, found.problem or ""


def test_appended_records_chain_and_verify(log):
    records = [json.loads(line) for line in _lines(log)]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:], strict=False))
    assert records[0]["time"].endswith("Z") and records[0]["who"] == "3fa2c81b90de"
    found = audit.verify(log)
    assert found.intact and found.records == 5 and found.head == {"seq": 4, "hash": records[-1]["hash"]}
    assert audit.read_head(log) == found.head
    (log.parent / "empty.jsonl").touch()
    assert audit.verify(log.parent / "empty.jsonl") == audit.AuditCheck(True, 0)


def test_an_edited_line_is_found_even_with_its_hash_recomputed(log):
    lines = _lines(log)
    lines[2] = lines[2].replace('"outcome":"ok"', '"outcome":"refused"')
    log.write_text("".join(lines))
    assert _check(log)[:2] == (False, 3) and "edited" in _check(log)[2]
    record = json.loads(lines[2])  # the forger recomputes the edited line's hash: the next line breaks
    record["hash"] = audit.record_hash(record)
    lines[2] = audit.canonical(record).decode() + "\n"
    log.write_text("".join(lines))
    assert _check(log)[:2] == (False, 4) and "does not follow" in _check(log)[2]


@pytest.mark.parametrize(
    ("tamper", "line", "words"),
    [
        (lambda lines: lines[:2] + lines[3:], 3, "does not follow"),  # a line deleted
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2, "does not follow"),  # reordered
        (lambda lines: [*lines[:3], lines[1], *lines[3:]], 4, "does not follow"),  # a copy inserted
        (lambda lines: lines[1:], 1, "deleted from its start"),  # the first line deleted
        (lambda lines: lines[:-1], 5, "cut from the end"),  # the last line cut: the head still names it
        (lambda lines: lines[:-2], 4, "cut from the end"),
        (lambda lines: [*lines[:-1], lines[-1][:40]], 5, "incomplete"),  # a write cut short
        (lambda lines: [*lines[:2], "not json\n", *lines[2:]], 3, "not JSON"),
    ],
)
def test_tampering_is_found_at_its_line(log, tamper, line, words):
    log.write_text("".join(tamper(_lines(log))))
    intact, where, problem = _check(log)
    assert not intact and where == line and words in problem, problem
    assert main(["audit", "verify", str(log)]) == 1


def test_a_cut_tail_with_its_head_deleted_is_reported_and_a_rewritten_head_needs_an_anchor(log):
    head = audit.verify(log).head
    log.write_text("".join(_lines(log)[:-1]))
    audit.head_path(log).unlink()
    intact, _, problem = _check(log)
    assert not intact and "no head file" in problem
    # The limit: whoever rewrites the head to the new last line hides the cut; an anchor kept elsewhere does not.
    last = json.loads(_lines(log)[-1])
    audit.head_path(log).write_text(json.dumps({"seq": last["seq"], "hash": last["hash"]}))
    assert audit.verify(log).intact
    found = audit.verify(log, anchor=(head["seq"], head["hash"]))
    assert not found.intact and "anchor names record 4" in found.problem
    assert main(["audit", "verify", str(log), "--anchor", f"{head['seq']}:{head['hash']}"]) == 1


def test_after_a_cut_the_next_line_keeps_the_gap_visible(log):
    log.write_text("".join(_lines(log)[:-2]))
    audit.append(log, _record(9))
    assert json.loads(_lines(log)[-1])["seq"] == 5  # chained from the head, not from the cut end
    intact, line, problem = _check(log)
    assert not intact and line == 4 and "does not follow" in problem


def test_a_crash_between_line_and_head_is_no_error_and_the_next_append_repairs_it(log):
    previous_head = audit.head_path(log).read_bytes()
    audit.append(log, _record(5))
    audit.head_path(log).write_bytes(previous_head)  # the head write never happened
    assert audit.verify(log).intact
    audit.append(log, _record(6))
    assert [json.loads(x)["seq"] for x in _lines(log)][-2:] == [5, 6] and audit.verify(log).intact


def test_a_line_cut_short_stays_a_broken_line_of_its_own(log):
    log.write_text("".join(_lines(log)) + '{"seq": 5, "half')
    audit.append(log, _record(6))
    lines = _lines(log)
    assert lines[5] == '{"seq": 5, "half\n' and json.loads(lines[6])["seq"] == 5
    assert _check(log)[:2] == (False, 6)


def _appender(path: str, worker: int, count: int) -> None:
    for n in range(count):
        audit.append(path, audit.make_record("predict", "ok", who=f"w{worker}", status=200, detail={"n": n}))


def test_concurrent_appends_from_several_processes_keep_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_appender, args=(str(path), w, 40)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    found = audit.verify(path)
    assert found.intact and found.records == 160, found
    whos = [json.loads(line)["who"] for line in _lines(path)]
    assert {w: whos.count(w) for w in set(whos)} == {f"w{w}": 40 for w in range(4)}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"action": "format_disk"}, "action must be one of"),
        ({"outcome": "maybe"}, "outcome must be one of"),
        ({"reason": "Not A Code"}, "reason must be a lower-case code"),
        ({"target": "x" * 201}, "at most 200"),
        ({"detail": {"x": "y" * 3000}}, "detail longer"),
        ({"detail": {"x": float("nan")}}, "plain JSON"),
    ],
)
def test_records_are_checked(kwargs, words):
    args = {"action": "predict", "outcome": "ok", "who": "anonymous", **kwargs}
    with pytest.raises(XrayfmError, match=words):
        audit.make_record(args.pop("action"), args.pop("outcome"), **args)


def test_fhir_export_validates_as_r4b_audit_events(log, tmp_path, capsys):
    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.bundle import Bundle

    audit.append(
        log, audit.make_record("predict", "refused", who="anonymous", status=422, reason="out_of_domain")
    )
    records = audit.load(log)
    event = audit.to_fhir(records[0])
    assert isinstance(event, AuditEvent) and event.id == records[0]["hash"]
    assert event.outcome == "0" and event.action == "U" and event.subtype[0].code == "promote"
    assert event.agent[0].who.identifier.value == "3fa2c81b90de"
    refused = audit.to_fhir(records[-1])
    assert refused.outcome == "4" and refused.outcomeDesc == "422 out_of_domain" and refused.action == "E"
    assert main(["audit", "export", str(log), "--fhir"]) == 0
    bundle = Bundle.model_validate_json(capsys.readouterr().out)  # validates every entry again
    assert bundle.type == "collection" and len(bundle.entry) == 6
    assert main(["audit", "export", str(log)]) == 0
    assert [r["seq"] for r in json.loads(capsys.readouterr().out)] == list(range(6))


def test_cli_verify_says_intact_and_prints_the_head(log, capsys):
    assert main(["audit", "verify", str(log)]) == 0
    assert "intact, 5 records" in capsys.readouterr().out
    assert main(["audit", "verify", str(log), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["intact"] and said["head"]["seq"] == 4
    log.write_text("".join(_lines(log)[1:]))
    assert main(["audit", "export", str(log), "--fhir"]) == 1  # a broken log is not exported
    assert "deleted from its start" in capsys.readouterr().err
    assert main(["audit", "verify", str(log.parent / "missing.jsonl")]) == 1
