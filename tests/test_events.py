"""``GET /jobs/{id}/events`` over real HTTP (uvicorn) next to a live tiny worker: the Server-Sent Events a
client sees, resuming with Last-Event-ID, queued jobs' ETAs, the same auth as ``GET /jobs/{id}``, and
many streams at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from httpx_sse import ServerSentEvent, connect_sse
from live_http import LiveService, live_service, serve_gateway

from service.cli.redis_server import RedisServer
from service.client import Client
from service.contract.schemas import Job, JobStatus

pytestmark = pytest.mark.slow

STEPPED = {"height": 64, "width": 64, "num_frames": 9, "steps": 60}  # several progress states
LONG = {"height": 64, "width": 64, "num_frames": 17, "steps": 100}  # canceled long before its end
QUICK = {"height": 32, "width": 32, "num_frames": 5, "steps": 2}


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    with live_service(redis_server, tmp_path_factory.mktemp("events"), events_poll_seconds=0.05) as service:
        yield service


@pytest.fixture
def client(live: LiveService) -> Iterator[Client]:
    with Client(live.url) as api:
        yield api


@contextmanager
def stream(url: str, job_id: str, **headers: str) -> Iterator[Iterator[ServerSentEvent]]:
    """The raw events of one connection to the job's stream (pings left out)."""
    with (
        httpx.Client(base_url=url, timeout=60) as http,
        connect_sse(http, "GET", f"/jobs/{job_id}/events", headers=headers) as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        yield (event for event in source.iter_sse() if event.event != "ping")


def job_events(events: Iterator[ServerSentEvent]) -> list[tuple[str, Job]]:
    """The remaining ``job`` events as (id, job)."""
    found = []
    for event in events:
        assert event.event == "job", event
        found.append((event.id, Job.model_validate_json(event.data)))
    return found


def test_progress_is_monotone_and_the_last_event_is_the_terminal_state(
    client: Client, live: LiveService
) -> None:
    job = client.generate("a red ball rolls", seed=1, **STEPPED)
    with stream(live.url, job.id) as events:
        assert next(events).retry == 2000  # the stream opens with a reconnection hint
        received = job_events(events)  # ends when the server closes the stream

    ids, jobs = [event_id for event_id, _ in received], [job for _, job in received]
    progress = [job.progress for job in jobs]
    assert progress == sorted(progress), progress
    assert any(0 < value < 100 for value in progress), f"no live progress was seen: {progress}"
    statuses = [job.status for job in jobs]
    assert statuses[-1] == JobStatus.succeeded and JobStatus.succeeded not in statuses[:-1]
    assert jobs[-1].progress == 100 and jobs[-1].result is not None and jobs[-1].result.video_url
    assert jobs[-1].eta_seconds is None
    # Every event names its state, and every event is a new one.
    assert len(set(ids)) == len(ids)
    for event_id, shown in received:
        position = "" if shown.queue_position is None else f".{shown.queue_position}"
        assert event_id == f"{shown.status.value}.{shown.progress}{position}"
    # A running job past its first step has an ETA from its own step times.
    assert all(
        job.eta_seconds is not None for job in jobs if job.status == JobStatus.running and job.progress
    )
    assert client.get(job.id) == jobs[-1]  # the same job as GET /jobs/{id}


def test_resuming_with_last_event_id_sends_only_newer_states(client: Client, live: LiveService) -> None:
    job = client.generate("a blue square", seed=2, **STEPPED)
    with stream(live.url, job.id) as events:
        next(events)
        seen_id, seen = next((event.id, Job.model_validate_json(event.data)) for event in events)
    # The client dropped the connection; it resumes from the state it saw.
    with stream(live.url, job.id, **{"Last-Event-ID": seen_id}) as events:
        next(events)
        resumed = job_events(events)
    assert resumed, "the job moved on, so the resumed stream has news"
    assert resumed[0][0] != seen_id and resumed[0][1].progress >= seen.progress
    assert resumed[-1][1].status == JobStatus.succeeded
    final_id = resumed[-1][0]

    # Resuming after the end: 204, which tells a browser's EventSource to stop reconnecting.
    with httpx.Client(base_url=live.url) as http:
        assert http.get(f"/jobs/{job.id}/events", headers={"Last-Event-ID": final_id}).status_code == 204
    # Without Last-Event-ID, a finished job's stream is its final state alone; an older id gets it too.
    for headers in ({}, {"Last-Event-ID": seen_id}):
        with stream(live.url, job.id, **headers) as events:
            next(events)
            assert [event_id for event_id, _ in job_events(events)] == [final_id]


def test_a_queued_job_shows_its_place_and_eta_and_its_stream_ends_when_canceled(
    client: Client, live: LiveService
) -> None:
    client.wait(client.generate("times the generate jobs", **QUICK).id, timeout=120)
    busy = client.generate("keeps the one worker busy", **LONG)
    try:
        waiting = client.generate("waits its turn", **QUICK)
        with stream(live.url, waiting.id) as events:
            next(events)
            first = Job.model_validate_json(next(events).data)
            assert (first.status, first.queue_position) == (JobStatus.queued, 0)
            assert first.eta_seconds is not None and first.eta_seconds > 0
            polled = client.get(waiting.id)
            assert polled.status == JobStatus.queued and polled.eta_seconds is not None
            client.cancel(waiting.id)
            last = job_events(events)[-1][1]
        assert last.status == JobStatus.canceled and last.eta_seconds is None

        # A running job's stream; deleting the job (a queued one would show canceled first) ends it with
        # an error event.
        wait_for(lambda: client.get(busy.id).status == JobStatus.running, timeout=60, what="busy to start")
        with stream(live.url, busy.id) as events:
            next(events)
            assert Job.model_validate_json(next(events).data).status == JobStatus.running
            httpx.delete(f"{live.url}/v1/videos/{busy.id}")
            error = next(event for event in events if event.event == "error")
            assert '"code":"job_not_found"' in error.data
            assert list(events) == []
    finally:
        httpx.delete(f"{live.url}/v1/videos/{busy.id}")


def test_many_streams_share_the_event_loop_without_blocking_it(client: Client, live: LiveService) -> None:
    busy = client.generate("keeps the one worker busy", **LONG)
    waiting = client.generate("watched by many", **QUICK)
    watchers = 100

    async def watch(http: httpx.AsyncClient, opened: asyncio.Queue[int]) -> str:
        async with http.stream("GET", f"/jobs/{waiting.id}/events") as response:
            opened.put_nowait(response.status_code)
            return [line async for line in response.aiter_lines() if line.startswith("data: {")][-1]

    async def scenario() -> tuple[list[int], int, list[str]]:
        limits = httpx.Limits(max_connections=watchers + 10)
        async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=120) as http:
            opened: asyncio.Queue[int] = asyncio.Queue()
            tasks = [asyncio.create_task(watch(http, opened)) for _ in range(watchers)]
            statuses = [await asyncio.wait_for(opened.get(), 120) for _ in range(watchers)]
            # With every stream open and polling, other requests are still answered.
            health = await http.get("/healthz")
            await http.post(f"/jobs/{waiting.id}/cancel")
            return statuses, health.status_code, list(await asyncio.wait_for(asyncio.gather(*tasks), 120))

    try:
        statuses, health, finals = asyncio.run(scenario())
        assert statuses == [200] * watchers and health == 200
        assert all('"status":"canceled"' in final for final in finals)
    finally:
        httpx.delete(f"{live.url}/v1/videos/{busy.id}")


def test_the_stream_has_the_auth_and_ownership_rules_of_get_job(live: LiveService, tmp_path: Path) -> None:
    settings = live.settings.model_copy(update={"api_keys": ["alice", "bob"]})  # same queue, same worker
    with serve_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/generate", json={"prompt": "mine", **QUICK}, headers={"X-API-Key": "alice"}).json()
        path = f"/jobs/{job['id']}/events"
        assert http.get(path).status_code == 401
        assert http.get(path, headers={"X-API-Key": "nope"}).status_code == 401
        other = http.get(path, headers={"X-API-Key": "bob"})
        assert (other.status_code, other.json()["error"]["code"]) == (404, "job_not_found")
        with connect_sse(http, "GET", path, headers={"X-API-Key": "alice"}) as source:
            assert source.response.status_code == 200
            final = [event for event in source.iter_sse() if event.event == "job"][-1]
        assert Job.model_validate_json(final.data).status == JobStatus.succeeded
    with httpx.Client(base_url=live.url) as http:
        unknown = http.get(f"/jobs/{'0' * 32}/events")
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "job_not_found")
