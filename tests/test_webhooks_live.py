"""Webhooks end to end: live gateways (uvicorn on real HTTP) and a live `univigu worker --preset tiny` on
one Redis, with a receiver on the loopback (allowed by setting). Every event is verified with the
``standardwebhooks`` verifier and the configured secret."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_VIDEO, WorkerProcess, make_settings, unpublished_tokenizer, wait_for
from live_http import serve_gateway
from test_webhooks import FAST_WEBHOOKS, verified
from webhook_receiver import webhook_receiver

from service.cli.main import main
from service.cli.redis_server import RedisServer
from service.client import Client
from service.contract.connection import connect_redis, job_store
from service.contract.settings import Settings

pytestmark = pytest.mark.slow

FINISHED = {"succeeded", "failed", "canceled"}
# Still running when the cancel lands: 100 steps at 128x128x33 take seconds on the tiny model.
LONG_VIDEO = {"height": 128, "width": 128, "num_frames": 33, "steps": 100}
# How long the tests keep listening after the expected events, for a duplicate (many poll intervals).
QUIET_SECONDS = 1.5


@dataclass(frozen=True)
class Service:
    settings: Settings
    worker: WorkerProcess


@pytest.fixture(scope="module")
def service(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker for the module; each test starts the gateways it needs."""
    directory = tmp_path_factory.mktemp("webhooks")
    settings = make_settings(directory / "results", redis_url=redis_server.url, **FAST_WEBHOOKS)
    worker = WorkerProcess(settings, directory / "worker.log")
    try:
        with serve_gateway(settings) as url, httpx.Client(base_url=url, timeout=10) as http:
            worker.wait_ready(http)  # type: ignore[arg-type]  # it only calls .get("/readyz")
        yield Service(settings, worker)
    finally:
        worker.stop()


