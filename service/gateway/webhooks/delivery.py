"""Delivering webhook events: every gateway's background loop that POSTs signed job events.

Which process delivers, and why it is safe: a job ends in a worker, in a gateway's cancel or in the
reaper, and in each case the job store's script that ends it also puts the job in the Redis outbox
(see :mod:`service.contract.store`), in the same atomic step. Every gateway runs a
:class:`WebhookDispatcher` that claims due events from that outbox with a lease. Hence:

- at least once: an event leaves the outbox only after a 2xx answer, or once its retry window
  (``webhook_retry_seconds`` from the job's end) is over; a gateway that stops or dies mid-attempt leaves
  the event to the next claim when its lease runs out, so a restart loses nothing;
- one delivery per event across several gateways, short of such a crash: a claim is atomic;
- no worker and no request handler waits for a receiver: workers only add the outbox entry, and every
  attempt runs in this loop, in its own thread.

An attempt resolves the URL's host and refuses forbidden addresses (:mod:`.addresses`), then POSTs to
the address it checked (the Host header and the TLS server name stay the URL's), follows no redirect,
uses no proxy from the environment, never reads the answer's body, and must end within
``webhook_timeout_seconds``. A failed attempt is retried after ``webhook_backoff_seconds``, a wait that
doubles each time up to :data:`MAX_BACKOFF_SECONDS`. Events are signed with ``standardwebhooks`` (the
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Literal

import httpx
from standardwebhooks import Webhook

from service.contract.connection import REDIS_UNREACHABLE
from service.contract.metrics import GatewayMetrics
from service.contract.schemas import Job, JobRecord, JobStatus, WebhookEvent, WebhookEventType
from service.contract.settings import Settings
from service.contract.store import JobStore
from service.gateway.webhooks.addresses import WebhookRefused, resolve_async

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
CONCURRENT_DELIVERIES = 16
# A claim outlives any attempt, so that a live gateway never sees its event claimed again meanwhile.
LEASE_MARGIN_SECONDS = 30.0
USER_AGENT = "univigu-webhooks"

EVENT_TYPES: dict[JobStatus, WebhookEventType] = {
    JobStatus.succeeded: "job.succeeded",
    JobStatus.failed: "job.failed",
    JobStatus.canceled: "job.canceled",
}
Result = Literal["delivered", "rejected", "unreachable", "refused"]


def event_body(record: JobRecord) -> bytes:
    """The event of a finished job, as sent: the job as GET /jobs/{id} shows it, without ``webhook``."""
    event = WebhookEvent(
        type=EVENT_TYPES[record.status],
        timestamp=record.finished_at or datetime.now(UTC),
        data=Job.from_record(record),
    )
    return event.model_dump_json(exclude={"data": {"webhook"}}).encode()


def message_id(job_id: str) -> str:
    """The ``webhook-id`` of a job's event: the same on every retry, so receivers can drop repeats."""
    return f"evt_{job_id}"


