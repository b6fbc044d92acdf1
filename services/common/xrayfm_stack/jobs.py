"""Training job records in Redis: status, spec, progress, result, error, cancel flag, and the run lock;
and the first-start bootstrap's state, which the training worker writes and the gateway's /ready reads.

One hash per job (``<queue>:tjob:<id>``, JSON values per field, so the worker's progress updates and the
gateway's cancel never overwrite each other) and a sorted set of job ids by submission time; beside the
hash, a job may have its cancel flag (``:cancel``), run lock (``:lock``) and log (``:log``). Synchronous
redis-py: the worker calls it directly, the gateway from a thread.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import redis

TERMINAL = ("done", "failed", "cancelled")
ACTIVE = ("running", "cancelling")  # a worker holds the job's lock while it is in one of these
LOG_LINES = 2000  # the last lines of a job's log kept in Redis (the whole log is in its run folder)
LOG_TTL_S = 30 * 24 * 3600  # ... for 30 days after its last line (the file in the run folder stays)
STATES = ("queued", "running", "cancelling", *TERMINAL)
FIELDS = ("status", "kind", "name", "spec", "progress", "result", "model", "error", "created", "updated",
          "started", "finished", "attempts", "worker", "resumed", "requeued", "handed_back")  # fmt: skip

# Atomically: if the job is running/cancelling and nobody holds its lock, set its status (ARGV[1], JSON)
# and return the old one. Atomic so that a job finishing right now is never taken for an orphan.
_CLAIM_ORPHAN = """
local status = redis.call('hget', KEYS[1], 'status')
if (status == '"running"' or status == '"cancelling"') and redis.call('exists', KEYS[2]) == 0 then
  redis.call('hset', KEYS[1], 'status', ARGV[1], 'updated', ARGV[2])
  return status
end
return false
"""

# Atomically: if the job has finished (its status, JSON, is one of ARGV[2:]) and no worker holds its lock
# (one that does may still write its last log line), delete its record, cancel flag and log and drop it from
# the index. Returns {status, 1 if deleted else 0}, or nothing for an unknown job.
_DELETE_FINISHED = """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return false end
local finished = false
for i = 2, #ARGV do
  if status == ARGV[i] then finished = true end
