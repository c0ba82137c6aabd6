"""The job store's transitions on a real Redis: atomic, final once terminal, progress never decreasing."""

from __future__ import annotations

import time

import pytest
from conftest import queued

from service.contract.errors import JobNotFound
from service.contract.schemas import ErrorInfo, JobResult, JobStatus, JobType
from service.contract.store import JobStore


def test_lifecycle_and_progress_never_decreases(store: JobStore) -> None:
    job_id = queued(store)
    store.progress(job_id, 50)  # not running yet: ignored
    assert store.get(job_id).progress == 0
    assert store.start(job_id, "w1")
    assert not store.start(job_id, "w2"), "a job starts once"
    store.progress(job_id, 40)
    store.progress(job_id, 20)
    assert store.get(job_id).progress == 40
    assert store.finish(job_id, JobStatus.succeeded, result=JobResult(caption="hi"))
    record = store.get(job_id)
    assert (record.status, record.progress, record.result.caption) == (JobStatus.succeeded, 100, "hi")
    assert record.expires_at is not None and record.worker == "w1"
    assert 0 < store.redis.ttl(f"{store.prefix}:job:{job_id}") <= 60
    assert not store.finish(job_id, JobStatus.failed, error=ErrorInfo(code="x", message="late"))
    assert store.get(job_id).status == JobStatus.succeeded


def test_cancel_queued_is_final_and_the_job_never_starts(store: JobStore) -> None:
    job_id = queued(store)
    before, after = store.cancel(job_id)
    assert (before, after.status, after.error.code) == (JobStatus.queued, JobStatus.canceled, "canceled")
    assert store.get(job_id).status == JobStatus.canceled
    assert not store.start(job_id, "w1")
    assert store.cancel(job_id)[0] == JobStatus.canceled


def test_cancel_running_sets_the_flag_the_worker_polls(store: JobStore) -> None:
    job_id = queued(store)
    store.start(job_id, "w1")
    assert not store.cancel_requested(job_id)
    before, after = store.cancel(job_id)
    assert (before, after.status, after.cancel_requested) == (JobStatus.running, JobStatus.running, True)
    assert store.cancel_requested(job_id)
    assert store.get(job_id).status == JobStatus.running


def test_cancel_of_an_unknown_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.cancel("no-such-job")


def test_running_jobs_without_heartbeat_are_lost(store: JobStore) -> None:
    alive, dead = queued(store, "alive"), queued(store, "dead")
    store.start(alive, "w1")
    store.start(dead, "w2")
    assert store.lost_jobs() == []
    deadline = time.monotonic() + 5
    while store.lost_jobs() != [dead] and time.monotonic() < deadline:
        store.heartbeat(alive, "w1")
        time.sleep(0.05)
    assert store.lost_jobs() == [dead]
    assert store.running_count() == 2
    store.finish(dead, JobStatus.failed, error=ErrorInfo(code="worker_lost", message="gone"))
    assert store.running_count() == 1


def test_live_workers_expire(store: JobStore) -> None:
    store.worker_alive("w1")
    assert store.live_workers(ttl_seconds=10) == 1
    time.sleep(0.05)
    assert store.live_workers(ttl_seconds=0.01) == 0


def test_pages_stay_stable_when_jobs_expire_in_between(store: JobStore) -> None:
    for index in range(6):
        queued(store, f"job{index}")
    first, cursor = store.page(status=None, job_type=None, before=None, limit=2)
    assert [record.id for record in first] == ["job5", "job4"]
    store.redis.delete(f"{store.prefix}:job:job5", f"{store.prefix}:job:job2")  # expired meanwhile
    second, cursor = store.page(status=None, job_type=None, before=cursor, limit=2)
    assert [record.id for record in second] == ["job3", "job1"]
    last, cursor = store.page(status=None, job_type=None, before=cursor, limit=2)
    assert [record.id for record in last] == ["job0"]
    assert cursor is None


def test_pages_oldest_first_after_a_cursor_and_by_several_types(store: JobStore) -> None:
    for index in range(4):
        queued(store, f"job{index}")
    store.create(
        "cap",
        JobType.caption,
        {},
        idempotency=None,
        idempotency_ttl_seconds=60,
        enqueue=lambda pipeline: None,
        admit=lambda depth: None,
        queue_key="unused-queue",
    )
    videos = (JobType.generate, JobType.joint)
    oldest, cursor = store.page(status=None, job_type=videos, before=None, limit=2, oldest_first=True)
    assert [record.id for record in oldest] == ["job0", "job1"]
    assert cursor == store.created_score("job1")
    rest, _ = store.page(status=None, job_type=videos, before=None, after=cursor, limit=10, oldest_first=True)
    assert [record.id for record in rest] == ["job2", "job3"]  # the caption job is left out
    newest, _ = store.page(status=None, job_type=None, before=None, limit=10)
    assert [record.id for record in newest] == ["cap", "job3", "job2", "job1", "job0"]
    between, _ = store.page(
        status=None,
        job_type=None,
        before=store.created_score("job3"),
        after=store.created_score("job0"),
        limit=10,
    )
    assert [record.id for record in between] == ["job2", "job1"]
    assert store.created_score("nope") is None


def test_delete_removes_the_record_and_a_running_worker_reads_it_as_a_cancel(store: JobStore) -> None:
    job_id = queued(store)
    store.start(job_id, "w1")
    assert not store.cancel_requested(job_id)
    assert store.delete(job_id)
    assert store.find(job_id) is None and store.created_score(job_id) is None
    assert store.cancel_requested(job_id), "the worker must stop a job whose record is gone"
    assert not store.finish(job_id, JobStatus.canceled), "a deleted job is not recreated by its worker"
    assert store.find(job_id) is None and store.running_count() == 0
    assert not store.delete(job_id)
