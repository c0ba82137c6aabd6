"""Webhooks without a worker: the secret, the address guard at submit and at delivery, the outbox in the
job store, and the gateway's dispatcher delivering the events of jobs a gateway ends (a cancel, the
reaper), retrying, timing out, refusing redirects and giving up. Events are checked with the
``standardwebhooks`` verifier and the configured secret. tests/test_webhooks_live.py runs a worker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import assert_envelope, queued, wait_for
from fastapi.testclient import TestClient
from pydantic import ValidationError
from standardwebhooks import Webhook
from webhook_receiver import HANG, Receiver, webhook_receiver

from model.media import write_mp4
from service.contract.schemas import ErrorInfo, JobStatus, ServedModel, WebhookDelivery
from service.contract.settings import Settings
from service.contract.store import JobStore
from service.gateway.app import create_app
from service.gateway.webhooks.addresses import WebhookRefused, resolve

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Fast deliveries for the tests; the receivers listen on the loopback, which only this setting allows.
FAST_WEBHOOKS: dict[str, Any] = {
    "webhook_secret": SECRET,
    "webhook_allow_private": True,
    "webhook_poll_seconds": 0.05,
    "webhook_backoff_seconds": 0.1,
    "webhook_timeout_seconds": 1.0,
}


def verified(receiver: Receiver) -> list[dict[str, Any]]:
    """Every event the receiver got, each verified with the secret (raises if one does not verify)."""
    return [Webhook(SECRET).verify(delivery.body, delivery.headers) for delivery in receiver.received()]


def app_with(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def canceled_with_webhook(client: TestClient, url: str) -> str:
    """A job with a webhook, canceled by the gateway while queued (no worker runs here); its id."""
    job_id: str = client.post("/generate", json={"prompt": "a cat", "webhook": url}).json()["id"]
    client.post(f"/jobs/{job_id}/cancel")
    return job_id


def webhook_when(client: TestClient, job_id: str, state: str) -> dict[str, Any]:
    """The job's webhook state, once it is ``state``."""

    def reached() -> dict[str, Any] | None:
        webhook: dict[str, Any] = client.get(f"/jobs/{job_id}").json()["webhook"]
        return webhook if webhook["state"] == state else None

    return wait_for(reached, timeout=20, what=f"the webhook of job {job_id} to be {state}")  # type: ignore[no-any-return]


# --- the secret and the address guard -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2hvcnQ=", "whsec_not base64 at all!", "whsec_"]
)
def test_a_secret_must_be_whsec_and_24_to_64_bytes(secret: str) -> None:
    with pytest.raises(ValidationError, match="whsec_ followed by 24 to 64 random bytes"):
        Settings(webhook_secret=secret)


def test_the_secret_stays_out_of_logs_and_the_retry_window_inside_the_record_lifetime() -> None:
    settings = Settings(webhook_secret=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    with pytest.raises(ValidationError, match="webhook_retry_seconds must be shorter than result_ttl"):
        Settings(webhook_secret=SECRET, webhook_retry_seconds=600, result_ttl_seconds=600)
    assert Settings(result_ttl_seconds=60).webhook_retry_seconds == 3600, "no constraint with webhooks off"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "10.1.2.3",
        "172.16.5.4",
        "192.168.0.10",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space
        "0.0.0.0",
        "224.0.0.1",
        "[::1]",
        "[fe80::1]",
        "[fd00::1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped loopback
    ],
)
def test_internal_addresses_are_refused_unless_allowed(host: str) -> None:
    url = httpx.URL(f"http://{host}:8080/hook")
    with pytest.raises(WebhookRefused, match="loopback, private or link-local"):
        resolve(url, allow_private=False)
    assert resolve(url, allow_private=True)


@pytest.mark.parametrize("host", ["93.184.215.14", "8.8.8.8", "[2606:4700:4700::1111]"])
def test_public_addresses_are_allowed(host: str) -> None:
    assert resolve(httpx.URL(f"https://{host}/hook"), allow_private=False)


# --- submit -------------------------------------------------------------------------------------------------


@pytest.fixture
def guarded(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    """A gateway that signs webhooks and refuses internal addresses (the default), with a served model."""
    with app_with(settings_factory(webhook_secret=SECRET)) as client:
        client.app.state.services.store.publish_model(  # type: ignore[attr-defined]
            ServedModel(preset="tiny", max_caption_tokens=48, defaults={"fps": 8})
        )
        yield client


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    frames = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    return write_mp4(frames, tmp_path_factory.mktemp("clip") / "clip.mp4", fps=8).read_bytes()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "https://localhost/hook", "http://10.0.0.7/h"])
def test_a_private_webhook_is_refused_at_submit_on_every_route(
    guarded: TestClient, clip: bytes, url: str
) -> None:
    answers = {
        "/generate": guarded.post("/generate", json={"prompt": "a cat", "webhook": url}),
        "/joint": guarded.post("/joint", json={"prompt": "a cat", "webhook": url}),
        "/caption": guarded.post("/caption", files={"file": ("c.mp4", clip)}, data={"webhook": url}),
    }
    for route, answer in answers.items():
        error = assert_envelope(answer, 422, "invalid_parameter", "webhook")
        assert "loopback, private or link-local" in error["message"], route
        assert "UNIVIGU_WEBHOOK_ALLOW_PRIVATE" in error["message"], route
    v1 = guarded.post("/v1/videos", json={"prompt": "a cat", "webhook": url})  # OpenAI's 400 for a 422
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "webhook", v1.text
    assert guarded.get("/jobs").json()["jobs"] == [], "a refused submit queues nothing"
    uploads = guarded.app.state.services.settings.results_dir / "uploads"  # type: ignore[attr-defined]
    assert not list(uploads.iterdir()), "a refused caption keeps no upload"


