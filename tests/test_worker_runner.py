"""The job runner in-process with stand-in pipelines: every failure class ends the job with its code and
the runner keeps serving. (The real tiny pipeline runs in test_worker_e2e.py.)"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import queued
from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from model.errors import Canceled, PromptTooLongError
from model.media import write_mp4
from model.pipeline import UniViGUPipeline
from service.cli.main import main
from service.cli.redis_server import RedisServer
from service.contract.metrics import WorkerMetrics
from service.contract.queue import FAILURE_CALLBACK, JobQueue
from service.contract.result_files import ResultFiles
from service.contract.schemas import JobRecord, JobStatus, JobType
from service.contract.settings import Settings
from service.contract.store import JobStore
from worker import tasks
from worker.cli import EXIT_CONFIGURATION
from worker.loading import LimitsExcludeDefaults, cap_limits
from worker.runner import JobRunner


@dataclass
class Video:
    frames: np.ndarray
    fps: int = 8
    options: dict[str, Any] = field(default_factory=lambda: {"seed": 1})


class StandIn:
    """Calls progress like the pipeline does, then does what the test asks."""

    def __init__(self) -> None:
        self.behaviour: Callable[[], Any] = lambda: Video(np.zeros((5, 32, 32, 3), dtype=np.uint8))

    def identity(self) -> dict[str, Any]:
        return {
            "preset": None,
            "weights_sha256": "0" * 64,
            "video_sampler": "euler",
            "shift": 3.0,
            "device": "cpu",
            "dtype": "float32",
        }

    def generate(self, prompt: str, *, progress: Any, should_cancel: Any, **kwargs: Any) -> Any:
        for step in (1, 2):
            if should_cancel():
                raise Canceled("canceled")
            progress(step, 4)
        return self.behaviour()

    caption = joint = generate


@pytest.fixture
def runner(redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[JobRunner]:
    redis = Redis.from_url(redis_server.url)
    store = JobStore(
        redis, prefix=f"runner-{request.node.name}", result_ttl_seconds=60, heartbeat_ttl_seconds=5
    )
    files = ResultFiles(tmp_path / "results")
    files.ensure_dirs()
    yield JobRunner(
        StandIn(), store=store, files=files, metrics=WorkerMetrics(), worker_name="w1", finish_retry_seconds=5
    )
    redis.close()


def run(runner: JobRunner, behaviour: Callable[[], Any] | None = None) -> Any:
    if behaviour is not None:
        runner.pipeline.behaviour = behaviour  # type: ignore[attr-defined]
    job_id = f"job{np.random.default_rng().integers(1 << 30)}"
    queued(runner.store, job_id)
    runner.run(job_id)
    return runner.store.get(job_id)


def succeed() -> Video:
    return Video(np.zeros((5, 32, 32, 3), dtype=np.uint8))


def raiser(error: BaseException) -> Callable[[], Any]:
    def behave() -> Any:
        raise error

    return behave


@pytest.mark.parametrize(
    ("error", "code", "param"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "gpu_oom", None),
        (
            PromptTooLongError("prompt has 600 tokens; at most 512", param="prompt"),
            "prompt_too_long",
            "prompt",
        ),
        (RuntimeError("a bug"), "internal_error", None),
    ],
)
def test_failures_end_the_job_with_a_code_and_the_runner_keeps_serving(
    runner: JobRunner, error: BaseException, code: str, param: str | None
) -> None:
    failed = run(runner, raiser(error))
    assert failed.status == JobStatus.failed
    assert (failed.error.code, failed.error.param) == (code, param)
    assert failed.progress == 50
    assert runner.current_jobs == ()
    assert run(runner, lambda: Video(np.zeros((5, 32, 32, 3), dtype=np.uint8))).status == JobStatus.succeeded
    metrics = runner.metrics.registry
    assert (
        metrics.get_sample_value("univigu_jobs_finished_total", {"type": "generate", "status": "failed"}) == 1
    )
    assert metrics.get_sample_value("univigu_worker_busy") == 0


def test_unwritable_results_fail_with_storage_error(runner: JobRunner) -> None:
    runner.files.jobs_dir.rmdir()
    runner.files.jobs_dir.write_text("a file where the jobs directory should be")
    failed = run(runner)
    assert failed.status == JobStatus.failed
    assert failed.error.code == "storage_error"


def test_a_cancel_flag_stops_the_job(runner: JobRunner) -> None:
    def cancel_during_run() -> Any:
        raise AssertionError("should have stopped before")

    store = runner.store
    original = store.start

    def start_and_cancel(job_id: str, worker: str) -> bool:
        started = original(job_id, worker)
        store.cancel(job_id)
        return started

    store.start = start_and_cancel  # type: ignore[method-assign]
    canceled = run(runner, cancel_during_run)
    assert canceled.status == JobStatus.canceled
    assert canceled.error.code == "canceled"


def test_success_writes_the_video_and_result_atomically(runner: JobRunner) -> None:
    done = run(runner)
    assert done.status == JobStatus.succeeded
    job_dir = runner.files.job_dir(done.id)
    assert sorted(path.name for path in job_dir.iterdir()) == ["expires_at", "result.json", "video.mp4"]
    # The files' expiry is recorded after the record's, so it is no earlier.
    assert runner.files.expires_at(done.id) >= done.expires_at.timestamp()
    assert done.result.video_url == f"/jobs/{done.id}/video"
    assert (done.result.num_frames, done.result.height, done.result.width) == (5, 32, 32)


def test_rq_failure_callback_fails_abandoned_jobs_only(runner: JobRunner) -> None:
    store = runner.store
    abandoned = queued(store, "abandoned")
    finished = run(runner)
    tasks.install(runner)
    for job_id in (abandoned, finished.id):
        tasks.on_failure(SimpleNamespace(id=job_id), None, AbandonedJobError, AbandonedJobError(), None)
    lost = store.get(abandoned)
    assert (lost.status, lost.error.code) == (JobStatus.failed, "worker_lost")
    assert store.get(finished.id).status == JobStatus.succeeded


def test_the_gateway_registers_the_failure_callback(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url)
    queue = JobQueue(redis, name="callback-check", max_length=10, job_timeout_seconds=60, ttl_seconds=60)
    with redis.pipeline() as pipeline:
        queue.enqueue("cb", pipeline)
        pipeline.execute()
    job = RqJob.fetch("cb", connection=redis, serializer=JSONSerializer)
    assert job._failure_callback_name == FAILURE_CALLBACK
    queue.remove("cb")
    redis.close()


def test_gpu_oom_releases_the_failed_jobs_tensors_and_the_next_job_succeeds(runner: JobRunner) -> None:
    """A simulation on the CPU: the error is the one CUDA raises, the tensor stands for device memory.
    The exception references its own frame (``raise error``), a cycle that only a collection frees."""
    held: list[weakref.ref[torch.Tensor]] = []

    def out_of_memory() -> Any:
        activations = torch.empty(1024, 1024)
        held.append(weakref.ref(activations))
        error = torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        raise error

    failed = run(runner, out_of_memory)
    assert (failed.status, failed.error.code) == (JobStatus.failed, "gpu_oom")
    assert held[0]() is None, "the failed job's tensors are still alive after it failed"
    assert run(runner, succeed).status == JobStatus.succeeded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_oom_returns_the_memory(runner: JobRunner) -> None:
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def out_of_memory() -> Any:
        activations = torch.empty(256 * 2**20, device="cuda")  # 1 GiB the failed job holds
        return activations + torch.empty(2**50, dtype=torch.uint8, device="cuda")  # 1 PiB: a real OOM

    failed = run(runner, out_of_memory)
    assert failed.error.code == "gpu_oom"
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() <= reserved
    assert run(runner, succeed).status == JobStatus.succeeded


@pytest.fixture
def tiny_runner(runner: JobRunner) -> JobRunner:
    """The runner with the real tiny pipeline in place of the stand-in."""
    runner.pipeline = pipeline = UniViGUPipeline.from_preset("tiny")
    runner.model = type(runner.model)(**pipeline.identity())
    return runner


def run_params(
    runner: JobRunner, job_type: JobType, params: dict[str, Any], video: Path | None = None
) -> JobRecord:
    job_id = f"job{np.random.default_rng().integers(1 << 30)}"
    queued(runner.store, job_id, job_type=job_type, params=params)
    if video is not None:
        runner.files.upload(job_id).write_bytes(video.read_bytes())
    runner.run(job_id)
    record = runner.store.get(job_id)
    assert record.status == JobStatus.succeeded, record.error
    return record


def test_an_unseeded_jobs_recorded_parameters_reproduce_its_mp4_bytes(tiny_runner: JobRunner) -> None:
    first = run_params(
        tiny_runner,
        JobType.generate,
        {"prompt": "a red ball rolls", "steps": 2, "width": 48, "num_frames": 9},
    )
    recorded = first.result.params
    defaults = tiny_runner.pipeline.defaults
    assert recorded == {
        "prompt": "a red ball rolls",
        "negative_prompt": None,
        "height": defaults.height,
        "width": 48,
        "num_frames": 9,
        "fps": defaults.fps,
        "steps": 2,
        "guidance_scale": defaults.guidance_scale,
        "seed": recorded["seed"],
        "step_cache": None,
    }
    assert isinstance(recorded["seed"], int)
    assert first.result.model == tiny_runner.model
    assert first.result.model.preset == "tiny" and len(first.result.model.weights_sha256) == 64
    stored = json.loads(tiny_runner.files.result_json(first.id).read_text())
    assert stored["params"] == recorded and stored["model"] == first.result.model.model_dump()

    again = run_params(tiny_runner, JobType.generate, recorded)
    assert again.result.params == recorded
    video = tiny_runner.files.video
    assert video(again.id).read_bytes() == video(first.id).read_bytes()
    other = run_params(tiny_runner, JobType.generate, {**recorded, "seed": recorded["seed"] + 1})
    assert video(other.id).read_bytes() != video(first.id).read_bytes()


def test_an_unseeded_captions_recorded_parameters_reproduce_its_text(
    tiny_runner: JobRunner, tmp_path: Path
) -> None:
    clip = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    mp4 = write_mp4(clip, tmp_path / "clip.mp4", fps=8)
    first = run_params(tiny_runner, JobType.caption, {"steps": 3, "max_tokens": 8}, mp4)
    recorded = first.result.params
    assert set(recorded) == {"prompt", "steps", "max_tokens", "seed", "video_reuse"}
    assert recorded["video_reuse"] == tiny_runner.pipeline.defaults.video_reuse
    tokens = json.loads(tiny_runner.files.result_json(first.id).read_text())["tokens"]

    again = run_params(tiny_runner, JobType.caption, recorded, mp4)
    assert again.result.caption == first.result.caption
    assert json.loads(tiny_runner.files.result_json(again.id).read_text())["tokens"] == tokens


def test_a_caption_jobs_unreadable_video_is_named_as_the_upload_not_its_file(
    tiny_runner: JobRunner, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video\n" * 100)
    job_id = queued(tiny_runner.store, "unreadable", job_type=JobType.caption, params={"steps": 2})
    tiny_runner.files.upload(job_id).write_bytes(garbage.read_bytes())
    tiny_runner.run(job_id)
    failed = tiny_runner.store.get(job_id)
    assert (failed.status, failed.error.code) == (JobStatus.failed, "invalid_video")
    assert failed.error.message.startswith("the uploaded video is not a readable video")
    assert ".upload" not in failed.error.message


def test_request_limits_that_refuse_the_models_defaults_stop_the_worker_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every request that leaves steps out would fail: `univigu worker` says which setting, exits 2
    (which `univigu up` does not retry), and never reaches Redis."""
    pipe = UniViGUPipeline.from_preset("tiny")
    settings = Settings(max_steps=pipe.defaults.steps - 1)
    with pytest.raises(LimitsExcludeDefaults, match=r"default steps .*UNIVIGU_MAX_STEPS"):
        cap_limits(pipe, settings)
    cap_limits(pipe, Settings(max_steps=pipe.defaults.steps))
    assert pipe.limits["generate"].rules["steps"].maximum == pipe.defaults.steps

    env = {
        "UNIVIGU_MAX_STEPS": "1",
        "UNIVIGU_REDIS_URL": "redis://127.0.0.1:1/0",
        "UNIVIGU_WORKER_METRICS_PORT": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["worker", "--preset", "tiny", "--burst"]) == EXIT_CONFIGURATION
    assert "UNIVIGU_MAX_STEPS" in caplog.text
