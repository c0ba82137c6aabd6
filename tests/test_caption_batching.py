"""Caption jobs batched in the worker: the real tiny pipeline, a real Redis and rq's own worker loop
(in this process, in burst mode). Batched jobs get the captions they get alone; cancel, progress and
failure stay per job; claiming partners is atomic against cancels and other workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis import Redis
from rq import SimpleWorker
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from model.media import write_mp4
from model.pipeline import UniViGUPipeline
from service.cli.redis_server import RedisServer
from service.contract.metrics import WorkerMetrics
from service.contract.queue import JobQueue
from service.contract.result_files import ResultFiles
from service.contract.schemas import JobRecord, JobStatus, JobType
from service.contract.store import JobStore
from worker import tasks
from worker.runner import CaptionBatching, JobRunner

CAPTION = {"steps": 4, "max_tokens": 8}


@pytest.fixture(scope="module")
def pipe() -> UniViGUPipeline:
    return UniViGUPipeline.from_preset("tiny")


@dataclass
class Service:
    store: JobStore
    queue: JobQueue
    files: ResultFiles
    runner: JobRunner
    videos: Path

    def submit(self, job_type: JobType, params: dict[str, Any], frames: np.ndarray | None = None) -> str:
        """A job as the gateway records and enqueues it; a caption job's video is its upload."""
        job_id = uuid.uuid4().hex
        if frames is not None:
            write_mp4(frames, self.videos / f"{job_id}.mp4", fps=8)
            self.files.upload(job_id).write_bytes((self.videos / f"{job_id}.mp4").read_bytes())
        self.store.create(
            job_id,
            job_type,
            params,
            idempotency=None,
            idempotency_ttl_seconds=60,
            enqueue=lambda pipeline: self.queue.enqueue(job_id, pipeline),
            admit=self.queue.admit,
            queue_key=self.queue.key,
        )
        return job_id

    def work(self) -> None:
        """rq's in-process worker until the queue is empty, running jobs through the runner."""
        tasks.install(self.runner)
        worker = SimpleWorker([self.queue.rq], connection=self.queue.rq.connection, serializer=JSONSerializer)
        worker.work(burst=True)

    def record(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def batch_sizes(self) -> tuple[float | None, float | None]:
        """(batches, jobs in them) from the worker's histogram."""
        registry = self.runner.metrics.registry
        return (
            registry.get_sample_value("univigu_caption_batch_size_count"),
            registry.get_sample_value("univigu_caption_batch_size_sum"),
        )


@pytest.fixture
def service(redis_server: RedisServer, tmp_path: Path, pipe: UniViGUPipeline) -> Iterator[Service]:
    redis = Redis.from_url(redis_server.url)
    name = f"batch-{uuid.uuid4().hex[:8]}"
    store = JobStore(redis, prefix=name, result_ttl_seconds=3600, heartbeat_ttl_seconds=30)
    queue = JobQueue(redis, name=name, max_length=100, job_timeout_seconds=600, ttl_seconds=3600)
    files = ResultFiles(tmp_path / "results")
    files.ensure_dirs()
    runner = JobRunner(
        pipe,
        store=store,
        files=files,
        metrics=WorkerMetrics(),
        worker_name="w1",
        finish_retry_seconds=5,
        batching=CaptionBatching(pipe, queue, max_size=3),
    )
    (tmp_path / "videos").mkdir()
    yield Service(store, queue, files, runner, tmp_path / "videos")
    redis.close()


def clip(seed: int, frames: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)


def caption_alone(pipe: UniViGUPipeline, service: Service, job_id: str, **params: Any) -> str:
    return pipe.caption(service.videos / f"{job_id}.mp4", **params).text


def test_queued_caption_jobs_run_as_one_batch_and_get_the_captions_they_get_alone(pipe, service) -> None:
    """The head takes two partners of its settings (the batch size is 3) ahead of the generate job
    queued before them; ``longer``'s video is longer, so it runs as its own batch right after. ``left``
    (beyond the batch size) and ``other`` (other steps) wait their turn."""
    head = service.submit(JobType.caption, {**CAPTION, "seed": 1}, clip(1))
    video = service.submit(
        JobType.generate, {"prompt": "a cat", "steps": 2, "height": 32, "width": 32, "num_frames": 5}
    )
    partner = service.submit(JobType.caption, {**CAPTION, "seed": 2, "prompt": "a red circle"}, clip(2))
    longer = service.submit(JobType.caption, {**CAPTION, "seed": 3}, clip(3, frames=9))
    left = service.submit(JobType.caption, {**CAPTION, "seed": 4}, clip(4))
    other = service.submit(JobType.caption, {"steps": 3, "max_tokens": 8, "seed": 5}, clip(5))
    expected = {
        head: caption_alone(pipe, service, head, **CAPTION, seed=1),
        partner: caption_alone(pipe, service, partner, **CAPTION, seed=2, prompt="a red circle"),
        longer: caption_alone(pipe, service, longer, **CAPTION, seed=3),
        left: caption_alone(pipe, service, left, **CAPTION, seed=4),
        other: caption_alone(pipe, service, other, steps=3, max_tokens=8, seed=5),
    }
    service.work()
    records = {job_id: service.record(job_id) for job_id in [head, video, partner, longer, left, other]}
    assert {job_id: record.status for job_id, record in records.items()} == dict.fromkeys(
        records, JobStatus.succeeded
    )
    assert {job_id: records[job_id].result.caption for job_id in expected} == expected
    assert records[head].started_at <= records[partner].started_at == records[longer].started_at
    assert records[partner].started_at < records[video].started_at < records[left].started_at
    assert service.batch_sizes() == (4, 5)  # {head, partner}, {longer}, {left}, {other}
    assert service.queue.peek(10) == []
    assert not service.store.redis.exists(RqJob.key_for(partner))


def test_a_job_canceled_in_a_batch_stops_alone_and_the_others_finish(pipe, service, monkeypatch) -> None:
    first, second, third = (
        service.submit(JobType.caption, {**CAPTION, "seed": seed}, clip(seed)) for seed in (1, 2, 3)
    )
    expected = {
        job_id: caption_alone(pipe, service, job_id, **CAPTION, seed=seed)
        for seed, job_id in ((1, first), (3, third))
    }
    progress = service.store.progress
    running: list[tuple[str, ...]] = []

    def cancel_second_at_half(job_id: str, percent: int, **estimate: Any) -> None:
        progress(job_id, percent, **estimate)
        running.append(service.runner.current_jobs)
        if job_id == first and percent == 50:
            service.store.cancel(second)  # what POST /jobs/{id}/cancel does to a running job

    monkeypatch.setattr(service.store, "progress", cancel_second_at_half)
    service.work()
    canceled = service.record(second)
    assert (canceled.status, canceled.error.code, canceled.progress) == (JobStatus.canceled, "canceled", 50)
    for job_id, caption in expected.items():
        record = service.record(job_id)
        assert (record.status, record.progress, record.result.caption) == (JobStatus.succeeded, 100, caption)
    assert set(running) == {(first, second, third)}  # every job of the batch keeps its heartbeat
    assert service.batch_sizes() == (1, 3)
    assert not service.files.upload(second).exists()


def test_a_video_that_cannot_be_read_fails_only_its_own_job(service) -> None:
    good = service.submit(JobType.caption, {**CAPTION, "seed": 1}, clip(1))
    bad = service.submit(JobType.caption, {**CAPTION, "seed": 2}, clip(2))
    service.files.upload(bad).write_bytes(b"not a video")
    service.work()
    assert service.record(good).status == JobStatus.succeeded
    failed = service.record(bad)
    assert (failed.status, failed.error.code) == (JobStatus.failed, "invalid_video")
    assert service.batch_sizes() == (1, 1)


def test_a_claim_takes_only_jobs_still_queued_and_still_in_the_queue(service) -> None:
    taken, canceled, free = (service.submit(JobType.caption, {**CAPTION, "seed": seed}) for seed in (1, 2, 3))
    service.store.redis.lpop(service.queue.key)  # another worker dequeued the first
    service.store.cancel(canceled)  # canceled while queued; the gateway's queue.remove has not run yet
    ids = [taken, canceled, free]
    entries = [service.queue.entry_key(job_id) for job_id in ids]
    assert service.store.claim_queued(ids, "w2", queue_key=service.queue.key, queue_entries=entries) == [free]
    record = service.record(free)
    assert (record.status, record.worker) == (JobStatus.running, "w2")
    assert service.store.running_count() == 1 and service.store.lost_jobs() == []  # its heartbeat is set
    assert service.queue.peek(10) == [canceled]
    assert not service.store.redis.exists(RqJob.key_for(free))
    assert service.record(taken).status == JobStatus.queued  # the other worker's store.start decides it
    assert service.record(canceled).status == JobStatus.canceled
    assert (
        service.store.claim_queued([free], "w3", queue_key=service.queue.key, queue_entries=entries[2:]) == []
    )