def finished(http: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(f"/jobs/{job_id}").json()
        return job if job["status"] in FINISHED else None

    return wait_for(done, timeout=180, interval=0.05, what=f"job {job_id} to finish")  # type: ignore[no-any-return]


def delivered(http: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(f"/jobs/{job_id}").json()
        return job if job["webhook"]["state"] == "delivered" else None

    return wait_for(done, timeout=60, what=f"the webhook of job {job_id}")  # type: ignore[no-any-return]


def test_each_terminal_job_gets_exactly_one_verified_event_with_two_gateways(service: Service) -> None:
    """Succeeded (the worker), failed (the worker: the prompt has too many tokens for the model, and these
    gateways count characters only) and canceled while running: one event each, though two gateways
    deliver from the same outbox."""
    with (
        unpublished_tokenizer(service.settings),
        webhook_receiver() as receiver,
        serve_gateway(service.settings) as first,
        serve_gateway(service.settings) as second,
        httpx.Client(base_url=first, timeout=10) as http,
    ):
        hook = {"webhook": receiver.url}
        succeeded = http.post("/generate", json={"prompt": "a red circle", "seed": 1, **TINY_VIDEO, **hook})
        failed = http.post("/joint", json={"prompt": " ".join(["red"] * 40), **TINY_VIDEO, **hook})
        canceled = http.post("/generate", json={"prompt": "long", "seed": 2, **LONG_VIDEO, **hook})
        ids = {
            "succeeded": succeeded.json()["id"],
            "failed": failed.json()["id"],
            "canceled": canceled.json()["id"],
        }
        wait_for(
            lambda: http.get(f"/jobs/{ids['canceled']}").json()["progress"] > 0,
            timeout=180,
            what="the long job",
        )
        http.post(f"/jobs/{ids['canceled']}/cancel")
        jobs = {status: finished(http, job_id) for status, job_id in ids.items()}
        shown = {status: delivered(http, job_id) for status, job_id in ids.items()}
        time.sleep(QUIET_SECONDS)
        events = verified(receiver)
        deliveries = receiver.received()
        with httpx.Client(base_url=second) as other:
            metrics = http.get("/metrics").text + other.get("/metrics").text

    assert {status: job["status"] for status, job in jobs.items()} == {s: s for s in ids}
    assert len(events) == 3, [event["type"] for event in events]
    by_job = {event["data"]["id"]: event for event in events}
    assert set(by_job) == set(ids.values()), "one event per job"
    for status, job_id in ids.items():
        event = by_job[job_id]
        assert event["type"] == f"job.{status}"
        assert event["data"] == {key: value for key, value in shown[status].items() if key != "webhook"}
        assert shown[status]["webhook"]["attempts"] == 1 and shown[status]["webhook"]["last_status"] == 204
    assert by_job[ids["failed"]]["data"]["error"]["code"] == "prompt_too_long"
    assert by_job[ids["succeeded"]]["data"]["result"]["video_url"] == f"/jobs/{ids['succeeded']}/video"
    assert sorted(delivery.headers["webhook-id"] for delivery in deliveries) == sorted(
        f"evt_{job_id}" for job_id in ids.values()
    )
    delivered_total = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('univigu_webhook_events_total{outcome="delivered"}')
    )
    assert delivered_total == 3, "the two gateways' counters sum to one delivery per event"


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_try(service: Service) -> None:
    with (
        webhook_receiver([500, 502]) as receiver,
        serve_gateway(service.settings) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        job_id = http.post(
            "/generate", json={"prompt": "a blue square", "seed": 3, **TINY_VIDEO, "webhook": receiver.url}
        ).json()["id"]
        assert finished(http, job_id)["status"] == "succeeded"
        job = delivered(http, job_id)
        time.sleep(QUIET_SECONDS)
        events = verified(receiver)
    assert [delivery.answered for delivery in receiver.received()] == [500, 502, 204]
    assert job["webhook"]["attempts"] == 3 and job["webhook"]["last_status"] == 204
    assert job["webhook"]["delivered_at"] is not None
    assert all(event == events[0] for event in events) and events[0]["type"] == "job.succeeded"


def test_an_event_survives_a_gateway_restart(service: Service) -> None:
    """The job ends while no gateway runs (it waits behind a long job that is canceled once the gateway
    has stopped); the next gateway to start delivers its event."""
    store = job_store(service.settings, connect_redis(service.settings))
    with webhook_receiver() as receiver:
        with serve_gateway(service.settings) as url, httpx.Client(base_url=url, timeout=10) as http:
            blocker = http.post("/generate", json={"prompt": "long", **LONG_VIDEO}).json()["id"]
            job_id = http.post(
                "/generate", json={"prompt": "a green triangle", **TINY_VIDEO, "webhook": receiver.url}
            ).json()["id"]
        store.cancel(blocker)
        wait_for(lambda: store.get(job_id).status.terminal, timeout=180, what="the job to end")
        time.sleep(QUIET_SECONDS)
        assert receiver.received() == [], "no gateway runs, so nothing delivers"
        assert store.webhook_backlog() == 1
        with serve_gateway(service.settings) as url, httpx.Client(base_url=url, timeout=10) as http:
            job = delivered(http, job_id)
        (event,) = verified(receiver)
    store.redis.close()
    assert (event["data"]["id"], event["type"]) == (job_id, "job.succeeded")
    assert job["webhook"]["attempts"] == 1


def test_a_private_address_is_refused_at_submit_by_default(service: Service) -> None:
    settings = service.settings.model_copy(update={"webhook_allow_private": False})
    with serve_gateway(settings) as url, httpx.Client(base_url=url, timeout=10) as http:
        before = http.get("/jobs", params={"limit": 100}).json()["jobs"]
        answer = http.post("/generate", json={"prompt": "a cat", "webhook": "http://127.0.0.1:8080/hook"})
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_parameter", "webhook")
        assert "127.0.0.1, a loopback, private or link-local address" in error["message"]
        assert http.get("/jobs", params={"limit": 100}).json()["jobs"] == before, "nothing was queued"


def test_the_python_client_and_univigu_submit_ask_for_webhooks(service: Service, tmp_path: Path) -> None:
    """``Client.caption(..., webhook=)`` (a multipart field) and ``univigu submit generate --webhook``."""
    video = tmp_path / "clip.mp4"
    with (
        webhook_receiver() as receiver,
        serve_gateway(service.settings) as url,
        Client(url) as client,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        made = client.wait(client.generate("a green ball", seed=4, **TINY_VIDEO).id, timeout=180)
        client.download(made.id, video)
        captioned = client.caption(video, steps=2, max_tokens=4, webhook=receiver.url)
        with redirect_stdout(io.StringIO()) as printed:
            assert (
                main(
                    [
                        "submit",
                        "--url",
                        url,
                        "generate",
                        "a red ball",
                        "--steps",
                        "2",
                        "--webhook",
                        receiver.url,
                    ]
                )
                == 0
            )
        generated = json.loads(printed.getvalue())
        for job_id in (captioned.id, generated["id"]):
            delivered(http, job_id)
        time.sleep(QUIET_SECONDS)
        events = verified(receiver)
    assert generated["webhook"]["url"] == receiver.url
    assert sorted((event["type"], event["data"]["id"]) for event in events) == sorted(
        [("job.succeeded", captioned.id), ("job.succeeded", generated["id"])]
    )
