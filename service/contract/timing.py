"""How long jobs take: what the workers measure, how it is shared, and the ``eta_seconds`` it yields.

Each worker times every job it runs in three parts (``worker.clock.JobClock``): its denoising steps
(the mean of every step after the first), its *setup* (from start to the first step, less one step:
reading the video, encoding the prompt) and its *finish* (from the last step to the end: decoding,
writing the MP4). It shares them through Redis in two ways:

- while a job runs, every progress update also records when the job should end (``ends_at``, Unix
  seconds): its remaining steps at its own mean step time, plus the typical finish of its type;
- when a job succeeds, its times are folded into moving averages per job type, and its whole run time
  into one average over all types (``JobStore.record_timing``).

The gateway turns these into ``eta_seconds`` (:func:`eta_seconds`), so it never needs torch:

- running: ``ends_at - now``; before its first step, the typical duration of its type less the time it
  has run so far;
- queued: when a live worker frees up for it, plus its own typical duration (setup + its steps x the
  step time + finish of its type). Each live worker is free when its running job's ``ends_at`` comes,
  and each job ahead keeps a worker busy for the average run time, handed to the first worker free.

Unknown (None) until a job of its type has succeeded, and while no worker is live. The averages mix
every size and option of a type, so a queued job's figure is rough; a running job's is its own.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from service.contract.schemas import Job, JobRecord, JobStatus, JobType

SMOOTHING = 0.2
"""Weight of the newest job in the moving averages: about the last five jobs of a type count."""

PARTS = ("step", "setup", "finish")
ALL_TYPES = "job"
"""The field of the average run time over all job types (the others are ``<type>.<part>``)."""


@dataclass(frozen=True)
class StepTiming:
    """Seconds of one job's parts: a denoising step, setup before the first step, finish after the last."""

    step: float
    setup: float
    finish: float

    def duration(self, steps: int) -> float:
        return self.setup + steps * self.step + self.finish

    def fields(self, job_type: JobType) -> dict[str, float]:
        """The hash fields of ``job_type`` that hold these times."""
        return {f"{job_type.value}.{part}": getattr(self, part) for part in PARTS}

    @classmethod
    def from_fields(cls, fields: dict[str, float], job_type: JobType) -> StepTiming | None:
        try:
            return cls(*(fields[f"{job_type.value}.{part}"] for part in PARTS))
        except KeyError:
            return None


@dataclass(frozen=True)
class QueueTiming:
    """What an estimate needs beyond the job's own record, read with it in one round trip."""

    averages: dict[str, float]
    """The moving averages, by hash field (``generate.step``, ..., ``job``)."""
    ends: list[float]
    """``ends_at`` of every running job."""
    live_workers: int
    default_steps: int | None
    """The served model's default number of steps (for jobs that leave ``steps`` out)."""

    def typical(self, job_type: JobType) -> StepTiming | None:
        return StepTiming.from_fields(self.averages, job_type)


@dataclass(frozen=True)
class JobSnapshot:
    """A job's record, its queue position while queued, and the queue's timing, read together."""

    record: JobRecord
    queue_position: int | None
    timing: QueueTiming

    def job(self, now: float) -> Job:
        """The job as the API shows it at Unix time ``now``, with its ``eta_seconds``."""
        eta = eta_seconds(self.record, self.queue_position, self.timing, now)
        return Job.from_record(self.record, queue_position=self.queue_position, eta_seconds=eta)


def eta_seconds(record: JobRecord, position: int | None, timing: QueueTiming, now: float) -> float | None:
    """Seconds until ``record``'s job should end, rounded to 0.1 s; None once it ended or when unknown."""
    if record.status.terminal:
        return None
    if record.status == JobStatus.running:
        if record.ends_at is not None:
            return _rounded(record.ends_at - now)
        own = _own_duration(record, timing)
        started = record.started_at.timestamp() if record.started_at else now
        return None if own is None else _rounded(own - (now - started))
    own = _own_duration(record, timing)
    average = timing.averages.get(ALL_TYPES)
    if own is None or average is None or timing.live_workers < 1 or position is None:
        return None
    return _rounded(_start_delay(timing, position, average, now) + own)


def _own_duration(record: JobRecord, timing: QueueTiming) -> float | None:
    typical = timing.typical(record.type)
    steps = record.params.get("steps") or timing.default_steps
    return None if typical is None or steps is None else typical.duration(int(steps))


def _start_delay(timing: QueueTiming, ahead: int, job_seconds: float, now: float) -> float:
    """When the first worker is free for a job with ``ahead`` jobs before it (seconds from ``now``)."""
    workers = timing.live_workers
    # An ``ends_at`` left by a worker that died counts as a worker free now; more of them than live
    # workers (a dead one's job not yet reaped) keep the latest, the conservative choice.
    busy = sorted((max(0.0, end - now) for end in timing.ends), reverse=True)[:workers]
    free = busy + [0.0] * (workers - len(busy))
    heapq.heapify(free)
    for _ in range(ahead):
        heapq.heapreplace(free, free[0] + job_seconds)
    return free[0]


def _rounded(seconds: float) -> float:
    return round(max(0.0, seconds), 1)
