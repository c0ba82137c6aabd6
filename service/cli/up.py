"""`univigu up`: everything on one machine for a newcomer, kept running, stopped cleanly with Ctrl-C.

1. Takes its data folder (:mod:`service.cli.data_folder`; a second `up` on the same folder refuses) and
   checks the gateway's and the worker's ports, so a taken one is one line naming its flag.
2. Starts a redis-server persisting into the data folder (unless REDIS_URL or UNIVIGU_REDIS_URL is set),
   the gateway, and one worker with the given model (``--weights DIR`` or ``--preset NAME``), each its
   own process, results in the data folder.
3. Supervises them (:mod:`service.cli.supervisor`): one that exits is restarted with bounded backoff; a
   crash loop ends `up` with its cause. Until ``/readyz`` answers it says what it waits for, then
   announces the URL.
4. Ctrl-C (or SIGTERM) stops the worker (after its current job), the gateway and Redis, in that order.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.error import URLError

from service.cli.data_folder import DataFolder, DataFolderError, default_data_dir
from service.cli.parent_death import terminate_with_parent
from service.cli.ports import PortUnavailable, check_port
from service.cli.redis_server import RedisServer, RedisServerNotFound, free_port
from service.cli.supervisor import Child, CrashLoop, ProcessChild, RedisChild, Supervisor
from service.contract.connection import REDIS_UNREACHABLE, connect_redis, job_store
from service.contract.settings import Settings
from service.contract.store import JobStore
from worker.cli import EXIT_CONFIGURATION

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
WAITING_NOTE_SECONDS = 10.0
METRICS_HOST = "0.0.0.0"  # where prometheus_client's server binds


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (URLError, OSError):
        return False


def _worker_metrics_port(settings: Settings) -> int:
    """The worker's metrics port: as set (checked), or the default if free, else a free one, said so."""
    port = settings.worker_metrics_port
    if port == 0:
        return 0
    try:
        check_port(
            METRICS_HOST,
            port,
            what="the worker's metrics",
            setting="UNIVIGU_WORKER_METRICS_PORT; 0 turns it off",
            flag="--metrics-port",
        )
    except PortUnavailable:
        if "worker_metrics_port" in settings.model_fields_set:
            raise
        chosen = free_port()
        log.warning("the worker's default metrics port %d is taken; it uses %d instead", port, chosen)
        return chosen
    return port


def _worker_ready(store: JobStore, name: str) -> bool:
    try:
        return store.worker_seen(name)
    except REDIS_UNREACHABLE:
        return False


@dataclass
class Announcer:
    """Says what `up` waits for until ``/readyz`` answers, then announces the URL once."""

    url: str
    data_dir: Path
    started: float = field(default_factory=time.monotonic)
    next_note: float = 0.0
    done: bool = False

    def step(self, waiting: list[Child]) -> None:
        if self.done:
            return
        if not waiting and _answers(f"{self.url}/readyz"):
            self.done = True
            print(
                f"Uni-ViGU Serve is up: {self.url}  (API docs: {self.url}/docs; data in {self.data_dir}; "
                "Ctrl-C stops everything)",
                flush=True,
            )
            return
        now = time.monotonic()
        if now >= self.next_note:
            self.next_note = now + WAITING_NOTE_SECONDS
            what = "; ".join(child.waiting_for for child in waiting) or "the gateway's /readyz"
            log.info("waiting for %s (%.0f s so far)", what, now - self.started)


def run_up(settings: Settings, *, model: list[str], device: str) -> int:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    folder = DataFolder(settings.data_dir or default_data_dir())
    try:
        with folder.locked():
            check_port(
                settings.host, settings.port, what="the gateway", setting="UNIVIGU_PORT", flag="--port"
            )
            metrics_port = _worker_metrics_port(settings)
            redis = (
                None
                if "redis_url" in settings.model_fields_set
                else RedisServer(
                    folder.redis_dir, inherit_fds=(folder.lock_fd,), preexec_fn=terminate_with_parent()
                )
            )
            return _supervise(
                settings, folder, redis, model=model, device=device, metrics_port=metrics_port, stop=stop
            )
    except (DataFolderError, PortUnavailable, RedisServerNotFound) as exc:
        log.error("%s", exc)
        return EXIT_CONFIGURATION


def _supervise(
    settings: Settings,
    folder: DataFolder,
    redis: RedisServer | None,
    *,
    model: list[str],
    device: str,
    metrics_port: int,
    stop: threading.Event,
) -> int:
    redis_url = settings.redis_url if redis is None else redis.url
    results_dir = settings.results_dir if "results_dir" in settings.model_fields_set else folder.results_dir
    log.info("data folder %s (results in %s)", folder.root, results_dir)
    if redis is not None:
        log.info(
            "redis-server %s keeps its data in %s and listens on %s",
            redis.executable,
            redis.directory,
            redis_url,
        )
    env = dict(os.environ) | {
        "UNIVIGU_REDIS_URL": redis_url,
        "UNIVIGU_HOST": settings.host,
        "UNIVIGU_PORT": str(settings.port),
        "UNIVIGU_RESULTS_DIR": str(results_dir),
        "UNIVIGU_WORKER_METRICS_PORT": str(metrics_port),
    }
    url = f"http://{settings.host}:{settings.port}"
    store = job_store(settings, connect_redis(settings.model_copy(update={"redis_url": redis_url})))

    def worker_name(start: int) -> str:
        return f"{socket.gethostname()}.up{os.getpid()}.{start}"  # rq wants a new name for each start

    children: list[Child] = [] if redis is None else [RedisChild(redis)]
    children.append(
        ProcessChild(
            "gateway",
            lambda start: _cli("gateway"),
            ready=lambda start: _answers(f"{url}/healthz"),
            waiting_for=f"the gateway to answer on {url}",
            env=env,
            inherit_fds=(folder.lock_fd,),
        )
    )
    children.append(
        ProcessChild(
            "worker",
            lambda start: _cli("worker", "--device", device, "--name", worker_name(start), *model),
            ready=lambda start: _worker_ready(store, worker_name(start)),
            waiting_for=f"the worker to load its model ({' '.join(model)}) and warm up",
            env=env,
            inherit_fds=(folder.lock_fd,),
        )
    )
    supervisor = Supervisor(children)
    announcer = Announcer(url, folder.root)
    try:
        supervisor.start_all()
        while not stop.wait(POLL_SECONDS):
            supervisor.poll()
            announcer.step(supervisor.not_ready())
        log.info("stopping")
        return 0
    except CrashLoop as exc:
        log.error("stopping: %s", exc)
        return 1
    finally:
        supervisor.stop_all()
        store.redis.close()
