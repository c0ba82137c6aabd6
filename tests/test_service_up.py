"""`univigu up` with real processes: it serves, keeps its children running (a SIGKILLed worker or Redis
comes back by itself), keeps its state in its data folder across a stop and a start, refuses a second
`up` on the same folder, cleans only its own expired files, and names a taken port in one line.

Each run uses the tiny preset, no warm-up and short liveness settings (jobs of a dead worker are failed
within 1.5 + 0.5 + 1 = 3 s). The figures the tests print are the ones RELIABILITY.md reports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import FAST_LIVENESS, REPO, TINY_VIDEO, WORKER_START_TIMEOUT, wait_for
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.cli.redis_server import free_port
from service.cli.supervisor import RestartPolicy
from service.contract.result_files import ResultFiles
from service.contract.settings import Settings

pytestmark = pytest.mark.slow

LONG_JOB = {"prompt": "a long one", "height": 64, "width": 64, "num_frames": 17, "steps": 100}
TERMINAL = {"succeeded", "failed", "canceled"}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.MULTILINE)


def up_env(**settings: object) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("UNIVIGU_")}
    env.pop("REDIS_URL", None)
    values = {
        **FAST_LIVENESS,
        "redis_timeout_seconds": 0.5,
        "warmup_steps": 0,
        "worker_metrics_port": 0,
        **settings,
    }
    return env | {f"UNIVIGU_{name.upper()}": str(value) for name, value in values.items()}


class Up:
    """`univigu up --preset tiny` as a child process, its output in a log file."""

    def __init__(self, data_dir: Path, log_path: Path, *args: str, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "service.cli", "up", "--preset", "tiny", "--port", str(self.port)]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--data-dir", str(data_dir), *args],
                cwd=REPO,
                env=up_env(**settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> None:
        wait_for(
            lambda: f"is up: {self.url}" in self.log() or self.process.poll() is not None,
            timeout=WORKER_START_TIMEOUT,
            what="the URL",
        )
        assert self.process.poll() is None, self.log()[-4000:]

    def pid_of(self, name: str) -> int:
        """The pid of the last ``name`` (worker, gateway, redis-server) that `up` started."""
        return int(re.findall(rf"started the {name} \(pid (\d+)\)", self.log())[-1])

    def redis_url(self) -> str:
        found = re.search(r"redis-server \S+ keeps its data in \S+ and listens on (\S+)", self.log())
        assert found, self.log()
        return found.group(1)

    def stop(self) -> int:
        """Ctrl-C, as a terminal sends it, and the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(60)


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[type[Up]]:
    started: list[Up] = []

    class Tracked(Up):
        def __init__(self, data_dir: Path, *args: str, **settings: object) -> None:
            super().__init__(data_dir, tmp_path / f"up-{len(started)}.log", *args, **settings)
            started.append(self)

    yield Tracked
    for up in started:
        up.stop()


def finished(client: httpx.Client, job_id: str, *, timeout: float = 120) -> dict:
    def terminal() -> dict | None:
        response = client.get(f"/jobs/{job_id}")
        return (
            response.json() if response.status_code == 200 and response.json()["status"] in TERMINAL else None
        )

    return wait_for(terminal, timeout=timeout, what=f"job {job_id} to finish")


def log_time(log: str, pattern: str) -> datetime:
    """When the first log line matching ``pattern`` was written."""
    line = re.search(rf"^.*{pattern}.*$", log, re.MULTILINE)
    assert line, f"no line matches {pattern!r}"
    stamp = LOG_TIME.match(line.group(0))
    assert stamp, line.group(0)
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")