class WebhookDispatcher:
    def __init__(self, settings: Settings, store: JobStore, metrics: GatewayMetrics) -> None:
        if settings.webhook_secret is None:
            raise ValueError("webhook deliveries need settings.webhook_secret")
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._signer = Webhook(settings.webhook_secret.get_secret_value())
        self._lease_seconds = settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="univigu-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming and abandon the attempts in flight: their events are claimed again later."""
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._loop.close()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_default_executor())

    async def _serve(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        client = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
        )
        async with client:
            while not self._stopping.is_set():
                for job_id in await self._claim(CONCURRENT_DELIVERIES - len(in_flight)):
                    task = asyncio.create_task(self._deliver(client, job_id), name=f"webhook {job_id}")
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    task.add_done_callback(_log_crash)
                with contextlib.suppress(TimeoutError):  # the poll interval passed without a stop
                    await asyncio.wait_for(self._stopping.wait(), self.settings.webhook_poll_seconds)
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _claim(self, free: int) -> list[str]:
        if free <= 0:
            return []
        try:
            return await asyncio.to_thread(self.store.claim_webhooks, free, self._lease_seconds)
        except REDIS_UNREACHABLE as exc:
            log.warning("webhook deliveries paused, Redis unreachable: %s", exc)
            return []

    async def _deliver(self, client: httpx.AsyncClient, job_id: str) -> None:
        try:
            record = await asyncio.to_thread(self.store.find, job_id)
            if record is None or record.webhook is None:
                await asyncio.to_thread(self.store.drop_webhook, job_id)
                self.metrics.webhook_events.labels("dropped").inc()
                return
            attempts = record.webhook.attempts + 1
            result, status, error = await self._attempt(
                client, record.webhook.url, job_id, event_body(record)
            )
            self.metrics.webhook_attempts.labels(result).inc()
            delivered = result == "delivered"
            retry_at = None if delivered else self._retry_at(record, attempts)
            await asyncio.to_thread(
                self.store.webhook_attempted,
                job_id,
                status=status,
                error=error,
                delivered=delivered,
                retry_at=retry_at,
            )
        except REDIS_UNREACHABLE as exc:  # the event stays claimed and is tried again after the lease
            log.warning("webhook of job %s not recorded, Redis unreachable: %s", job_id, exc)
            return
        if delivered:
            self.metrics.webhook_events.labels("delivered").inc()
        elif retry_at is None:
            self.metrics.webhook_events.labels("failed").inc()
            log.warning("webhook of job %s given up after %d attempts: %s", job_id, attempts, error or status)

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, job_id: str, body: bytes
    ) -> tuple[Result, int | None, str | None]:
        """One POST: (result, HTTP status, why no answer came)."""
        target = httpx.URL(url)
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                addresses = await resolve_async(target, allow_private=self.settings.webhook_allow_private)
                sent_at = datetime.now(UTC)
                headers = {
                    "user-agent": USER_AGENT,
                    "content-type": "application/json",
                    "webhook-id": message_id(job_id),
                    "webhook-timestamp": str(int(sent_at.timestamp())),
                    "webhook-signature": self._signer.sign(message_id(job_id), sent_at, body),
                }
                response = await self._post(client, target, addresses, headers, body)
                await response.aclose()
        except WebhookRefused as exc:
            return "refused", None, str(exc)
        except TimeoutError:
            return "unreachable", None, f"no answer within {self.settings.webhook_timeout_seconds} s"
        except httpx.HTTPError as exc:
            return "unreachable", None, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return "delivered", response.status_code, None
        return "rejected", response.status_code, None

    @staticmethod
    async def _post(
        client: httpx.AsyncClient,
        target: httpx.URL,
        addresses: list[str],
        headers: dict[str, str],
        body: bytes,
    ) -> httpx.Response:
        """POST to the first of ``addresses`` that accepts a connection (the answer's body unread)."""
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):
                return await client.send(_request(client, target, address, headers, body), stream=True)
        return await client.send(_request(client, target, addresses[-1], headers, body), stream=True)

    def _retry_at(self, record: JobRecord, attempts: int) -> float | None:
        """When to try again after ``attempts`` failed attempts; None once past the retry window."""
        wait = min(self.settings.webhook_backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
        retry_at = time.time() + wait
        ended = record.finished_at.timestamp() if record.finished_at else time.time()
        return retry_at if retry_at <= ended + self.settings.webhook_retry_seconds else None


def _request(
    client: httpx.AsyncClient, target: httpx.URL, address: str, headers: dict[str, str], body: bytes
) -> httpx.Request:
    """A POST of ``target`` sent to ``address``, with the URL's own Host header and TLS server name."""
    return client.build_request(
        "POST",
        target.copy_with(host=address),
        content=body,
        headers={"host": target.netloc.decode("ascii"), **headers},
        extensions={"sni_hostname": target.host} if target.scheme == "https" else None,
    )


def _log_crash(task: asyncio.Task[None]) -> None:
    """A delivery that raised is a bug: logged; its event is claimed again when the lease ends."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s crashed", task.get_name(), exc_info=task.exception())
