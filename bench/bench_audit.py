"""What an audit line costs (xrayfm.audit): the gateway writes a prediction's line on the event loop, so
that append must stay well under what a thread hand-off costs; admin lines are fsynced in a thread.

Measured on a temporary folder on the same disk as the repository (``--dir`` to choose another):

- ``append``: one prediction line as the gateway writes it (lock, read head and last line, write, head);
- ``append, fsync``: an admin line (both files fsynced);
- ``append, N processes``: N processes appending at once to one file (the lock's cost under contention);
- ``verify``: the whole chain, per 1,000 lines.

    .venv/bin/python bench/bench_audit.py              # 2,000 appends, 4 processes
    .venv/bin/python bench/bench_audit.py --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from xrayfm import audit


def _line(n: int) -> dict:
    """A prediction's line, as large as the gateway's."""
    return audit.make_record(
        "predict", "ok", who="3fa2c81b90de", status=200, target="job:2f1e0c7a-8d8e-4a35-9b0b-3f1f0e6c9a11",
        model={"name": "cxr-vit-tiny-mae-pneumonia-lora", "version": "12", "sha256": "ab" * 32},
        detail={"domain": [{"in_domain": True, "reasons": []}], "n": n},
    )  # fmt: skip


def _times(path: Path, count: int, durable: bool) -> list[float]:
    """Seconds of each of `count` appends."""
    spent = []
    for n in range(count):
        start = time.perf_counter()
        audit.append(path, _line(n), durable=durable)
        spent.append(time.perf_counter() - start)
    return spent


def _worker(path: str, count: int) -> None:
    for n in range(count):
        audit.append(path, _line(n))


def _summary(spent: list[float]) -> dict[str, float]:
    ordered = sorted(spent)
    return {"median_us": round(1e6 * statistics.median(ordered), 1),
            "p99_us": round(1e6 * ordered[int(0.99 * (len(ordered) - 1))], 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=2000, help="appends timed (default 2000)")
    parser.add_argument("--processes", type=int, default=4, help="processes appending at once (default 4)")
    parser.add_argument("--dir", default="runs", help="folder for the temporary logs (default runs/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-audit-") as tmp:
        log = Path(tmp) / "audit.jsonl"
        results = {"append": _summary(_times(log, args.appends, False)),
                   "append, fsync": _summary(_times(log, max(args.appends // 10, 50), True))}  # fmt: skip
        shared = Path(tmp) / "shared.jsonl"
        per = args.appends // args.processes
        start = time.perf_counter()
        procs = [multiprocessing.get_context("fork").Process(target=_worker, args=(str(shared), per))
                 for _ in range(args.processes)]  # fmt: skip
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        wall = time.perf_counter() - start
        results[f"append, {args.processes} processes"] = {"lines_per_s": round(per * args.processes / wall)}
        start = time.perf_counter()
        check = audit.verify(log)
        lines = check.records
        results["verify"] = {"ms_per_1000_lines": round(1e3 * (time.perf_counter() - start) / lines * 1000, 2),
                             "intact": check.intact and audit.verify(shared).intact}  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, row in results.items():
            print(f"{name:<24} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
