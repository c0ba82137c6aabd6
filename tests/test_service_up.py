"""`univigu up`: Redis, gateway and a tiny CPU worker from one command; Ctrl-C stops all of it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import REPO, TINY_VIDEO, wait_for
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.cli.redis_server import free_port

pytestmark = pytest.mark.slow


def test_up_serves_a_job_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("UNIVIGU_")}
    env.pop("REDIS_URL", None)
    env |= {"UNIVIGU_RESULTS_DIR": str(tmp_path / "results"), "UNIVIGU_WORKER_METRICS_PORT": "0"}
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: f"is up: {url}" in log_path.read_text(), timeout=120, what="the URL")
        redis_url = re.search(r"started redis-server \S+ on (\S+)", log_path.read_text())
        assert redis_url, log_path.read_text()
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=120, what="a ready worker")
            job_id = client.post("/generate", json={"prompt": "hello", **TINY_VIDEO}).json()["id"]
            done = wait_for(
                lambda: (
                    (job := client.get(f"/jobs/{job_id}").json())["status"] in {"succeeded", "failed"} and job
                ),
                timeout=120,
            )
            assert done["status"] == "succeeded", done

        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert up.wait(60) == 0, log_path.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
        with pytest.raises(RedisConnectionError):
            Redis.from_url(redis_url.group(1), socket_connect_timeout=1).ping()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