@pytest.fixture(scope="module")
def running_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `up` for the fault tests below, which each wait until it serves again before they start."""
    folder = tmp_path_factory.mktemp("up-faults")
    up = Up(folder / "data", folder / "up.log")
    up.wait_up()
    yield up
    assert up.stop() == 0, up.log()[-4000:]


def test_a_sigkilled_worker_is_restarted_and_the_next_job_runs_on_the_new_one(running_up: Up) -> None:
    settings = Settings(**FAST_LIVENESS)
    with httpx.Client(base_url=running_up.url, timeout=10) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=WORKER_START_TIMEOUT)
        job_id = client.post("/generate", json=LONG_JOB).json()["id"]
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0, timeout=120, what="progress")

        killed = running_up.pid_of("worker")
        killed_at = time.monotonic()
        os.kill(killed, signal.SIGKILL)
        job = finished(client, job_id, timeout=settings.worker_lost_bound_seconds + 1.0)
        assert (job["status"], job["error"]["code"]) == ("failed", "worker_lost")
        lost_after = time.monotonic() - killed_at

        wait_for(
            lambda: "the worker is ready again" in running_up.log(),
            timeout=WORKER_START_TIMEOUT,
            what="a new worker",
        )
        log = running_up.log()
        exited = log_time(log, rf"the worker \(pid {killed}\) was killed by SIGKILL")
        restarted = log_time(log, rf"started the worker \(pid (?!{killed}\))")
        ready = float(re.search(r"the worker is ready again, ([\d.]+) s after it exited", log).group(1))
        print(
            f"\njob worker_lost {lost_after:.1f} s after the kill; worker restarted "
            f"{(restarted - exited).total_seconds():.1f} s after its exit, live {ready:.1f} s after"
        )
        # The restart waits the first backoff delay and up's next look (every 0.2 s); the rest is the start.
        assert (restarted - exited).total_seconds() <= RestartPolicy().first_delay_seconds + 1.0

        after = client.post("/generate", json={"prompt": "after", **TINY_VIDEO}).json()["id"]
        assert finished(client, after)["status"] == "succeeded"
        assert client.get(f"/jobs/{job_id}").json()["status"] == "failed"  # no silent re-run


def test_a_sigkilled_redis_is_restarted_and_every_accepted_job_finishes(running_up: Up) -> None:
    with httpx.Client(base_url=running_up.url, timeout=10) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=WORKER_START_TIMEOUT)
        accepted = [
            client.post("/generate", json={"prompt": f"job {i}", **TINY_VIDEO}).json()["id"] for i in range(4)
        ]
        restarts_before = running_up.log().count("the redis-server is ready again")
        killed_at = time.monotonic()
        os.kill(running_up.pid_of("redis-server"), signal.SIGKILL)

        answers = []
        while running_up.log().count("the redis-server is ready again") == restarts_before:
            response = client.get(f"/jobs/{accepted[-1]}")
            answers.append((response.status_code, response.headers.get("retry-after")))
            assert time.monotonic() - killed_at < 60, running_up.log()[-4000:]
            time.sleep(0.02)
        outage = answers.count((503, "5"))
        print(
            f"\nRedis back after {time.monotonic() - killed_at:.1f} s; {outage} of {len(answers)} polls answered 503"
        )
        assert outage > 0
        assert {status for status, _ in answers} <= {200, 503}

        for job_id in accepted:
            assert finished(client, job_id)["status"] == "succeeded"
        later = client.post("/generate", json={"prompt": "after", **TINY_VIDEO})
        assert later.status_code == 202
        assert finished(client, later.json()["id"])["status"] == "succeeded"


def test_stopping_and_starting_up_keeps_every_job_and_its_files(start_up: type[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_up(data)
    first.wait_up()
    with httpx.Client(base_url=first.url, timeout=10) as client:
        job_id = client.post("/generate", json={"prompt": "keep me", "seed": 3, **TINY_VIDEO}).json()["id"]
        assert finished(client, job_id)["status"] == "succeeded"
        video = client.get(f"/jobs/{job_id}/video").content
    assert video[4:8] == b"ftyp"  # an MP4

    second = start_up(data)
    assert second.process.wait(60) == 2
    refusal = second.log()
    assert f"the data folder {data} is in use by another `univigu up` (pid {first.process.pid})" in refusal
    assert "Traceback" not in refusal

    redis_url = first.redis_url()
    assert first.stop() == 0, first.log()[-4000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{first.url}/healthz", timeout=2)
    with pytest.raises(RedisConnectionError):
        Redis.from_url(redis_url, socket_connect_timeout=1).ping()

    again = start_up(data)
    again.wait_up()
    with httpx.Client(base_url=again.url, timeout=10) as client:
        assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
        assert client.get(f"/jobs/{job_id}/video").content == video


def test_the_cleaner_deletes_only_its_own_expired_files(start_up: type[Up], tmp_path: Path) -> None:
    ours = ResultFiles(tmp_path / "ours" / "results")
    theirs = ResultFiles(tmp_path / "theirs" / "results")
    for files, job_id, ttl in (
        (ours, "expired", -1.0),
        (ours, "not-yet", 3600.0),  # its record is unknown to this Redis: kept all the same
        (ours, "unrecorded", None),
        (theirs, "expired", -1.0),
    ):
        files.video_target(job_id).write_bytes(b"an mp4")
        if ttl is not None:
            files.record_expiry(job_id, ttl)

    up = start_up(tmp_path / "ours", cleanup_interval_seconds=0.2)
    wait_for(lambda: not ours.job_dir("expired").exists(), timeout=60, what="the clean-up")
    for files, job_id in ((ours, "not-yet"), (ours, "unrecorded"), (theirs, "expired")):
        assert files.video(job_id).read_bytes() == b"an mp4"
    assert up.stop() == 0, up.log()[-4000:]


def listening_socket() -> socket.socket:
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    return taken


def test_a_taken_port_is_one_line_naming_its_flag(start_up: type[Up], tmp_path: Path) -> None:
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        metrics = start_up(tmp_path / "data", "--metrics-port", str(port))
        assert metrics.process.wait(60) == 2
        gateway = start_up(tmp_path / "data", "--port", str(port))
        assert gateway.process.wait(60) == 2
        worker = subprocess.run(
            [sys.executable, "-m", "service.cli", "worker", "--preset", "tiny", "--metrics-port", str(port)],
            cwd=REPO,
            env=up_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert worker.returncode == 2
    for output, flag, setting in (
        (metrics.log(), "univigu up --metrics-port", "UNIVIGU_WORKER_METRICS_PORT"),
        (gateway.log(), "univigu up --port", "UNIVIGU_PORT"),
        (worker.stderr, "univigu worker --metrics-port", "UNIVIGU_WORKER_METRICS_PORT"),
    ):
        errors = [line for line in output.splitlines() if " ERROR " in line]
        assert len(errors) == 1, output
        assert f"port {port}" in errors[0]
        assert flag in errors[0]
        assert setting in errors[0]
        assert "Traceback" not in output


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper that may never come (the test's init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_sigkilled_up_takes_its_children_with_it_and_frees_the_data_folder(
    start_up: type[Up], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    killed = start_up(data)
    killed.wait_up()
    children = {name: killed.pid_of(name) for name in ("redis-server", "gateway", "worker")}
    killed.process.kill()
    killed.process.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in children.values()), timeout=60, what=f"{children} to end")

    again = start_up(data)
    again.wait_up()  # the data folder's lock went with the children
    with httpx.Client(base_url=again.url, timeout=10) as client:
        job_id = client.post("/generate", json={"prompt": "after", "seed": 1, **TINY_VIDEO}).json()["id"]
        assert finished(client, job_id)["status"] == "succeeded"
