"""Job timing and ETAs: the worker's clock, the estimate the gateway computes from it, and how both
travel through a real Redis (moving averages, each running job's expected end)."""

from __future__ import annotations

from datetime import UTC, datetime

from conftest import queued

from service.contract.schemas import JobRecord, JobResult, JobStatus, JobType, ServedModel
from service.contract.store import JobStore
from service.contract.timing import JobSnapshot, QueueTiming, StepTiming, eta_seconds
from service.gateway.eta import TimingCache
from worker.clock import JobClock

NOW = 1_000_000.0
# generate: 2 s setup, 0.5 s per step, 1 s finish; the average job of any type takes 20 s.
AVERAGES = {"generate.step": 0.5, "generate.setup": 2.0, "generate.finish": 1.0, "job": 20.0}


def record(status: JobStatus, *, steps: int | None = 10, **fields: object) -> JobRecord:
    params = {"prompt": "a cat"} if steps is None else {"prompt": "a cat", "steps": steps}
    created = datetime.fromtimestamp(NOW - 100, UTC)
    return JobRecord(
        id="j", type=JobType.generate, status=status, created_at=created, params=params, **fields
    )  # type: ignore[arg-type]


def timing(
    *, ends: tuple[float, ...] = (), workers: int = 1, averages: dict[str, float] | None = None
) -> QueueTiming:
    return QueueTiming(averages=averages or AVERAGES, ends=list(ends), live_workers=workers, default_steps=8)


def test_running_eta_is_the_workers_expected_end() -> None:
    running = record(JobStatus.running, ends_at=NOW + 12.34)
    assert eta_seconds(running, None, timing(), NOW) == 12.3
    assert eta_seconds(running, None, timing(), NOW + 20) == 0.0  # late: never negative


def test_running_eta_before_the_first_step_is_the_typical_duration_less_time_spent() -> None:
    started = datetime.fromtimestamp(NOW - 1.5, UTC)
    running = record(JobStatus.running, started_at=started)
    assert eta_seconds(running, None, timing(), NOW) == 2.0 + 10 * 0.5 + 1.0 - 1.5


def test_queued_eta_waits_for_the_running_job_and_the_jobs_ahead() -> None:
    waiting = record(JobStatus.queued)
    own = 2.0 + 10 * 0.5 + 1.0
    assert eta_seconds(waiting, 0, timing(), NOW) == own  # an idle worker takes it now
    assert eta_seconds(waiting, 0, timing(ends=(NOW + 5,)), NOW) == 5 + own
    assert eta_seconds(waiting, 2, timing(ends=(NOW + 5,)), NOW) == 5 + 2 * 20 + own
    # Two workers: the jobs ahead go to whichever is free first.
    assert eta_seconds(waiting, 2, timing(ends=(NOW + 5,), workers=2), NOW) == 20 + own
    # The model's default steps when the job leaves them out.
    assert eta_seconds(record(JobStatus.queued, steps=None), 0, timing(), NOW) == 2.0 + 8 * 0.5 + 1.0


def test_no_eta_when_nothing_is_known_or_the_job_ended() -> None:
    waiting = record(JobStatus.queued)
    assert eta_seconds(waiting, 0, timing(workers=0), NOW) is None  # no worker to run it
    assert eta_seconds(waiting, 0, timing(averages={"job": 20.0}), NOW) is None  # no generate job yet
    assert eta_seconds(waiting, None, timing(), NOW) is None  # left the queue, not started yet
    done = record(JobStatus.succeeded, ends_at=NOW + 5)
    assert eta_seconds(done, None, timing(), NOW) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_job_clock_separates_setup_steps_and_finish() -> None:
    fake = FakeClock()
    clock = JobClock(StepTiming(step=9.0, setup=0.0, finish=2.0), fake)
    fake.now = 3.0  # the first step: 2 s of setup and a 1 s step
    assert clock.step() == 3.0
    assert clock.remaining(1, 4) == 3 * 9.0 + 2.0  # one step of its own is not enough: the typical step
    fake.now = 4.0
    clock.step()
    fake.now = 5.0
    clock.step()
    assert clock.remaining(3, 4) == 1 * 1.0 + 2.0
    fake.now = 5.5  # decoding and writing
    assert clock.measured() == StepTiming(step=1.0, setup=2.0, finish=0.5)
    assert clock.elapsed() == 5.5


def test_job_clock_learns_nothing_from_fewer_than_two_steps() -> None:
    fake = FakeClock()
    clock = JobClock(None, fake)
    assert clock.measured() is None
    fake.now = 2.0
    clock.step()
    assert clock.remaining(1, 3) == 2 * 2.0  # no history: the one interval it has
    assert clock.measured() is None


def test_moving_averages_weigh_the_newest_job_by_a_fifth(store: JobStore) -> None:
    assert store.typical_timing(JobType.generate) is None
    store.record_timing(JobType.generate, StepTiming(step=1.0, setup=2.0, finish=3.0), run_seconds=10.0)
    assert store.typical_timing(JobType.generate) == StepTiming(step=1.0, setup=2.0, finish=3.0)
    store.record_timing(JobType.generate, StepTiming(step=2.0, setup=2.0, finish=3.0), run_seconds=20.0)
    assert store.typical_timing(JobType.generate) == StepTiming(step=1.2, setup=2.0, finish=3.0)
    assert store.typical_timing(JobType.caption) is None
    assert store.queue_timing(worker_ttl_seconds=5).averages["job"] == 12.0


def test_a_running_jobs_expected_end_travels_with_its_progress_until_it_finishes(store: JobStore) -> None:
    job_id = queued(store)
    store.progress(job_id, 10, ends_at=NOW)  # not running: ignored
    assert store.get(job_id).ends_at is None
    store.start(job_id, "w1")
    store.worker_alive("w1")
    store.publish_model(ServedModel(preset="tiny", max_caption_tokens=48, defaults={"steps": 8}))
    store.progress(job_id, 10, ends_at=NOW + 7.5)
    record = store.get(job_id)
    timing = store.queue_timing(worker_ttl_seconds=5)
    assert record.ends_at == NOW + 7.5
    assert (timing.ends, timing.live_workers, timing.default_steps) == ([NOW + 7.5], 1, 8)
    assert JobSnapshot(record, None, timing).job(NOW).eta_seconds == 7.5

    store.finish(job_id, JobStatus.succeeded, result=JobResult(caption="hi"))
    assert store.queue_timing(worker_ttl_seconds=5).ends == []


def test_the_gateway_reads_the_queue_timing_once_a_second(store: JobStore) -> None:
    fake = FakeClock()
    cache = TimingCache(store, worker_ttl_seconds=5, clock=fake)
    assert cache.get().averages == {}
    store.record_timing(JobType.caption, StepTiming(step=1.0, setup=0.0, finish=0.0), run_seconds=5.0)
    fake.now = 0.9
    assert cache.get().averages == {}  # the copy it read
    fake.now = 1.1
    assert cache.get().typical(JobType.caption) == StepTiming(step=1.0, setup=0.0, finish=0.0)
