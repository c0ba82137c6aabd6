"""Job functions that rq imports by dotted path (``worker.jobs.run_job``), with only a job id as argument.

The worker process installs its :class:`~worker.runner.JobRunner` (holding the loaded pipeline) before
it starts working, so every job reuses the model loaded once at start.
"""

from __future__ import annotations

from worker.runner import JobRunner

_runner: JobRunner | None = None


def install(runner: JobRunner) -> None:
    global _runner
    _runner = runner


def run_job(job_id: str) -> None:
    if _runner is None:
        raise RuntimeError("no pipeline loaded in this process; run jobs with `univigu worker`")
    _runner.run(job_id)
