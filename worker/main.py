"""`univigu worker`: load the pipeline once, then run queued jobs in this process with rq's SimpleWorker.

CUDA state does not survive rq's default fork-per-job, so jobs run in-process. Start one worker per GPU,
or one worker group per set of GPUs that share each job (:mod:`worker.group`); any number of workers on any
number of machines may share one Redis. A heartbeat thread marks this worker alive (for /readyz) and
keeps the running jobs' heartbeats fresh (several for a caption batch); if the process dies, the gateway's
reaper fails them as ``worker_lost`` (see ``Settings.worker_lost_bound_seconds``). A Redis outage does
not end the process: when rq's loop gives up on Redis, a fresh loop starts in it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import torch
from prometheus_client import start_http_server
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from service.contract.connection import REDIS_UNREACHABLE, connect_redis, job_queue, job_store
from service.contract.metrics import WorkerMetrics
from service.contract.result_files import ResultFiles
from service.contract.settings import Settings
from service.contract.store import JobStore
from worker import tasks
from worker.group import WorkerGroup
from worker.loading import ModelSpec, cap_limits, describe_model, load_pipeline, served_tokenizer, warm_up
from worker.runner import CaptionBatching, JobRunner

log = logging.getLogger(__name__)


class Heartbeat:
    """Marks the worker alive and refreshes its running job's heartbeat, from a thread."""

    def __init__(
        self, store: JobStore, runner: JobRunner, metrics: WorkerMetrics, *, interval: float, device: str
    ) -> None:
        self.store = store
        self.runner = runner
        self.metrics = metrics
        self.interval = interval
        self.device = torch.device(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="univigu-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        name = self.runner.worker_name
        self.store.worker_alive(name)
        for job_id in self.runner.current_jobs:
            self.store.heartbeat(job_id, name)
        if self.device.type == "cuda":
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated(self.device))
            self.metrics.gpu_memory_peak.set(torch.cuda.max_memory_allocated(self.device))

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except REDIS_UNREACHABLE as exc:
                log.warning("heartbeat not sent, Redis unreachable: %s", exc)
            if self._stop.wait(self.interval):
                return


class ServingWorker(SimpleWorker):
    """rq's in-process worker that records a warm-shutdown request (SIGTERM/SIGINT) in ``stop``.

    rq retries an unreachable Redis only while it waits for a job. A Redis error anywhere else in its
    loop (checking for suspension, registering a dequeued job, recording a finished one) ends
    ``work()`` as if the worker were done; ``stop`` tells that apart from a requested stop.
    """

    def __init__(self, *args: Any, stop: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    def handle_warm_shutdown_request(self) -> None:
        self.stop.set()
        super().handle_warm_shutdown_request()


def work_until_stopped(settings: Settings, *, name: str, burst: bool) -> None:
    """Run rq's work loop until SIGTERM/SIGINT (after the current job) or, with ``burst``, until the
    queue is empty. A loop that rq ends on a Redis error is replaced by a fresh one, so a Redis
    outage never takes a worker (and its loaded model) down."""
    connection = connect_redis(settings, blocking=True)
    queue = job_queue(settings, connection).rq
    stop = threading.Event()
    for restart in itertools.count():
        # A loop that ended during an outage could not record its end, and rq refuses a second live
        # worker of the same name: each fresh loop gets its own.
        rq_name = name if restart == 0 else f"{name}.{restart}"
        rq_worker = ServingWorker(
            [queue], connection=connection, serializer=JSONSerializer, name=rq_name, stop=stop
        )
        try:
            rq_worker.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))
        except REDIS_UNREACHABLE as exc:  # rq's start or teardown could not reach Redis
            log.warning("rq worker %s could not reach Redis: %s", rq_name, exc)
            if rq_worker.pubsub_thread is not None:  # teardown stopped before ending rq's listener
                rq_worker.pubsub_thread.stop()
        if burst or stop.is_set():
            return
        log.warning(
            "rq's work loop ended without a stop request; a fresh one starts in %.1f s",
            settings.heartbeat_interval_seconds,
        )
        for signum in (signal.SIGTERM, signal.SIGINT):  # rq's handlers belong to the ended loop
            signal.signal(signum, lambda *_: stop.set())
        if stop.wait(settings.heartbeat_interval_seconds):
            return


