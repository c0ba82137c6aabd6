"""Faults: a worker SIGKILLed mid-job, and Redis restarted under a running gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TINY_VIDEO, WorkerProcess, assert_envelope, make_settings, wait_for, wait_for_status
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import RedisServer
from service.settings import Settings

pytestmark = pytest.mark.slow

LONG_JOB = {"prompt": "a long one", "height": 64, "width": 64, "num_frames": 17, "steps": 100}


def test_a_killed_worker_leaves_its_job_failed_worker_lost_within_the_bound(
    settings: Settings, client: TestClient, start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    worker = start_worker(settings)
    worker.wait_ready(client)
    job_id = client.post("/generate", json=LONG_JOB).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0, timeout=120, what="progress")

    worker.kill()
    # Polled at 0.1 s, the job must be failed within the stated bound (plus one polling interval).
    job = wait_for_status(
        client, job_id, {"failed", "succeeded", "canceled"}, timeout=settings.worker_lost_bound_seconds + 0.5
    )
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert 'univigu_jobs_finished_total{status="failed",type="generate"} 1.0' in client.get("/metrics").text

    # A new worker serves the queue again; the lost job stays failed (no silent re-run).
    start_worker(settings).wait_ready(client)
    after = client.post("/generate", json={"prompt": "after", **TINY_VIDEO}).json()["id"]
    assert wait_for_status(client, after, {"succeeded", "failed"})["status"] == "succeeded"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "failed"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, which it may stop and restart."""
    server = RedisServer(tmp_path / "own-redis")
    server.start()
    yield server
    server.stop()


def test_redis_restart_answers_503_then_recovers_without_losing_accepted_jobs(
    tmp_path: Path, redis: RedisServer, start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    settings = make_settings(tmp_path / "results", redis_url=redis.url, redis_timeout_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        accepted = [
            client.post("/generate", json={"prompt": f"job {i}", **TINY_VIDEO}).json()["id"] for i in range(3)
        ]

        redis.stop()
        submitted = client.post("/generate", json={"prompt": "while down", **TINY_VIDEO})
        assert_envelope(submitted, 503, "redis_unavailable")
        assert submitted.headers["retry-after"] == str(settings.retry_after_seconds)
        assert_envelope(client.get(f"/jobs/{accepted[0]}"), 503, "redis_unavailable")
        assert_envelope(client.get("/readyz"), 503, "redis_unavailable")

        redis.start()
        wait_for(lambda: client.get("/healthz").status_code == 200, timeout=10)
        later = client.post("/generate", json={"prompt": "after restart", **TINY_VIDEO})
        assert later.status_code == 202
        start_worker(settings).wait_ready(client)
        for job_id in [*accepted, later.json()["id"]]:
            assert (
                wait_for_status(client, job_id, {"succeeded", "failed", "canceled"})["status"] == "succeeded"
            )


def test_redis_restart_under_a_running_worker(
    tmp_path: Path, redis: RedisServer, start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    settings = make_settings(tmp_path / "results", redis_url=redis.url, redis_timeout_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        start_worker(settings).wait_ready(client)
        redis.stop()
        redis.start()
        job_id = client.post("/generate", json={"prompt": "after restart", **TINY_VIDEO}).json()["id"]
        assert wait_for_status(client, job_id, {"succeeded", "failed", "canceled"})["status"] == "succeeded"


def test_a_job_over_its_timeout_fails_and_the_worker_keeps_serving(
    settings_factory: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    # Generous for a tiny job on a loaded machine; far too short for 1000 steps at 128x128 (about 30 s on
    # one thread once the worker has warmed up; 1000 steps at 64x64 take about 7 s, too close to call).
    settings = settings_factory(job_timeout_seconds=6, max_steps=1000)
    with TestClient(create_app(settings)) as client:
        start_worker(settings).wait_ready(client)
        long_job = {**LONG_JOB, "height": 128, "width": 128, "steps": 1000}
        job_id = client.post("/generate", json=long_job).json()["id"]
        job = wait_for_status(client, job_id, {"failed", "succeeded", "canceled"})
        assert job["status"] == "failed"
        assert job["error"]["code"] == "timeout"
        after = client.post("/generate", json={"prompt": "after", **TINY_VIDEO}).json()["id"]
        done = wait_for_status(client, after, {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
