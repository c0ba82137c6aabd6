"""Job functions that rq imports by dotted path (``worker.tasks.run_job``), with only a job id as argument.

The worker process installs its :class:`~worker.runner.JobRunner` (holding the loaded pipeline) before
it starts working, so every job reuses the model loaded once at start.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from worker.runner import JobRunner

_runner: JobRunner | None = None


def install(runner: JobRunner) -> None:
    global _runner
    _runner = runner


def _installed() -> JobRunner:
    if _runner is None:
        raise RuntimeError("no pipeline loaded in this process; run jobs with `univigu worker`")
    return _runner


def run_job(job_id: str) -> None:
    _installed().run(job_id)


def on_failure(
    job: Any,
    connection: Any,
    exc_type: type[BaseException],
    exc: BaseException,
    traceback: TracebackType | None,
) -> None:
    """rq's failure callback, run in a worker. It fires for jobs rq gave up on, notably one whose worker
    died after taking it off the queue but before marking it running (an "abandoned" job): its record
    fails as worker_lost instead of staying queued. Jobs that finished through the runner are final
    already and are left alone."""
    _installed().abandoned(job.id, reason=exc_type.__name__)
