"""Running jobs in the worker process: read their records, call the pipeline, store results atomically.

Every outcome ends the job: succeeded, canceled, or failed with a code (the model's error codes,
``gpu_oom``, ``timeout``, ``storage_error``, ``internal_error``). The worker keeps serving afterwards.

Caption jobs run in batches on a one-device worker (:class:`CaptionBatching`). The caption job that rq
hands the worker takes up to ``max_size - 1`` partners from the first :data:`CLAIM_SCAN` queued jobs: caption jobs with the
same steps, length and ``video_reuse`` (the model's defaults filled in), claimed in one Redis script
(:meth:`JobStore.claim_queued`). Their videos are read one by one; those that fit the same size run as one
batch (:meth:`UniViGUPipeline.caption_batch`), one batch per size. Each job keeps its seed, progress,
cancel flag, result and failure: a video that cannot be read fails its own job only, and a job canceled
mid-batch leaves it while the others go on. An error of the batch itself (out of memory, timeout)
fails every job in it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import ValidationError
from rq.timeouts import JobTimeoutException

from model.errors import Canceled, UniViGUError
from model.media import write_mp4
from service.contract.connection import REDIS_UNREACHABLE
from service.contract.errors import StorageError
from service.contract.metrics import WorkerMetrics
from service.contract.queue import JobQueue
from service.contract.result_files import UPLOAD_NAME, ResultFiles
from service.contract.schemas import (
    PARAMS_BY_TYPE,
    CaptionParams,
    ErrorInfo,
    JobRecord,
    JobResult,
    JobStatus,
    JobType,
    ModelIdentity,
)
from service.contract.store import JobStore
from service.contract.timing import StepTiming
from worker.clock import JobClock

if TYPE_CHECKING:
    from model.pipeline import CaptionResult, CaptionSettings, PreparedCaption, UniViGUPipeline
    from worker.group import GroupPipeline

log = logging.getLogger(__name__)

GPU_OOM = "gpu_oom"
CLAIM_SCAN = 64
"""Queued jobs a worker looks through for batch partners of the caption job it starts."""
T = TypeVar("T")


def release_device_memory() -> None:
    """Free what a failed job left behind: its tensors (held in reference cycles until collected) and
    the CUDA allocator's cached blocks. Called once the exception and its traceback, which keep the
    failed job's frames and tensors alive, are gone; inside the ``except`` block it would free nothing."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    result: JobResult | None = None
    error: ErrorInfo | None = None


CANCELED = Outcome(JobStatus.canceled, error=ErrorInfo(code="canceled", message="canceled on request"))


@dataclass(frozen=True)
class CaptionBatching:
    """What a worker needs to run caption jobs in batches: the pipeline itself (a worker group's pipeline
    replays single mode calls only), the queue the partners come from, and the most jobs in a batch."""

    pipeline: UniViGUPipeline
    queue: JobQueue
    max_size: int


