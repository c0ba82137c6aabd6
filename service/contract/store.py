"""The job store: the gateway's own job records in Redis, shared by the gateway and the workers.

Keys (``{p}`` is ``settings.key_prefix``):

- ``{p}:job:{id}``: a hash with the record; expires ``result_ttl_seconds`` after the job finishes. Its
  ``owner`` field is the hash of the API key that created it (absent with API keys off).
- ``{p}:jobs``: a sorted set of job ids by creation time (for ``GET /jobs``); pruned lazily.
- ``{p}:running``: the set of running job ids; ``{p}:hb:{id}``: a running job's heartbeat (expiring).
- ``{p}:idem:{scope}:{key}``: an Idempotency-Key's request fingerprint and job id.
- ``{p}:workers``: a sorted set of worker names by their last heartbeat (for ``/readyz``).
- ``{p}:model``: the served model's name, limits and defaults, as the last worker to start published them.
- ``{p}:webhooks``: the webhook outbox, a sorted set of finished job ids by when their event's next
  delivery attempt is due. The delivery state lives on the record (``webhook_*`` fields).
- ``{p}:ends``: a hash of running job ids to when each should end; ``{p}:timing``: the moving averages of
  step, setup and finish times per job type (both explained in ``service.contract.timing``).

Every status transition is one Lua script, so a cancel, a start (or a claim of batch partners), a finish
and the reaper never race:
``queued -> running -> succeeded | failed | canceled`` and ``queued -> canceled``; terminal is final.
Progress only ever grows. The script that makes a job terminal also puts a job that has a webhook into
the outbox, so an event is never lost between the two, whichever process ended the job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from redis import Redis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline
from redis.exceptions import WatchError

from service.contract.errors import IdempotencyConflict, JobNotFound
from service.contract.schemas import (
    ErrorInfo,
    JobRecord,
    JobResult,
    JobStatus,
    JobType,
    ServedModel,
    WebhookDelivery,
)
from service.contract.timing import ALL_TYPES, SMOOTHING, QueueTiming, StepTiming

_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
"""

# ARGV: percent, when the job should end ('' if unknown), job id
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'progress') or '0') then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'ends_at', ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
end
return 1
"""

# Batch partners: each job still queued and still in the queue list leaves the list and starts, as in
# _START; one taken by another worker (no longer listed) or canceled (no longer queued) is skipped.
# KEYS: queue list, running set, then per job its record, heartbeat and queue entry (deleted).
# ARGV: started_at, worker, heartbeat ttl ms, then the job ids. Returns the ids started.
_CLAIM_QUEUED = """
local started = {}
for i = 4, #ARGV do
  local record, heartbeat, entry = KEYS[3 * i - 9], KEYS[3 * i - 8], KEYS[3 * i - 7]
  if redis.call('HGET', record, 'status') == 'queued' and redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
    redis.call('HSET', record, 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
    redis.call('SET', heartbeat, ARGV[2], 'PX', ARGV[3])
    redis.call('SADD', KEYS[2], ARGV[i])
    redis.call('DEL', entry)
    table.insert(started, ARGV[i])
  end
end
return started
"""

# Moving averages: ARGV: the newest value's weight, then field, value, field, value, ...
_AVERAGE = """
for i = 2, #ARGV, 2 do
  local value = tonumber(ARGV[i + 1])
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if old then value = old + tonumber(ARGV[1]) * (value - old) end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.6f', value))
end
"""

# KEYS: record, heartbeat, running set, webhook outbox, expected ends.
# ARGV: status, finished_at, expires_at, ttl, result json, error json, job id, '1' to accept queued too
_FINISH = """
redis.call('HDEL', KEYS[5], ARGV[7])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and not (ARGV[8] == '1' and status == 'queued') then
  redis.call('SREM', KEYS[3], ARGV[7])
  return status or ''
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2], 'expires_at', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[5], 'progress', '100') end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[6]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[7])
if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
  redis.call('ZADD', KEYS[4], 'NX', ARGV[2], ARGV[7])