end
if not finished or redis.call('exists', KEYS[3]) == 1 then return {status, 0} end
redis.call('del', KEYS[1], KEYS[2], KEYS[4])
redis.call('zrem', KEYS[5], ARGV[1])
return {status, 1}
"""


def as_text(value: bytes | str, errors: str = "strict") -> str:
    """A Redis reply as text: redis-py answers bytes (its clients here do not decode), typed bytes | str."""
    return value if isinstance(value, str) else value.decode(errors=errors)


class JobRecords:
    """Read and write training job records under the queue's key prefix."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self.queue = queue
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)

    def key(self, job_id: str) -> str:
        return f"{self.queue}:tjob:{job_id}"

    @property
    def index_key(self) -> str:
        return f"{self.queue}:tjobs"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.queue}:tjob:{job_id}:cancel"

    def lock_key(self, job_id: str) -> str:
        return f"{self.queue}:tjob:{job_id}:lock"

    def log_key(self, job_id: str) -> str:
        return f"{self.queue}:tjob:{job_id}:log"

    # -- records ---------------------------------------------------------------------------------------
    def create(self, spec: dict[str, Any]) -> str:
        """Record a new queued job for a validated spec; returns its id."""
        job_id = str(uuid.uuid4())
        now = time.time()
        fields = {"status": "queued", "kind": spec["kind"], "name": spec["name"], "spec": spec,
                  "created": now, "updated": now, "attempts": 0}  # fmt: skip
        pipe = self.redis.pipeline()
        pipe.hset(self.key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})
        pipe.zadd(self.index_key, {job_id: now})
        pipe.execute()
        return job_id

    def update(self, job_id: str, **fields: Any) -> None:
        """Set some fields of a job (and its ``updated`` time)."""
        fields["updated"] = time.time()
        self.redis.hset(self.key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record with the id, or None if unknown."""
        raw = self.redis.hgetall(self.key(job_id))
        if not raw:
            return None
        return {"job_id": job_id, **{as_text(k): json.loads(v) for k, v in raw.items()}}

    def delete(self, job_id: str) -> tuple[str, bool] | None:
        """Delete a finished job's record, cancel flag, log and index entry, all at once; its run folder and
        any version it published stay. Returns its status and whether it was deleted (not while queued,
        running or still held by its worker); None for an unknown job."""
        keys = (self.key(job_id), self.cancel_key(job_id), self.lock_key(job_id), self.log_key(job_id))
        terminal = [json.dumps(status) for status in TERMINAL]
        answer = self.redis.eval(_DELETE_FINISHED, 5, *keys, self.index_key, job_id, *terminal)
        if answer is None:
            return None
        status, deleted = answer
        return json.loads(status), bool(deleted)

    def latest_ids(self, limit: int | None = None) -> list[str]:
        """The ids of the latest `limit` jobs (all when None), newest first."""
        end = -1 if limit is None else limit - 1
        # redis-py types every reply form of ZREVRANGE together; without withscores it is the members alone
        members = cast(list[bytes], self.redis.zrevrange(self.index_key, 0, end))
        return [as_text(i) for i in members]

    # -- the job's log (its last LOG_LINES lines) --------------------------------------------------------
    def append_log(self, job_id: str, line: str) -> None:
        """Add a line to the job's log, keeping the last LOG_LINES for LOG_TTL_S after the last one."""
        pipe = self.redis.pipeline()
        pipe.rpush(self.log_key(job_id), line)
        pipe.ltrim(self.log_key(job_id), -LOG_LINES, -1)
        pipe.expire(self.log_key(job_id), LOG_TTL_S)
        pipe.execute()

    def log_tail(self, job_id: str, lines: int = 200) -> list[str]:
        """The last `lines` lines of the job's log, oldest first."""
        return [as_text(b, errors="replace") for b in self.redis.lrange(self.log_key(job_id), -lines, -1)]

    # -- cancel ----------------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> str:
        """Ask a job to stop; returns its new status (queued -> cancelled at once, running -> cancelling)."""
        self.redis.set(self.cancel_key(job_id), "1")
        job = self.get(job_id) or {}
        if job.get("status") == "queued":
            self.update(job_id, status="cancelled", finished=time.time(), error=None)
            return "cancelled"
        if job.get("status") == "running":
            self.update(job_id, status="cancelling")
            return "cancelling"
        return str(job.get("status"))

    def cancel_requested(self, job_id: str) -> bool:
        """True once someone asked this job to stop."""
        return bool(self.redis.exists(self.cancel_key(job_id)))

    # -- the run lock: one worker runs a job at a time -------------------------------------------------
    def acquire(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's lock for `ttl_s` seconds (renew with :meth:`renew`); False if someone holds it."""
        return bool(self.redis.set(self.lock_key(job_id), owner, nx=True, px=int(ttl_s * 1000)))

    def renew(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Extend our lock; False if it lapsed or is someone else's."""
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
        return bool(self.redis.eval(script, 1, self.lock_key(job_id), owner, int(ttl_s * 1000)))

    def active_ids(self, limit: int = 1000) -> list[str]:
        """Ids of the latest `limit` jobs that say they are running or cancelling."""
        ids = self.latest_ids(limit)
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(self.key(job_id), "status")
        statuses = pipe.execute()
        return [i for i, s in zip(ids, statuses, strict=True) if s and json.loads(s) in ACTIVE]

    def queued_ids(self, older_than_s: float = 0.0, limit: int = 1000) -> list[str]:
        """Ids of the latest `limit` jobs that say they are queued and were last updated over `older_than_s`
        seconds ago."""
        ids = self.latest_ids(limit)
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hmget(self.key(job_id), ["status", "updated"])
        cutoff = time.time() - older_than_s
        return [
            job_id
            for job_id, (status, updated) in zip(ids, pipe.execute() if ids else [], strict=True)
            if status and json.loads(status) == "queued" and float(json.loads(updated or "0")) <= cutoff
        ]

    def claim_orphan(self, job_id: str) -> str | None:
        """If the job is running/cancelling but its lock lapsed (its worker died), mark it queued again and
        return the status it had; None when it is not an orphan (finished, or a live worker holds it)."""
        old = self.redis.eval(_CLAIM_ORPHAN, 2, self.key(job_id), self.lock_key(job_id),
                              json.dumps("queued"), json.dumps(time.time()))  # fmt: skip
        return json.loads(old) if old else None

    def release(self, job_id: str, owner: str) -> None:
        """Drop our lock (only ours)."""
        script = (
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
        )
        self.redis.eval(script, 1, self.lock_key(job_id), owner)

    # Last in the class: below this method, `list` in an annotation would name it, not the builtin.
    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest `limit` jobs, newest first (without their full spec)."""
        jobs = [self.get(job_id) for job_id in self.latest_ids(limit)]
        return [{k: v for k, v in job.items() if k != "spec"} for job in jobs if job is not None]


# -- the first-start bootstrap's state (written by the training worker, read by the gateway's /ready) --
class BootstrapState:
    """The first-start record in Redis: ``mode``, ``stage`` (queued; installing for the shipped model;
    synthesising, pretraining, adapting for the demo; promoting, done, failed), the current ``job_id``,
    ``error``, and the served ``model``."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
        self.key = f"{queue}:bootstrap"

    # Claim unless a bootstrap is under way: absent, or finished (done: the store was emptied since;
    # failed: a restart tries again). One atomic step, so only the first worker wins.
    _CLAIM = """
    local stage = redis.call('hget', KEYS[1], 'stage')
    if stage and stage ~= '"done"' and stage ~= '"failed"' then return 0 end
    redis.call('del', KEYS[1])
    redis.call('hset', KEYS[1], 'stage', ARGV[1])
    return 1
    """

    def claim(self, mode: str) -> bool:
        """Record a queued bootstrap unless one is under way (the caller checked the store is empty)."""
        if not self.redis.eval(self._CLAIM, 1, self.key, json.dumps("queued")):
            return False
        self.set(mode=mode)
        return True

    # An interrupted bootstrap: under way (not queued, done or failed) and nobody holds its lock.
    _CLAIM_ORPHAN = """
    local stage = redis.call('hget', KEYS[1], 'stage')
    if not stage or stage == '"queued"' or stage == '"done"' or stage == '"failed"' then return 0 end
    if redis.call('exists', KEYS[2]) == 1 then return 0 end
    redis.call('hset', KEYS[1], 'stage', ARGV[1])
    return 1
    """

    def claim_orphan(self, lock_key: str) -> bool:
        """Mark an interrupted bootstrap queued again (True) when its lock `lock_key` lapsed."""
        return bool(self.redis.eval(self._CLAIM_ORPHAN, 2, self.key, lock_key, json.dumps("queued")))

    def set(self, **fields: Any) -> None:
        fields["updated"] = time.time()
        self.redis.hset(self.key, mapping={k: json.dumps(v) for k, v in fields.items()})

    def get(self) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.key)
        return {as_text(k): json.loads(v) for k, v in raw.items()} if raw else None


def describe_bootstrap(state: dict[str, Any] | None, records: JobRecords | None = None) -> str | None:
    """A one-line account of a bootstrap in progress (or failed) for /ready; None when none or done."""
    if not state or state.get("stage") == "done":
        return None
    stage = str(state.get("stage"))
    if stage == "failed":
        return f"bootstrap failed: {state.get('error')} (see the training worker's log)"
    if state.get("mode") == "shipped":
        what = {"installing": f"installing the shipped model {state.get('model')}"}.get(stage, stage)
        return f"bootstrapping: {what}"
    what = {"queued": "queued", "synthesising": "drawing the synthetic phantoms",
            "pretraining": "pre-training the demo foundation on synthetic chest images",
            "adapting": "LoRA-adapting it to synthetic bone images",
            "promoting": "promoting the demo model"}.get(stage, stage)  # fmt: skip
    progress = ""
    if records is not None and state.get("job_id"):
        job = records.get(state["job_id"]) or {}
        p = job.get("progress") or {}
        if p.get("total_steps"):
            progress = f", step {p.get('step', 0)}/{p['total_steps']}"
    return f"bootstrapping: training the demo model on SYNTHETIC data: {what}{progress}"