class JobRunner:
    def __init__(
        self,
        pipeline: UniViGUPipeline | GroupPipeline,
        *,
        store: JobStore,
        files: ResultFiles,
        metrics: WorkerMetrics,
        worker_name: str,
        finish_retry_seconds: float,
        batching: CaptionBatching | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model = ModelIdentity(**pipeline.identity())  # hashes the weights once, at start
        self.store = store
        self.files = files
        self.metrics = metrics
        self.worker_name = worker_name
        # How long a finished job's outcome is retried while Redis is unreachable before giving up
        # (the gateway's reaper then fails the job as worker_lost).
        self.finish_retry_seconds = finish_retry_seconds
        self.batching = batching  # None: one job at a time
        self._current: tuple[str, ...] = ()
        self._lock = threading.Lock()

    @property
    def current_jobs(self) -> tuple[str, ...]:
        """The jobs this worker is running (several for a caption batch), for their heartbeats."""
        with self._lock:
            return self._current

    def run(self, job_id: str) -> None:
        if not self.store.start(job_id, self.worker_name):
            log.info("job %s is no longer queued (canceled); skipped", job_id)
            return
        record = self.store.get(job_id)
        partners = self._batch_partners(record) if record.type == JobType.caption else []
        with self._lock:
            self._current = (record.id, *(partner.id for partner in partners))
        self.metrics.busy.set(1)
        try:
            if self.batching is not None and partners:
                self._run_captions(self.batching, [record, *partners])
            else:
                self._run(record)
        finally:
            # Whatever happens, the heartbeats stop: a job this worker could not finish is reaped.
            with self._lock:
                self._current = ()
            self.metrics.busy.set(0)

    def _clock(self, record: JobRecord) -> JobClock:
        """The job starts now: its queue wait observed, its clock started."""
        if record.started_at is not None:
            wait = (record.started_at - record.created_at).total_seconds()
            self.metrics.queue_wait.labels(record.type.value).observe(wait)
        return JobClock(self._typical_timing(record.type))

    def _run(self, record: JobRecord) -> None:
        clock = self._clock(record)
        result = self._execute(record.id, lambda: self._call(record, clock))
        outcome = result if isinstance(result, Outcome) else Outcome(JobStatus.succeeded, result)
        self._end(record, outcome, clock)

    def _end(self, record: JobRecord, outcome: Outcome, clock: JobClock) -> None:
        """Record ``outcome`` (after dropping a caption's upload and, after an out-of-memory, the failed
        job's tensors), the job's run time and, when it succeeded, its step times."""
        if record.type == JobType.caption:
            self.files.remove_upload(record.id)
            outcome = self._naming_the_upload(record, outcome)
        if outcome.error is not None and outcome.error.code == GPU_OOM:
            release_device_memory()
        self._finish(record, outcome)
        self.metrics.run_time.labels(record.type.value).observe(clock.elapsed())
        if outcome.status == JobStatus.succeeded:
            self._record_timing(record, clock)

    def _naming_the_upload(self, record: JobRecord, outcome: Outcome) -> Outcome:
        """``outcome`` with its error calling a caption job's video :data:`UPLOAD_NAME`: the model's
        errors name the file they read, which here is the internal upload file."""
        error = outcome.error
        if error is None:
            return outcome
        upload = self.files.upload(record.id)
        message = error.message
        for spelling in (str(upload), repr(upload.name), upload.name):
            message = message.replace(spelling, UPLOAD_NAME)
        return dataclasses.replace(outcome, error=error.model_copy(update={"message": message}))

    def _typical_timing(self, job_type: JobType) -> StepTiming | None:
        try:
            return self.store.typical_timing(job_type)
        except REDIS_UNREACHABLE as exc:
            log.warning("typical %s times not read, Redis unreachable: %s", job_type.value, exc)
            return None

    def _record_timing(self, record: JobRecord, clock: JobClock) -> None:
        """Share a succeeded job's times, from which the gateway estimates later jobs' ETAs."""
        measured = clock.measured()
        if measured is None:
            return
        try:
            self.store.record_timing(record.type, measured, clock.elapsed())
        except REDIS_UNREACHABLE as exc:
            log.warning("times of job %s not shared, Redis unreachable: %s", record.id, exc)

    def abandoned(self, job_id: str, *, reason: str) -> None:
        """Fail a job that rq gave up on while its record was still queued or running."""
        message = f"the worker that took this job stopped before finishing it ({reason})"
        error = ErrorInfo(code="worker_lost", message=message)
        if self.store.finish(job_id, JobStatus.failed, error=error, from_queued=True):
            log.warning("job %s failed: abandoned by its worker", job_id)
        self.files.record_expiry(job_id, self.store.result_ttl_seconds)

    def fail_running(self, error: ErrorInfo) -> None:
        """Fail the jobs being run, if any, from another thread: its worker group broke (worker.group)."""
        for job_id in self.current_jobs:
            self.store.finish(job_id, JobStatus.failed, error=error)
            self.files.record_expiry(job_id, self.store.result_ttl_seconds)

    def _execute(self, label: str, call: Callable[[], T]) -> T | Outcome:
        """``call()``, or the outcome its error gives the jobs ``label`` names (logged under that name)."""
        try:
            return call()
        except Canceled:
            log.info("job %s canceled", label)
            return CANCELED
        except UniViGUError as exc:
            log.info("job %s failed: %s: %s", label, exc.code, exc.message)
            return Outcome(
                JobStatus.failed, error=ErrorInfo(code=exc.code, message=exc.message, param=exc.param)
            )
        except StorageError as exc:
            log.warning("job %s could not store its result: %s", label, exc)
            return Outcome(JobStatus.failed, error=ErrorInfo(code=exc.code, message=str(exc)))
        except torch.cuda.OutOfMemoryError as exc:
            # str(exc): a log record that kept the exception would keep the failed job's tensors alive.
            log.warning("job %s ran out of GPU memory: %s", label, str(exc))
            message = "the GPU ran out of memory; try fewer frames, a smaller size or fewer tokens"
            return Outcome(JobStatus.failed, error=ErrorInfo(code=GPU_OOM, message=message))
        except JobTimeoutException:
            log.warning("job %s timed out", label)
            return Outcome(JobStatus.failed, error=ErrorInfo(code="timeout", message="the job ran too long"))
        except Exception:  # the worker's last line: the job fails with a code, the traceback is logged
            log.exception("job %s failed with an unexpected error", label)
            message = "the worker hit an unexpected error; it is logged"
            return Outcome(JobStatus.failed, error=ErrorInfo(code="internal_error", message=message))

    @staticmethod
    def _params(record: JobRecord) -> dict[str, Any]:
        return PARAMS_BY_TYPE[record.type].model_validate(record.params).model_dump(exclude_none=True)

    def _call(self, record: JobRecord, clock: JobClock) -> JobResult:
        params = self._params(record)
        progress, should_cancel = self._progress(record, clock), self._should_cancel(record.id)
        if record.type == JobType.generate:
            video = self.pipeline.generate(**params, progress=progress, should_cancel=should_cancel)
            return self._video_result(record, video, caption=None)
        if record.type == JobType.joint:
            joint = self.pipeline.joint(**params, progress=progress, should_cancel=should_cancel)
            return self._video_result(record, joint, caption=joint.text)
        self.metrics.caption_batch_size.observe(1)  # a caption job without partners
        upload = self.files.upload(record.id)
        output = self.pipeline.caption(upload, **params, progress=progress, should_cancel=should_cancel)
        return self._caption_result(record, output)

    # --- caption batches -------------------------------------------------------------------------------

    @staticmethod
    def _caption_settings(batching: CaptionBatching, record: JobRecord) -> CaptionSettings | None:
        """The settings a caption job would run with; None when its parameters are invalid (it then
        fails on its own, with the error)."""
        try:
            params = CaptionParams.model_validate(record.params)
            return batching.pipeline.caption_settings(params.steps, params.max_tokens, params.video_reuse)
        except (ValidationError, UniViGUError):
            return None

    def _batch_partners(self, head: JobRecord) -> list[JobRecord]:
        """Queued caption jobs with ``head``'s settings, claimed (now running on this worker), oldest first."""
        batching = self.batching
        if batching is None or batching.max_size < 2:
            return []
        settings = self._caption_settings(batching, head)
        if settings is None:
            return []
        try:
            return self._claim_partners(batching, settings)
        except REDIS_UNREACHABLE as exc:  # the head job runs alone
            log.warning("no batch partners for job %s, Redis unreachable: %s", head.id, exc)
            return []

    def _claim_partners(self, batching: CaptionBatching, settings: CaptionSettings) -> list[JobRecord]:
        queue = batching.queue
        candidates = [
            record.id
            for record in self.store.find_many(queue.peek(CLAIM_SCAN))
            if record is not None
            and record.type == JobType.caption
            and record.status == JobStatus.queued
            and self._caption_settings(batching, record) == settings
        ][: batching.max_size - 1]
        if not candidates:
            return []
        claimed = self.store.claim_queued(
            candidates,
            self.worker_name,
            queue_key=queue.key,
            queue_entries=[queue.entry_key(job_id) for job_id in candidates],
        )
        return [record for record in self.store.find_many(claimed) if record is not None]

    def _run_captions(self, batching: CaptionBatching, records: Sequence[JobRecord]) -> None:
        """Read every job's video, then denoise the captions of each video size as one batch (a lone
        caption job runs through :meth:`_run`, as every other job)."""
        clocks = {record.id: self._clock(record) for record in records}
        batches: dict[tuple[object, ...], list[tuple[JobRecord, PreparedCaption]]] = {}
        for record in records:
            prepared = self._execute(
                record.id, partial(self._prepare_caption, batching, record, clocks[record.id])
            )
            if isinstance(prepared, Outcome):
                self._end(record, prepared, clocks[record.id])
            else:
                batches.setdefault(prepared.batch_key, []).append((record, prepared))
        for batch in batches.values():
            label = ", ".join(record.id for record, _ in batch)
            self.metrics.caption_batch_size.observe(len(batch))
            jobs = [job for _, job in batch]
            outputs = self._execute(label, partial(batching.pipeline.caption_batch, jobs))
            for index, (record, _) in enumerate(batch):
                outcome = (
                    outputs if isinstance(outputs, Outcome) else self._caption_outcome(record, outputs[index])
                )
                self._end(record, outcome, clocks[record.id])

    def _prepare_caption(
        self, batching: CaptionBatching, record: JobRecord, clock: JobClock
    ) -> PreparedCaption:
        return batching.pipeline.prepare_caption(
            self.files.upload(record.id),
            **self._params(record),
            progress=self._progress(record, clock),
            should_cancel=self._should_cancel(record.id),
        )

    def _caption_outcome(self, record: JobRecord, output: CaptionResult | None) -> Outcome:
        if output is None:
            log.info("job %s canceled", record.id)
            return CANCELED
        stored = self._execute(record.id, lambda: self._caption_result(record, output))
        return stored if isinstance(stored, Outcome) else Outcome(JobStatus.succeeded, stored)

    def _caption_result(self, record: JobRecord, output: CaptionResult) -> JobResult:
        result = JobResult(
            caption=output.text,
            result_url=f"/jobs/{record.id}/result",
            params=self._effective_params(record, output.options),
            model=self.model,
        )
        self.files.write_json(record.id, self._payload(record, result, tokens=list(output.tokens)))
        passes = self.metrics.caption_steps
        passes.labels("full").inc(output.full_passes)
        passes.labels("text_only").inc(output.text_only_passes)
        return result

    def _video_result(self, record: JobRecord, output: Any, *, caption: str | None) -> JobResult:
        frames = output.frames
        write_mp4(frames, self.files.video_target(record.id), fps=output.fps)
        num_frames, height, width = (int(size) for size in frames.shape[:3])
        result = JobResult(
            video_url=f"/jobs/{record.id}/video",
            result_url=f"/jobs/{record.id}/result",
            caption=caption,
            fps=int(output.fps),
            num_frames=num_frames,
            height=height,
            width=width,
            params=self._effective_params(record, output.options),
            model=self.model,
        )
        self.files.write_json(record.id, self._payload(record, result))
        return result

    @staticmethod
    def _effective_params(record: JobRecord, options: dict[str, Any]) -> dict[str, Any]:
        """The job's parameters as it ran: its input (the prompt) and every option the pipeline used."""
        return {**record.params, **options}

    @staticmethod
    def _payload(record: JobRecord, result: JobResult, **extra: Any) -> dict[str, Any]:
        """result.json: the job's id and type, and its result as GET /jobs/{id} shows it (with the
        effective ``params``), plus ``extra``."""
        return {"id": record.id, "type": record.type.value, **result.model_dump(exclude_none=True), **extra}

    def _progress(self, record: JobRecord, clock: JobClock) -> Callable[[int, int], None]:
        step_time = self.metrics.step_time.labels(record.type.value)

        def report(step: int, total: int) -> None:
            step_time.observe(clock.step())
            percent = min(100, max(0, 100 * step // max(total, 1)))
            try:
                self.store.progress(record.id, percent, ends_at=time.time() + clock.remaining(step, total))
            except REDIS_UNREACHABLE as exc:
                log.warning("progress of job %s not saved, Redis unreachable: %s", record.id, exc)

        return report

    def _should_cancel(self, job_id: str) -> Callable[[], bool]:
        def should_cancel() -> bool:
            try:
                return self.store.cancel_requested(job_id)
            except REDIS_UNREACHABLE as exc:
                log.warning("cancel flag of job %s not read, Redis unreachable: %s", job_id, exc)
                return False

        return should_cancel

    def _finish(self, record: JobRecord, outcome: Outcome) -> None:
        """Record the outcome, then the files' expiry. An outcome lost to a Redis outage gets its expiry
        from the reaper that fails the job; a dropped one (the record was deleted or reaped meanwhile)
        still gets one here, so what was written for it expires like any other job's files."""
        deadline = time.monotonic() + self.finish_retry_seconds
        while True:
            try:
                finished = self.store.finish(
                    record.id, outcome.status, result=outcome.result, error=outcome.error
                )
                break
            except REDIS_UNREACHABLE as exc:
                if time.monotonic() > deadline:
                    log.error("job %s outcome %s lost, Redis unreachable: %s", record.id, outcome.status, exc)
                    return
                time.sleep(1.0)
        if finished:
            self.metrics.jobs_finished.labels(record.type.value, outcome.status.value).inc()
        else:
            log.warning(
                "job %s was no longer running (reaped or deleted); outcome %s dropped",
                record.id,
                outcome.status,
            )
        self.files.record_expiry(record.id, self.store.result_ttl_seconds)
