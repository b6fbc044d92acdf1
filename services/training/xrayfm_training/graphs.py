"""ONNX graphs for store versions that have none: the CPU inference image has no torch, so it serves only
graphs exported at publish. A version published without them (by a release that did not export them, or
whose graph file is missing or of an older export format) gets them here, where torch is.

    python -m xrayfm_training.graphs                      # every version without intact graphs
    python -m xrayfm_training.graphs --version NAME/VERSION --dry-run

The training worker runs the same backfill in the background when it starts. A version whose export failed
at publish (its record says why) is left alone: exporting it again would fail again.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.utils import read_json
from xrayfm_stack import store as model_store
from xrayfm_stack.settings import TrainingSettings

log = logging.getLogger(__name__)


def needs_graphs(folder: Path) -> str | None:
    """Why the version in `folder` needs its graphs exported, or None when they are intact (or failed at
    publish, which a second export would repeat)."""
    from xrayfm.inference.graphs import stored_graph

    record = model_store.graphs_record(folder)
    info = read_json(folder / model_store.VERSION_FILE, {})
    onnx = info.get("onnx") if isinstance(info, dict) else None
    if isinstance(onnx, dict) and "error" in onnx and record is None:
        return None
    graph, why = stored_graph(folder, record, "none")
    return None if graph is not None else why


def export_into_version(
    store: Path, name: str, version: str, data_dirs: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Export the graphs of a stored version into its folder and record them; returns the record. The files
    are written beside, then moved in, so a worker never reads half a graph."""
    from xrayfm.inference.graphs import GRAPH_FILES, version_graphs

    folder = model_store.version_dir(store, name, version)
    with tempfile.TemporaryDirectory(prefix=".graphs-", dir=folder) as work:
        record = version_graphs(folder, Path(work), data_dirs)
        for file in GRAPH_FILES.values():
            shutil.move(str(Path(work) / file), folder / file)
    model_store.set_graphs(store, name, version, record)
    return record


def backfill(
    store: Path, data_dirs: tuple[Path, ...] = (), only: list[str] | None = None, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Export graphs for every version (or those in `only`, as ``NAME/VERSION``) that needs them; a failure
    is reported for that version, and the others go on."""
    done = []
    for row in model_store.list_versions(store):
        ref = f"{row['name']}/{row['version']}"
        if only is not None and ref not in only:
            continue
        why = needs_graphs(model_store.version_dir(store, row["name"], row["version"]))
        if why is None:
            continue
        outcome: dict[str, Any] = {"version": ref, "why": why}
        if not dry_run:
            try:
                record = export_into_version(store, row["name"], row["version"], data_dirs)
                outcome["int8"] = record.get("int8", {}).get("reason")
            except (XrayfmError, RuntimeError, ValueError) as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc}"
                log.error("could not export the graphs of %s: %s", ref, outcome["error"])
        done.append(outcome)
    return done


def main(argv: list[str] | None = None) -> int:
    settings = TrainingSettings.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m xrayfm_training.graphs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=Path(settings.model_store),
        help=f"the model store (default: {settings.model_store})",
    )
    parser.add_argument(
        "--version",
        action="append",
        metavar="NAME/VERSION",
        help="only this version (repeatable; default: all)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the versions that need graphs; export nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outcomes = backfill(args.store, tuple(settings.data_dirs), args.version, args.dry_run)
    print(json.dumps(outcomes, indent=2))
    return 1 if any("error" in o for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