end
return 'ok'
"""

# A queued job is canceled at once; a running one gets a flag that its worker checks at every step.
# Returns the status before, then the record's fields as they stand right after (HGETALL's flat list),
# so the answer cannot show what a worker did after the cancel. KEYS: record, webhook outbox.
# ARGV: finished_at, expires_at, ttl, error, job id
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {''} end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
elseif status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1], 'expires_at', ARGV[2],
             'error', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[5])
  end
end
local reply = redis.call('HGETALL', KEYS[1])
table.insert(reply, 1, status)
return reply
"""

# The due ids (at most ARGV[3]), each leased: pushed to ARGV[2] so that no other gateway takes it meanwhile.
_CLAIM_WEBHOOKS = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""

# KEYS: record, outbox. ARGV: job id, state, last status, last error, delivered at, next attempt ('' ends
# the delivery). A record gone (deleted, expired) ends it as well, without writing a stub record.
_WEBHOOK_ATTEMPTED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HINCRBY', KEYS[1], 'webhook_attempts', 1)
redis.call('HSET', KEYS[1], 'webhook_state', ARGV[2], 'webhook_last_status', ARGV[3],
           'webhook_last_error', ARGV[4], 'webhook_delivered_at', ARGV[5])
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
end
return 1
"""


@dataclass(frozen=True)
class Idempotency:
    scope: str
    key: str
    fingerprint: str


@dataclass(frozen=True)
class Submission:
    record: JobRecord
    created: bool
    queue_position: int | None = None


def _now() -> float:
    return time.time()


def _floats(raw: dict[bytes, bytes]) -> dict[str, float]:
    return {field.decode(): float(value) for field, value in raw.items()}


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


def _webhook(fields: dict[str, str]) -> WebhookDelivery | None:
    if "webhook" not in fields:
        return None
    return WebhookDelivery.model_validate(
        {
            "url": fields["webhook"],
            "state": fields.get("webhook_state", "pending"),
            "attempts": fields.get("webhook_attempts", "0"),
            "last_status": fields.get("webhook_last_status") or None,
            "last_error": fields.get("webhook_last_error") or None,
            "delivered_at": _timestamp(fields.get("webhook_delivered_at")),
        }
    )


class JobStore:
    """Job records over Redis. Thread-safe as long as the Redis client is (redis-py's is)."""

    def __init__(self, redis: Redis, *, prefix: str, result_ttl_seconds: int, heartbeat_ttl_seconds: float):
        self.redis = redis
        self.prefix = prefix
        self.result_ttl_seconds = result_ttl_seconds
        self.heartbeat_ttl_ms = int(heartbeat_ttl_seconds * 1000)
        self._index = f"{prefix}:jobs"
        self._running = f"{prefix}:running"
        self._workers = f"{prefix}:workers"
        self._model = f"{prefix}:model"
        self._tokenizer = f"{prefix}:tokenizer"
        self._webhooks = f"{prefix}:webhooks"
        self._ends = f"{prefix}:ends"
        self._timing = f"{prefix}:timing"
        self._start = redis.register_script(_START)
        self._progress = redis.register_script(_PROGRESS)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_CANCEL)
        self._claim_queued = redis.register_script(_CLAIM_QUEUED)
        self._claim_webhooks = redis.register_script(_CLAIM_WEBHOOKS)
        self._webhook_attempted = redis.register_script(_WEBHOOK_ATTEMPTED)
        self._average = redis.register_script(_AVERAGE)

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _heartbeat_key(self, job_id: str) -> str:
        return f"{self.prefix}:hb:{job_id}"

    # --- creating and reading --------------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        job_type: JobType,
        params: dict[str, Any],
        *,
        idempotency: Idempotency | None,
        idempotency_ttl_seconds: int,
        enqueue: Callable[[Pipeline], None],
        admit: Callable[[int], None],
        queue_key: str,
        owner: str | None = None,
        webhook: str | None = None,
    ) -> Submission:
        """Store a queued record and enqueue it in one transaction, or return the Idempotency-Key's job.

        ``admit(depth)`` gets the length of the list ``queue_key`` before anything is written and may
        raise (a full queue). The list is WATCHed from that read to the MULTI, so concurrent submits
        cannot all pass one depth: a submit whose list changed meanwhile reads it again, and the queue
        never holds more than ``admit`` lets in. ``enqueue`` adds the queue's writes to the same MULTI so
        that a record never exists without its queue entry. The new job's position in the list
        ``queue_key`` is read in that MULTI too. ``owner`` is kept on the record (see
        :class:`service.gateway.dependencies.Caller`); so is ``webhook``, the URL that gets the job's end.
        """
        idem_key = f"{self.prefix}:idem:{idempotency.scope}:{idempotency.key}" if idempotency else None
        now = _now()
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(queue_key, *([idem_key] if idem_key else []))
                    if idempotency and idem_key:
                        claimed = pipe.get(idem_key)
                        replayed = self._replay(json.loads(claimed), idempotency) if claimed else None
                        if replayed is not None:
                            return Submission(replayed, created=False)
                    admit(int(pipe.llen(queue_key)))
                    pipe.multi()
                    if idempotency and idem_key:
                        claim = {"fingerprint": idempotency.fingerprint, "job_id": job_id}
                        pipe.set(idem_key, json.dumps(claim), ex=idempotency_ttl_seconds)
                    pipe.hset(
                        self._job_key(job_id),
                        mapping={
                            "id": job_id,
                            "type": job_type.value,
                            "status": JobStatus.queued.value,
                            "progress": "0",
                            "created_at": repr(now),
                            "params": json.dumps(params),
                            **({"owner": owner} if owner else {}),
                            **({"webhook": webhook} if webhook else {}),
                        },
                    )
                    pipe.zadd(self._index, {job_id: now})
                    enqueue(pipe)
                    pipe.lpos(queue_key, job_id)
                    position = pipe.execute()[-1]
                    break
                except WatchError:
                    continue
        record = JobRecord(
            id=job_id,
            type=job_type,
            status=JobStatus.queued,
            progress=0,
            created_at=datetime.fromtimestamp(now, UTC),
            params=params,
            owner=owner,
            webhook=WebhookDelivery(url=webhook) if webhook else None,
        )
        return Submission(record, created=True, queue_position=position)

    def _replay(self, claim: dict[str, str], idempotency: Idempotency) -> JobRecord | None:
        """The key's job; None once that job expired (the key then starts a new job)."""
        record = self.find(claim["job_id"])
        if record is not None and claim["fingerprint"] != idempotency.fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request; use a new key for a new request"
            )
        return record

    def find(self, job_id: str) -> JobRecord | None:
        return self._parse(cast(dict[bytes, bytes], self.redis.hgetall(self._job_key(job_id))))

    def record_reads(self, pipe: Pipeline | AsyncPipeline, job_id: str, queue_key: str) -> None:
        """Queue on ``pipe`` (a sync or an asyncio pipeline) the reads :meth:`parse_record_reads` takes:
        the record and its index in the list ``queue_key``."""
        pipe.hgetall(self._job_key(job_id))
        pipe.lpos(queue_key, job_id)

    def parse_record_reads(
        self, job_id: str, raw: dict[bytes, bytes], position: int | None
    ) -> tuple[JobRecord, int | None]:
        """The record and its queue position while queued; JobNotFound if the record is gone."""
        record = self._parse(raw)
        if record is None:
            raise JobNotFound(job_id)
        return record, position if record.status == JobStatus.queued else None

    def get_with_position(self, job_id: str, queue_key: str) -> tuple[JobRecord, int | None]:
        """The record and, in the same round trip, its index in the list ``queue_key`` (None if absent)."""
        with self.redis.pipeline(transaction=False) as pipe:
            self.record_reads(pipe, job_id, queue_key)
            return self.parse_record_reads(job_id, *pipe.execute())

    def timing_reads(self, pipe: Pipeline | AsyncPipeline, *, worker_ttl_seconds: float) -> None:
        """Queue on ``pipe`` the reads :meth:`parse_timing` takes: what an ETA needs beyond the job's
        record (see ``service.contract.timing``)."""
        pipe.hgetall(self._timing)
        pipe.hvals(self._ends)
        pipe.zcount(self._workers, _now() - worker_ttl_seconds, "+inf")
        pipe.get(self._model)

    @staticmethod
    def parse_timing(replies: list[Any]) -> QueueTiming:
        averages, ends, live_workers, model = replies
        steps = None if model is None else ServedModel.model_validate_json(model).defaults.get("steps")
        return QueueTiming(
            averages=_floats(averages),
            ends=[float(value) for value in ends],
            live_workers=int(live_workers),
            default_steps=None if steps is None else int(steps),
        )

    def queue_timing(self, *, worker_ttl_seconds: float) -> QueueTiming:
        with self.redis.pipeline(transaction=False) as pipe:
            self.timing_reads(pipe, worker_ttl_seconds=worker_ttl_seconds)
            return self.parse_timing(pipe.execute())

    def get(self, job_id: str) -> JobRecord:
        record = self.find(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    @staticmethod
    def _parse(raw: dict[bytes, bytes]) -> JobRecord | None:
        if not raw or b"status" not in raw:
            return None
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        return JobRecord(
            id=fields["id"],
            type=JobType(fields["type"]),
            status=JobStatus(fields["status"]),
            progress=int(fields.get("progress", "0")),
            created_at=datetime.fromtimestamp(float(fields["created_at"]), UTC),
            started_at=_timestamp(fields.get("started_at")),
            finished_at=_timestamp(fields.get("finished_at")),
            expires_at=_timestamp(fields.get("expires_at")),
            params=json.loads(fields.get("params", "{}")),
            error=ErrorInfo.model_validate_json(fields["error"]) if "error" in fields else None,
            result=JobResult.model_validate_json(fields["result"]) if "result" in fields else None,
            worker=fields.get("worker"),
            cancel_requested=fields.get("cancel_requested") == "1",
            owner=fields.get("owner"),
            webhook=_webhook(fields),
            ends_at=float(fields["ends_at"]) if "ends_at" in fields else None,
        )

    def page(
        self,
        *,
        status: JobStatus | None,
        job_type: JobType | Collection[JobType] | None,
        before: float | None,
        limit: int,
        after: float | None = None,
        oldest_first: bool = False,
        owner: str | None = None,
        batch: int = 200,
    ) -> tuple[list[JobRecord], float | None]:
        """Jobs created strictly between ``after`` and ``before`` (creation times; None: unbounded),
        newest first unless ``oldest_first``; ``job_type`` is one type or a collection of types; only
        ``owner``'s jobs unless it is None.

        Returns the records and the creation time of the last one, to pass as ``before`` (newest first)
        or ``after`` (oldest first) for the next page; None on the last page. Keyed by time rather than
        position, so jobs expiring meanwhile shift nothing."""
        types = {job_type} if isinstance(job_type, JobType) else None if job_type is None else set(job_type)
        found: list[JobRecord] = []
        upper = "+inf" if before is None else f"({before!r}"
        lower = "-inf" if after is None else f"({after!r}"
        while True:
            if oldest_first:
                entries = cast(
                    list[tuple[bytes, float]],
                    self.redis.zrangebyscore(self._index, lower, upper, start=0, num=batch, withscores=True),
                )
            else:
                entries = cast(
                    list[tuple[bytes, float]],
                    self.redis.zrevrangebyscore(
                        self._index, upper, lower, start=0, num=batch, withscores=True
                    ),
                )
            if not entries:
                return found, None
            records = self._records([member.decode() for member, _ in entries])
            for (_, score), record in zip(entries, records, strict=True):
                if (
                    record is not None
                    and (status is None or record.status == status)
                    and (types is None or record.type in types)
                    and (owner is None or record.owner == owner)
                ):
                    found.append(record)
                    if len(found) == limit:
                        return found, score
            if oldest_first:
                lower = f"({entries[-1][1]!r}"
            else:
                upper = f"({entries[-1][1]!r}"

    def created_score(self, job_id: str) -> float | None:
        """The job's creation time as the listing index holds it (a page cursor); None if not indexed."""
        score = self.redis.zscore(self._index, job_id)
        return None if score is None else float(score)

    def find_many(self, ids: list[str]) -> list[JobRecord | None]:
        """The records of ``ids`` in one round trip, None for each that expired or never existed."""
        return self._records(ids)

    def _records(self, ids: list[str]) -> list[JobRecord | None]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._job_key(job_id))
            raws = pipe.execute()
        expired = [job_id for job_id, raw in zip(ids, raws, strict=True) if not raw]
        if expired:
            self.redis.zrem(self._index, *expired)
        return [self._parse(raw) for raw in raws]

    # --- transitions -----------------------------------------------------------------------------------

    def start(self, job_id: str, worker: str) -> bool:
        """queued -> running with a first heartbeat. False if the job is no longer queued (canceled)."""
        keys = [self._job_key(job_id), self._heartbeat_key(job_id), self._running]
        return bool(self._start(keys=keys, args=[repr(_now()), worker, self.heartbeat_ttl_ms, job_id]))

    def claim_queued(
        self, job_ids: list[str], worker: str, *, queue_key: str, queue_entries: list[str]
    ) -> list[str]:
        """Start the queued jobs ``job_ids`` on ``worker`` and take them out of the list ``queue_key``, in one
        script: atomic against cancels, other workers' dequeues and other claims. ``queue_entries[i]`` is
        the queue's own key for job ``i`` (rq's job hash), deleted with it. Returns the ids started, in
        the given order; the others were taken or canceled meanwhile."""
        keys = [queue_key, self._running]
        for job_id, entry in zip(job_ids, queue_entries, strict=True):
            keys += [self._job_key(job_id), self._heartbeat_key(job_id), entry]
        args: list[str | int] = [repr(_now()), worker, self.heartbeat_ttl_ms, *job_ids]
        return [job_id.decode() for job_id in cast(list[bytes], self._claim_queued(keys=keys, args=args))]

    def heartbeat(self, job_id: str, worker: str) -> None:
        self.redis.set(self._heartbeat_key(job_id), worker, px=self.heartbeat_ttl_ms)

    def progress(self, job_id: str, percent: int, *, ends_at: float | None = None) -> None:
        """Raise a running job's progress (never lowers it) and record when it should end (Unix seconds)."""
        keys = [self._job_key(job_id), self._ends]
        self._progress(keys=keys, args=[percent, "" if ends_at is None else repr(ends_at), job_id])

    def record_timing(self, job_type: JobType, timing: StepTiming, run_seconds: float) -> None:
        """Fold a succeeded job's times into the moving averages of its type and of all jobs."""
        fields = {**timing.fields(job_type), ALL_TYPES: run_seconds}
        args = [str(SMOOTHING), *(str(item) for pair in fields.items() for item in pair)]
        self._average(keys=[self._timing], args=args)

    def typical_timing(self, job_type: JobType) -> StepTiming | None:
        """The moving averages of ``job_type``; None before a job of that type has succeeded."""
        return StepTiming.from_fields(
            _floats(cast(dict[bytes, bytes], self.redis.hgetall(self._timing))), job_type
        )

    def cancel_requested(self, job_id: str) -> bool:
        """The job was asked to stop: canceled while running, or its record deleted (``delete``)."""
        flag, status = cast(
            list[bytes | None], self.redis.hmget(self._job_key(job_id), "cancel_requested", "status")
        )
        return flag == b"1" or status is None

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: ErrorInfo | None = None,
        from_queued: bool = False,
    ) -> bool:
        """running (or, with ``from_queued``, also queued) -> a terminal status.

        False if the job was in another status (already finished, e.g. reaped)."""
        now = _now()
        keys = [
            self._job_key(job_id),
            self._heartbeat_key(job_id),
            self._running,
            self._webhooks,
            self._ends,
        ]
        args: list[str | int] = [
            status.value,
            repr(now),
            repr(now + self.result_ttl_seconds),
            self.result_ttl_seconds,
            result.model_dump_json() if result else "",
            error.model_dump_json() if error else "",
            job_id,
            "1" if from_queued else "",
        ]
        return self._finish(keys=keys, args=args) == b"ok"

    def cancel(self, job_id: str) -> tuple[JobStatus, JobRecord]:
        """Cancel a queued job or flag a running one.

        Returns the status the job had before and its record read in the same script, right after: a
        running job's record still says ``running`` (its worker stops at its next step), even when that
        worker finishes before the caller reads the answer."""
        now = _now()
        error = ErrorInfo(code="canceled", message="canceled on request").model_dump_json()
        args: list[str | int] = [
            repr(now),
            repr(now + self.result_ttl_seconds),
            self.result_ttl_seconds,
            error,
            job_id,
        ]
        keys = [self._job_key(job_id), self._webhooks]
        before, *fields = cast(list[bytes], self._cancel(keys=keys, args=args))
        record = self._parse(dict(zip(fields[::2], fields[1::2], strict=True)))
        if record is None:  # the script found no record and returned only an empty status
            raise JobNotFound(job_id)
        return JobStatus(before.decode()), record

    def delete(self, job_id: str) -> bool:
        """Remove the record and its index entry; False if there was none. A worker still running the
        job reads the missing record as a cancel request (``cancel_requested``) and stops."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._job_key(job_id))
            pipe.zrem(self._index, job_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def lost_jobs(self) -> list[str]:
        """Running jobs whose heartbeat expired."""
        running = [job_id.decode() for job_id in cast(set[bytes], self.redis.smembers(self._running))]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.exists(self._heartbeat_key(job_id))
            alive = pipe.execute()
        return [job_id for job_id, beating in zip(running, alive, strict=True) if not beating]

    def running_count(self) -> int:
        return int(self.redis.scard(self._running))

    # --- webhook deliveries ------------------------------------------------------------------------------

    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[str]:
        """Up to ``limit`` jobs whose event is due for delivery, each leased to the caller for
        ``lease_seconds``: no other gateway takes it meanwhile, and one that dies while delivering leaves
        it to be taken again once the lease ends (at least once)."""
        now = _now()
        args: list[str | int] = [repr(now), repr(now + lease_seconds), limit]
        due = cast(list[bytes], self._claim_webhooks(keys=[self._webhooks], args=args))
        return [job_id.decode() for job_id in due]

    def webhook_attempted(
        self,
        job_id: str,
        *,
        status: int | None,
        error: str | None,
        delivered: bool,
        retry_at: float | None,
    ) -> None:
        """Record one delivery attempt on the job; retry at ``retry_at`` (Unix seconds), or end the
        delivery when it is None: delivered, or given up (state failed) unless ``delivered``."""
        state = "delivered" if delivered else "pending" if retry_at is not None else "failed"
        args: list[str | int] = [
            job_id,
            state,
            "" if status is None else status,
            error or "",
            repr(_now()) if delivered else "",
            "" if retry_at is None else repr(retry_at),
        ]
        self._webhook_attempted(keys=[self._job_key(job_id), self._webhooks], args=args)

    def drop_webhook(self, job_id: str) -> None:
        """End a delivery without an attempt (its job was deleted or expired)."""
        self.redis.zrem(self._webhooks, job_id)

    def webhook_backlog(self) -> int:
        """Events waiting for their delivery (or their next attempt)."""
        return int(self.redis.zcard(self._webhooks))

    # --- workers -----------------------------------------------------------------------------------------

    def publish_model(self, model: ServedModel, tokenizer: str | None = None) -> None:
        """Record what the workers serve (each worker at start; all workers of a queue serve one model),
        with the ``tokenizer.json`` its prompts are counted in (None: none the gateway can load)."""
        with self.redis.pipeline() as pipe:
            pipe.set(self._model, model.model_dump_json())
            if tokenizer is None:
                pipe.delete(self._tokenizer)
            else:
                pipe.set(self._tokenizer, tokenizer)
            pipe.execute()

    def served_tokenizer(self) -> str | None:
        """The served model's ``tokenizer.json`` (see :meth:`publish_model`)."""
        raw = cast(bytes | None, self.redis.get(self._tokenizer))
        return None if raw is None else raw.decode()

    def served_model(self) -> ServedModel | None:
        raw = self.redis.get(self._model)
        return None if raw is None else ServedModel.model_validate_json(raw)

    def worker_alive(self, name: str) -> None:
        self.redis.zadd(self._workers, {name: _now()})

    def worker_gone(self, name: str) -> None:
        self.redis.zrem(self._workers, name)

    def worker_seen(self, name: str) -> bool:
        """The worker ``name`` has sent a heartbeat (it loaded its model and serves)."""
        return self.redis.zscore(self._workers, name) is not None

    def live_workers(self, ttl_seconds: float) -> int:
        cutoff = _now() - ttl_seconds
        self.redis.zremrangebyscore(self._workers, "-inf", f"({cutoff}")
        return int(self.redis.zcard(self._workers))
