"""Fixtures for the serving tests: a real redis-server started here, the gateway app, worker processes.

Nothing touches a Redis these fixtures did not start (the one on 6379 is left alone). Each test gets its
own key prefix and queue name on the session's server, so tests never see each other's jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.cli.redis_server import RedisServer
from service.contract.schemas import JobType
from service.contract.settings import Settings
from service.contract.store import JobStore
from service.gateway.app import create_app

REPO = Path(__file__).resolve().parents[1]
WORKER_START_TIMEOUT = 180.0

# Small bounds so the worker_lost tests finish quickly: lost within 1.5 + 0.5 + 1 = 3 s.
FAST_LIVENESS = {
    "heartbeat_interval_seconds": 0.5,
    "heartbeat_ttl_seconds": 1.5,
    "reaper_interval_seconds": 0.5,
}
# Tiny jobs that still take several denoising steps.
TINY_VIDEO = {"height": 32, "width": 32, "num_frames": 5, "steps": 3}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def make_settings(results_dir: Path, **overrides: Any) -> Settings:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "results_dir": results_dir,
        "key_prefix": namespace,
        "queue_name": namespace,
        "worker_metrics_port": 0,
        **FAST_LIVENESS,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def settings_factory(redis_server: RedisServer, tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        return make_settings(tmp_path / "results", **{"redis_url": redis_server.url, **overrides})

    return build


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def store(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[JobStore]:
    """A job store of its own (a key prefix named after the test) on the session's Redis; heartbeats
    expire after 0.3 s."""
    redis = Redis.from_url(redis_server.url)
    yield JobStore(
        redis, prefix=f"store-{request.node.name}", result_ttl_seconds=60, heartbeat_ttl_seconds=0.3
    )
    redis.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read the same settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("UNIVIGU_")}
    env.pop("REDIS_URL", None)
    return env | settings.environment()


TINY_MODEL = ("--preset", "tiny")
TOY_MODEL = ("--weights", str(REPO / "model" / "assets" / "toy"))  # the shipped toy-world model


class WorkerProcess:
    """`univigu worker` as a child process, serving ``model`` (its flags; the tiny preset by default)."""

    def __init__(self, settings: Settings, log_path: Path, model: tuple[str, ...] = TINY_MODEL) -> None:
        self.settings = settings
        self.name = f"test-worker-{uuid.uuid4().hex[:6]}"
        self.log_path = log_path
        command = [sys.executable, "-m", "service.cli", "worker", *model, "--name", self.name]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, client: TestClient) -> None:
        """Until /readyz sees this worker (it loads the model first)."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while client.get("/readyz").status_code != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not become ready:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@contextmanager
def unpublished_tokenizer(settings: Settings) -> Iterator[None]:
    """The served tokenizer withdrawn, as while a worker publishes another model: gateways that have not
    loaded it yet count prompts in characters only, so a job with too many tokens reaches the worker,
    which refuses it itself."""
    redis = Redis.from_url(settings.redis_url)
    key = f"{settings.key_prefix}:tokenizer"
    published = redis.get(key)
    redis.delete(key)
    try:
        yield
    finally:
        if published is not None:
            redis.set(key, published)
        redis.close()


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; a waiting limit, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def wait_for_status(client: TestClient, job_id: str, statuses: set[str], *, timeout: float = 120.0) -> dict:
    def reached() -> dict | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} in {statuses}")


def assert_envelope(response: Any, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "param"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def queued(
    store: JobStore,
    job_id: str = "j1",
    *,
    webhook: str | None = None,
    job_type: JobType = JobType.generate,
    params: dict[str, Any] | None = None,
) -> str:
    """Record a queued job (by default generate "a cat") directly in the store (no rq queue involved);
    returns its id."""
    store.create(
        job_id,
        job_type,
        {"prompt": "a cat"} if params is None else params,
        idempotency=None,
        idempotency_ttl_seconds=60,
        enqueue=lambda pipeline: None,
        admit=lambda depth: None,
        queue_key="unused-queue",
        webhook=webhook,
    )
    return job_id