def test_webhooks_are_refused_without_a_secret_and_must_be_http_urls(
    client: TestClient, guarded: TestClient
) -> None:
    error = assert_envelope(
        client.post("/generate", json={"prompt": "a cat", "webhook": "https://example.com/hook"}),
        422,
        "unsupported_parameter",
        "webhook",
    )
    assert "UNIVIGU_WEBHOOK_SECRET" in error["message"]
    for url in ("ftp://example.com/hook", "example.com/hook", "http://"):
        assert_envelope(
            guarded.post("/generate", json={"prompt": "a cat", "webhook": url}), 422, "invalid_parameter"
        )


def test_a_name_that_does_not_resolve_is_refused(guarded: TestClient) -> None:
    answer = guarded.post("/generate", json={"prompt": "a cat", "webhook": "https://no-such-host.invalid/h"})
    assert "does not resolve" in assert_envelope(answer, 422, "invalid_parameter", "webhook")["message"]


# --- the outbox ---------------------------------------------------------------------------------------------


def test_each_terminal_transition_puts_a_webhook_job_in_the_outbox_once(store: JobStore) -> None:
    url = "https://example.com/hook"
    finished, canceled, failed, silent = (
        queued(store, "finished", webhook=url),
        queued(store, "canceled", webhook=url),
        queued(store, "failed", webhook=url),
        queued(store, "silent"),
    )
    store.start(finished, "w")
    store.finish(finished, JobStatus.succeeded)
    store.cancel(canceled)  # queued: canceled at once, by the gateway
    store.finish(failed, JobStatus.failed, error=ErrorInfo(code="worker_lost", message="x"), from_queued=True)
    store.start(silent, "w")
    store.finish(silent, JobStatus.succeeded)
    assert store.cancel(canceled)[0] == JobStatus.canceled  # a second cancel adds nothing
    assert not store.finish(finished, JobStatus.failed)
    assert sorted(store.claim_webhooks(10, lease_seconds=0.3)) == sorted([finished, canceled, failed])
    assert store.claim_webhooks(10, lease_seconds=0.3) == [], "claimed events are leased"
    assert sorted(
        wait_for(lambda: store.claim_webhooks(10, 30), timeout=5, what="the lease to end")
    ) == sorted([finished, canceled, failed])
    assert store.get(finished).webhook == WebhookDelivery(url=url), "pending, no attempt yet"


def test_attempts_are_recorded_on_the_job_and_end_the_delivery_when_done(store: JobStore) -> None:
    job_id = queued(store, webhook="https://example.com/hook")
    store.cancel(job_id)
    store.claim_webhooks(1, lease_seconds=30)
    store.webhook_attempted(job_id, status=None, error="refused", delivered=False, retry_at=0.0)
    webhook = store.get(job_id).webhook
    assert webhook and (webhook.state, webhook.attempts, webhook.last_error) == ("pending", 1, "refused")
    assert store.claim_webhooks(1, lease_seconds=30) == [job_id], "due again at retry_at"
    store.webhook_attempted(job_id, status=200, error=None, delivered=True, retry_at=None)
    webhook = store.get(job_id).webhook
    assert webhook and (webhook.state, webhook.attempts, webhook.last_status) == ("delivered", 2, 200)
    assert webhook.last_error is None and webhook.delivered_at is not None
    assert store.webhook_backlog() == 0

    gone = queued(store, "gone", webhook="https://example.com/hook")
    store.cancel(gone)
    store.delete(gone)
    store.webhook_attempted(gone, status=500, error=None, delivered=False, retry_at=0.0)
    assert store.find(gone) is None, "an attempt on a deleted job writes no stub record"
    assert store.webhook_backlog() == 0


# --- delivery by the gateway --------------------------------------------------------------------------------


