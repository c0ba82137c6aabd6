"""Every Prometheus metric of the gateway and the workers: base units, the prefix univigu_, no per-job
labels. (The gateway's HTTP middleware that feeds the request metrics is ``service.gateway.http_metrics``.)

Each process owns a registry: the gateway exposes :class:`GatewayMetrics` at ``/metrics``; each worker
serves :class:`WorkerMetrics` on its own port. Jobs by terminal status are counted where the transition
happens (the worker for finished jobs, the gateway for canceled-while-queued and reaped jobs), so sum
``univigu_jobs_finished_total`` over instances.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.contract.connection import REDIS_UNREACHABLE
from service.contract.queue import JobQueue
from service.contract.store import JobStore

# Seconds: from sub-second tiny-preset steps to long GPU jobs.
_JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def jobs_finished(registry: CollectorRegistry) -> Counter:
    return Counter(
        "univigu_jobs_finished_total",
        "Jobs that reached a terminal status.",
        ["type", "status"],
        registry=registry,
    )


class GatewayMetrics:
    def __init__(self, store: JobStore, queue: JobQueue, *, worker_ttl_seconds: float) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "univigu_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "univigu_http_request_duration_seconds",
            "HTTP request handling time by route template and method.",
            ["route", "method"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.jobs_finished = jobs_finished(self.registry)
        self.webhook_attempts = Counter(
            "univigu_webhook_attempts_total",
            "Webhook delivery attempts by result: delivered (a 2xx answer), rejected (another status), "
            "unreachable (no answer in time, a network error) or refused (a forbidden address).",
            ["result"],
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "univigu_webhook_events_total",
            "Webhook events whose delivery ended: delivered, failed (retried for webhook_retry_seconds "
            "in vain) or dropped (the job was deleted first).",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(_QueueCollector(store, queue, worker_ttl_seconds))


class _QueueCollector(Collector):
    """Reads queue depth and worker counts from Redis at scrape time."""

    def __init__(self, store: JobStore, queue: JobQueue, worker_ttl_seconds: float) -> None:
        self.store = store
        self.queue = queue
        self.worker_ttl_seconds = worker_ttl_seconds

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        redis_up = GaugeMetricFamily("univigu_redis_up", "1 if the gateway reached Redis at this scrape.")
        try:
            depth = self.queue.depth()
            busy = self.store.running_count()
            live = self.store.live_workers(self.worker_ttl_seconds)
            webhooks = self.store.webhook_backlog()
        except REDIS_UNREACHABLE:
            redis_up.add_metric([], 0)
            yield redis_up
            return
        redis_up.add_metric([], 1)
        yield redis_up
        queue_depth = GaugeMetricFamily("univigu_queue_depth", "Jobs waiting in the queue.", labels=["queue"])
        queue_depth.add_metric([self.queue.name], depth)
        yield queue_depth
        yield GaugeMetricFamily("univigu_workers_busy", "Workers running a job (running jobs).", value=busy)
        yield GaugeMetricFamily("univigu_workers_live", "Workers with a fresh heartbeat.", value=live)
        yield GaugeMetricFamily(
            "univigu_webhook_backlog", "Webhook events awaiting delivery or a retry.", value=webhooks
        )


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_finished = jobs_finished(self.registry)
        self.queue_wait = Histogram(
            "univigu_job_queue_wait_seconds",
            "Time from submission to start, by job type.",
            ["type"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "univigu_job_run_seconds",
            "Time from start to a terminal status, by job type.",
            ["type"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.step_time = Histogram(
            "univigu_denoising_step_seconds",
            "Time of one denoising step, by job type.",
            ["type"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.caption_batch_size = Histogram(
            "univigu_caption_batch_size",
            "Caption jobs denoised together as one batch (1: alone).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.caption_steps = Counter(
            "univigu_caption_steps_total",
            "Denoising steps of succeeded caption jobs (one per job and step), by the transformer pass that "
            "ran them: full (video and text) or text_only (text over reused video keys and values).",
            ["kind"],
            registry=self.registry,
        )
        self.busy = Gauge("univigu_worker_busy", "1 while this worker runs a job.", registry=self.registry)
        self.model_load = Gauge(
            "univigu_model_load_seconds", "Time this worker took to load its model.", registry=self.registry
        )
        self.warmup = Gauge(
            "univigu_model_warmup_seconds",
            "Time this worker's warm-up jobs took after loading (compilation included).",
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "univigu_gpu_memory_allocated_bytes",
            "CUDA memory allocated by this worker (0 on CPU).",
            registry=self.registry,
        )
        self.gpu_memory_peak = Gauge(
            "univigu_gpu_memory_peak_bytes",
            "Peak CUDA memory allocated by this worker since start (0 on CPU).",
            registry=self.registry,
        )
