"""Switch the served model without a restart: watch the store's ``serving.json`` and load what it names.

A daemon thread looks at the pointer at most every ``XRAYFM_MODEL_POLL_S`` seconds (default 2; 0 = off).
When it names another version than the one served, ``load(ref)`` runs in that thread; the worker's load
function swaps the model only after it loaded and answered a warm-up, so a failed load keeps the old
model (the error stays in :attr:`ServingWatcher.error` for the heartbeat until a later pointer loads).
It also watches the served version's ``operating_point.json`` and calls ``retune(folder)`` when it
changes, so a new decision threshold applies within a poll without reloading the model.
Used only when serving from the store (``XRAYFM_MODEL_PATH`` unset).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from xrayfm.errors import XrayfmError
from xrayfm.operating_point import FILE as POINT_FILE
from xrayfm_stack.store import SERVING_FILE, ModelRef, resolve_model, version_dir

log = logging.getLogger("xrayfm.swap")


class ServingWatcher:
    """Calls `load(ref)` whenever the store's serving pointer names a version other than `served`, and
    `retune(folder)` whenever the served version's operating point changes."""

    def __init__(
        self,
        store: Path,
        poll_s: float,
        load: Callable[[ModelRef], None],
        served: ModelRef | None = None,
        retune: Callable[[Path], None] | None = None,
    ) -> None:
        self.store = Path(store)
        self.poll_s = poll_s
        self._load = load
        self.served = (served.name, served.version) if served is not None else None
        self.error: str | None = None
        self._seen: tuple[int, int, int] | None = None  # the pointer file's (inode, mtime, size) last read
        self._retune = retune
        self._point_seen = self._point_stat()  # the served version's operating point, as loaded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xrayfm-model-watcher", daemon=True)

    def start(self) -> ServingWatcher:
        """Start polling in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (a load in progress finishes first)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _point_stat(self) -> tuple[int, int, int] | None:
        if self.served is None:
            return None
        try:
            stat = (version_dir(self.store, *self.served) / POINT_FILE).stat()
        except (OSError, XrayfmError):  # absent, or a name the store refuses: nothing to follow
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def check_point(self) -> bool:
        """One look at the served version's operating point; True when it changed (and was applied)."""
        seen = self._point_stat()
        if seen == self._point_seen or self._retune is None or self.served is None:
            return False
        self._point_seen = seen
        self._retune(version_dir(self.store, *self.served))
        log.info("operating point of %s/%s changed: applied", *self.served)
        return True

    def check(self) -> bool:
        """One look at the pointer; loads a newly promoted version. True when the served model changed."""
        self.check_point()
        pointer = self.store / SERVING_FILE
        try:
            stat = pointer.stat()
        except FileNotFoundError:
            return False
        # promote() replaces the file atomically (new inode), so an unchanged stat means nothing new
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return False
        self._seen = seen  # a failed load is not retried until the pointer is written again
        try:
            ref = resolve_model(None, self.store)
        except Exception as exc:  # a broken pointer keeps the current model
            self.error = f"cannot switch model: {exc}"
            log.error(self.error)
            return False
        if (ref.name, ref.version) == self.served:
            self.error = None  # e.g. a promotion that failed to load was rolled back
            return False
        log.info("serving.json now names %s/%s: loading it", ref.name, ref.version)
        try:
            self._load(ref)
        except Exception as exc:
            self.error = (
                f"model {ref.name}/{ref.version} failed to load, still serving the previous one: {exc}"
            )
            log.error(self.error)
            return False
        self.served, self.error = (ref.name, ref.version), None
        self._point_seen = self._point_stat()  # the load read it
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("model watcher failed")