class MetricsPortUnavailable(RuntimeError):
    """The worker's metrics port cannot be bound (taken, or not allowed); checked before the model loads."""


def serve_metrics(metrics: WorkerMetrics, port: int) -> None:
    try:
        start_http_server(port, registry=metrics.registry)
    except OSError as exc:
        raise MetricsPortUnavailable(
            f"the worker's metrics port {port} is unavailable ({exc.strerror}): set "
            "UNIVIGU_WORKER_METRICS_PORT or `univigu worker --metrics-port` to a free port, or 0 to turn "
            "the worker's metrics off"
        ) from exc
    log.info("worker metrics on :%d/metrics", port)


def default_worker_name(device: str) -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{device.replace(':', '')}"


def serve(
    settings: Settings,
    spec: ModelSpec,
    *,
    name: str | None = None,
    burst: bool = False,
    group: WorkerGroup | None = None,
) -> None:
    """Load the model, then work until SIGTERM/SIGINT (after the current job) or, with ``burst``, until
    the queue is empty. With ``group`` this is its leader, and every job runs on the whole group."""
    name = name or default_worker_name(spec.device)
    # A file-size limit (`ulimit -f`, a full quota) then fails writes with EFBIG, so the job fails with
    # storage_error and the worker keeps serving, instead of SIGXFSZ killing the worker (and ffmpeg).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        serve_metrics(metrics, settings.worker_metrics_port)
    log.info("loading %s", spec.describe())
    started = time.monotonic()
    pipeline = load_pipeline(spec)
    cap_limits(pipeline, settings)
    served = pipeline if group is None else group.lead(pipeline, settings.attention_backend)
    metrics.model_load.set(time.monotonic() - started)
    log.info(
        "model loaded in %.1f s; attention backend %s",
        time.monotonic() - started,
        pipeline.transformer.attention_backend,
    )
    if settings.warmup_steps:
        seconds = warm_up(served, settings.warmup_steps)
        metrics.warmup.set(sum(seconds.values()))
        log.info(
            "warm-up (%d steps per mode) took %s",
            settings.warmup_steps,
            ", ".join(f"{mode} {value:.1f} s" for mode, value in seconds.items()),
        )

    files = ResultFiles(settings.results_dir)
    files.ensure_dirs()
    redis = connect_redis(settings)
    store = job_store(settings, redis)
    tokenizer = served_tokenizer(pipeline)
    store.publish_model(describe_model(pipeline, group, tokenizer), tokenizer)
    runner = JobRunner(
        served,
        store=store,
        files=files,
        metrics=metrics,
        worker_name=name,
        finish_retry_seconds=settings.finish_retry_seconds,
        # A group replays each pipeline call on every rank; a batch of captions is not one call.
        batching=CaptionBatching(pipeline, job_queue(settings, redis), settings.caption_batch_size)
        if group is None
        else None,
    )
    tasks.install(runner)
    if group is not None:
        group.fail_running_job = runner.fail_running
    heartbeat = Heartbeat(
        store, runner, metrics, interval=settings.heartbeat_interval_seconds, device=spec.device
    )
    heartbeat.start()
    try:
        work_until_stopped(settings, name=name, burst=burst)
    finally:
        heartbeat.stop()
        try:
            store.worker_gone(name)
        except REDIS_UNREACHABLE as exc:
            log.warning("could not deregister worker %s: %s", name, exc)


def serve_in_group(
    settings: Settings, spec: ModelSpec, *, name: str | None = None, burst: bool = False
) -> None:
    """One rank of the worker group torchrun started: the leader serves (:func:`serve`), followers replay
    its calls until it ends the group."""
    group = WorkerGroup.join(settings)
    spec = dataclasses.replace(spec, device=group.rank.device)
    if group.is_leader:
        serve(settings, spec, name=name, burst=burst, group=group)
        group.stop()
        return
    # A follower stops when its leader ends the group, after the leader's last job.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    group.follow(load_pipeline(spec), settings.attention_backend)
