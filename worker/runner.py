"""Running one job in the worker process: read its record, call the pipeline, store results atomically.

Every outcome ends the job: succeeded, canceled, or failed with a code (the model's error codes,
``gpu_oom``, ``timeout``, ``storage_error``, ``internal_error``). The worker keeps serving afterwards.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from rq.timeouts import JobTimeoutException

from model.errors import Canceled, UniViGUError
from model.media import write_mp4
from service.contract.connection import REDIS_UNREACHABLE
from service.contract.errors import StorageError
from service.contract.metrics import WorkerMetrics
from service.contract.result_files import ResultFiles
from service.contract.schemas import PARAMS_BY_TYPE, ErrorInfo, JobRecord, JobResult, JobStatus, JobType
from service.contract.store import JobStore
from service.contract.timing import StepTiming
from worker.clock import JobClock

if TYPE_CHECKING:
    from model.pipeline import UniViGUPipeline
    from worker.group import GroupPipeline

log = logging.getLogger(__name__)

GPU_OOM = "gpu_oom"


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
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.files = files
        self.metrics = metrics
        self.worker_name = worker_name
        # How long a finished job's outcome is retried while Redis is unreachable before giving up
        # (the gateway's reaper then fails the job as worker_lost).
        self.finish_retry_seconds = finish_retry_seconds
        self._current: str | None = None
        self._lock = threading.Lock()

    @property
    def current_job(self) -> str | None:
        with self._lock:
            return self._current

    def run(self, job_id: str) -> None:
        if not self.store.start(job_id, self.worker_name):
            log.info("job %s is no longer queued (canceled); skipped", job_id)
            return
        with self._lock:
            self._current = job_id
        self.metrics.busy.set(1)
        try:
            self._run(self.store.get(job_id))
        finally:
            # Whatever happens, the heartbeat stops: a job this worker could not finish is reaped.
            with self._lock:
                self._current = None
            self.metrics.busy.set(0)

    def _run(self, record: JobRecord) -> None:
        clock = JobClock(self._typical_timing(record.type))
        if record.started_at is not None:
            wait = (record.started_at - record.created_at).total_seconds()
            self.metrics.queue_wait.labels(record.type.value).observe(wait)
        try:
            outcome = self._execute(record, clock)
        finally:
            if record.type == JobType.caption:
                self.files.remove_upload(record.id)
        if outcome.error is not None and outcome.error.code == GPU_OOM:
            release_device_memory()
        self._finish(record, outcome)
        self.metrics.run_time.labels(record.type.value).observe(clock.elapsed())
        if outcome.status == JobStatus.succeeded:
            self._record_timing(record, clock)

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
        """Fail the job being run, if any, from another thread: its worker group broke (worker.group)."""
        job_id = self.current_job
        if job_id is None:
            return
        self.store.finish(job_id, JobStatus.failed, error=error)
        self.files.record_expiry(job_id, self.store.result_ttl_seconds)

    def _execute(self, record: JobRecord, clock: JobClock) -> Outcome:
        try:
            return Outcome(JobStatus.succeeded, result=self._call(record, clock))
        except Canceled:
            log.info("job %s canceled", record.id)
            return Outcome(
                JobStatus.canceled, error=ErrorInfo(code="canceled", message="canceled on request")
            )
        except UniViGUError as exc:
            log.info("job %s failed: %s: %s", record.id, exc.code, exc.message)
            return Outcome(
                JobStatus.failed, error=ErrorInfo(code=exc.code, message=exc.message, param=exc.param)
            )
        except StorageError as exc:
            log.warning("job %s could not store its result: %s", record.id, exc)
            return Outcome(JobStatus.failed, error=ErrorInfo(code=exc.code, message=str(exc)))
        except torch.cuda.OutOfMemoryError as exc:
            # str(exc): a log record that kept the exception would keep the failed job's tensors alive.
            log.warning("job %s ran out of GPU memory: %s", record.id, str(exc))
            message = "the GPU ran out of memory; try fewer frames, a smaller size or fewer tokens"
            return Outcome(JobStatus.failed, error=ErrorInfo(code=GPU_OOM, message=message))
        except JobTimeoutException:
            log.warning("job %s timed out", record.id)
            return Outcome(JobStatus.failed, error=ErrorInfo(code="timeout", message="the job ran too long"))
        except Exception:  # the worker's last line: the job fails with a code, the traceback is logged
            log.exception("job %s failed with an unexpected error", record.id)
            message = "the worker hit an unexpected error; it is logged"
            return Outcome(JobStatus.failed, error=ErrorInfo(code="internal_error", message=message))

    def _call(self, record: JobRecord, clock: JobClock) -> JobResult:
        params: dict[str, Any] = (
            PARAMS_BY_TYPE[record.type].model_validate(record.params).model_dump(exclude_none=True)
        )
        progress, should_cancel = self._progress(record, clock), self._should_cancel(record.id)
        if record.type == JobType.generate:
            video = self.pipeline.generate(**params, progress=progress, should_cancel=should_cancel)
            return self._video_result(record, video, caption=None)
        if record.type == JobType.joint:
            joint = self.pipeline.joint(**params, progress=progress, should_cancel=should_cancel)
            return self._video_result(record, joint, caption=joint.text)
        upload = self.files.upload(record.id)
        output = self.pipeline.caption(upload, **params, progress=progress, should_cancel=should_cancel)
        self.files.write_json(
            record.id, self._payload(record, caption=output.text, tokens=list(output.tokens))
        )
        return JobResult(caption=output.text, result_url=f"/jobs/{record.id}/result")

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
        )
        self.files.write_json(record.id, self._payload(record, **result.model_dump(exclude_none=True)))
        return result

    @staticmethod
    def _payload(record: JobRecord, **fields: Any) -> dict[str, Any]:
        return {"id": record.id, "type": record.type.value, "params": record.params, **fields}

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