def test_a_job_canceled_by_the_gateway_gets_one_verified_event(
    settings_factory: Callable[..., Settings],
) -> None:
    with webhook_receiver() as receiver, app_with(settings_factory(**FAST_WEBHOOKS)) as client:
        # By name: the connection goes to the address checked, the Host header stays the URL's.
        url = receiver.url.replace("127.0.0.1", "localhost")
        job = client.post("/generate", json={"prompt": "a cat", "seed": 3, "webhook": url}).json()
        assert job["webhook"] == WebhookDelivery(url=url).model_dump(mode="json")
        client.post(f"/jobs/{job['id']}/cancel")
        webhook = webhook_when(client, job["id"], "delivered")
        shown = client.get(f"/jobs/{job['id']}").json()
        (event,) = verified(receiver)
        assert (webhook["attempts"], webhook["last_status"]) == (1, 204)
        assert event["type"] == "job.canceled"
        assert event["data"] == {key: value for key, value in shown.items() if key != "webhook"}
        (delivery,) = receiver.received()
        assert delivery.headers["webhook-id"] == f"evt_{job['id']}"
        assert delivery.headers["content-type"] == "application/json"
        assert delivery.headers["host"] == httpx.URL(url).netloc.decode(), "the URL's host, not the address"
        metrics = client.get("/metrics").text
        assert 'univigu_webhook_attempts_total{result="delivered"} 1.0' in metrics
        assert 'univigu_webhook_events_total{outcome="delivered"} 1.0' in metrics
        assert "univigu_webhook_backlog 0.0" in metrics


def test_a_reaped_job_gets_a_failed_event(settings_factory: Callable[..., Settings]) -> None:
    with webhook_receiver() as receiver, app_with(settings_factory(**FAST_WEBHOOKS)) as client:
        job_id = client.post("/generate", json={"prompt": "a cat", "webhook": receiver.url}).json()["id"]
        client.app.state.services.store.start(job_id, "a-worker-that-dies")  # type: ignore[attr-defined]
        (event,) = wait_for(lambda: verified(receiver), timeout=15, what="the reaper's event")
    assert (event["type"], event["data"]["error"]["code"]) == ("job.failed", "worker_lost")


def test_failed_attempts_are_retried_and_time_out_and_redirects_are_not_followed(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(**{**FAST_WEBHOOKS, "webhook_timeout_seconds": 0.5})
    with webhook_receiver([500, HANG, 307]) as receiver, app_with(settings) as client:
        webhook = webhook_when(client, canceled_with_webhook(client, receiver.url), "delivered")
        metrics = client.get("/metrics").text
    assert [delivery.answered for delivery in receiver.received()] == [500, HANG, 307, 204]
    assert {delivery.path for delivery in receiver.received()} == {"/hooks/univigu"}, (
        "a redirect was followed"
    )
    assert (webhook["attempts"], webhook["last_status"]) == (4, 204)
    assert len({json.dumps(event, sort_keys=True) for event in verified(receiver)}) == 1, "one event, resent"
    assert len({delivery.headers["webhook-id"] for delivery in receiver.received()}) == 1
    for result, count in (("rejected", 2), ("unreachable", 1), ("delivered", 1)):
        assert f'univigu_webhook_attempts_total{{result="{result}"}} {count}.0' in metrics


def test_a_receiver_that_never_accepts_is_given_up_after_the_retry_window(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(**{**FAST_WEBHOOKS, "webhook_retry_seconds": 1.0})
    with webhook_receiver([503] * 100) as receiver, app_with(settings) as client:
        webhook = webhook_when(client, canceled_with_webhook(client, receiver.url), "failed")
        metrics = client.get("/metrics").text
    assert webhook["attempts"] == len(receiver.received()) >= 3 and webhook["last_status"] == 503
    assert webhook["delivered_at"] is None
    assert 'univigu_webhook_events_total{outcome="failed"} 1.0' in metrics
    assert "univigu_webhook_backlog 0.0" in metrics


def test_an_address_refused_at_delivery_is_never_called(settings_factory: Callable[..., Settings]) -> None:
    """The check runs again at delivery: here a URL stored while private addresses were allowed."""
    settings = settings_factory(
        **{**FAST_WEBHOOKS, "webhook_allow_private": False, "webhook_retry_seconds": 0.5}
    )
    with webhook_receiver() as receiver, app_with(settings) as client:
        store: JobStore = client.app.state.services.store  # type: ignore[attr-defined]
        job_id = queued(store, "c" * 32, webhook=receiver.url)
        store.cancel(job_id)
        webhook = webhook_when(client, job_id, "failed")
        assert 'univigu_webhook_attempts_total{result="refused"}' in client.get("/metrics").text
    assert receiver.received() == []
    assert "127.0.0.1" in webhook["last_error"] and webhook["last_status"] is None


def test_a_deleted_job_sends_no_event(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(**{**FAST_WEBHOOKS, "webhook_poll_seconds": 0.5})
    with webhook_receiver() as receiver, app_with(settings) as client:
        job_id = client.post("/generate", json={"prompt": "a cat", "webhook": receiver.url}).json()["id"]
        assert client.delete(f"/v1/videos/video_{job_id}").status_code == 200
        wait_for(
            lambda: 'univigu_webhook_events_total{outcome="dropped"} 1.0' in client.get("/metrics").text,
            timeout=10,
            what="the event to be dropped",
        )
    assert receiver.received() == []
