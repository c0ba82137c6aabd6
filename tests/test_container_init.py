"""The image's entrypoint (tini, from Debian's package, then `univigu`) run here the way Docker runs a
container's command: as PID 1 of its own PID namespace (``unshare --pid --fork --mount-proc``; needs root
or user namespaces, and tini installed: skipped otherwise), with the health check entering that
namespace as ``docker exec`` does (``nsenter``).

The kernel spares PID 1 every signal it has no handler for, and a worker installs its SIGTERM handler
only when its rq loop starts, after loading its model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from conftest import REPO, settings_env, wait_for
from test_deploy import ENTRYPOINT

from service.cli.redis_server import free_port
from service.contract.settings import Settings

INIT = ENTRYPOINT[: ENTRYPOINT.index("univigu")]  # the image's init and its arguments
WORKER = [sys.executable, "-m", "service.cli", "worker", "--preset", "tiny"]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    command = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(command, capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(INIT[0]).is_file(), reason=f"{INIT[0]} is not installed (apt-get install tini)"
    ),
    pytest.mark.skipif(not _namespaces_work(), reason="cannot create a PID namespace here"),
]


def children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def as_pid_one(command: list[str], settings: Settings, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``command`` as PID 1 of a new PID namespace; returns the ``unshare`` process and the host's
    pid of the command, once the command has replaced unshare's child (exec)."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *command],
            cwd=REPO,
            env=settings_env(settings),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    pid = int(wait_for(lambda: children(process.pid), timeout=30, what="the namespace's PID 1")[0])
    program = Path(f"/proc/{pid}/cmdline")
    wait_for(lambda: program.read_bytes().split(b"\0")[0] == command[0].encode(), timeout=30, what="the exec")
    return process, pid


def test_sigterm_while_a_worker_starts_is_ignored_without_init_and_honoured_under_tini(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory()
    bare, bare_pid = as_pid_one(WORKER, settings, tmp_path / "bare.log")
    try:
        os.kill(bare_pid, signal.SIGTERM)  # what `docker stop` does: SIGTERM to the container's PID 1
        wait_for(
            lambda: "model loaded" in (tmp_path / "bare.log").read_text(),
            timeout=180,
            what="the worker, which ignored SIGTERM as PID 1, to load its model",
        )
        assert bare.poll() is None, "the worker without an init stopped on SIGTERM"
    finally:
        bare.kill()  # --kill-child takes the namespace's processes with it
        bare.wait()

    under_tini, tini_pid = as_pid_one([*INIT, *WORKER], settings, tmp_path / "tini.log")
    # tini blocks signals before it starts the worker: from then on, none is lost (before, as PID 1, it
    # would ignore one like any other program).
    wait_for(lambda: children(tini_pid), timeout=30, what="tini to start the worker")
    os.kill(tini_pid, signal.SIGTERM)
    status = under_tini.wait(timeout=60)
    log = (tmp_path / "tini.log").read_text()
    assert status == 128 + signal.SIGTERM, f"exit status {status}:\n{log}"
    assert "model loaded" not in log, "the worker went on loading after SIGTERM"


def test_the_health_check_probes_what_pid_one_serves(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """`univigu healthcheck`, as the image's HEALTHCHECK runs it inside a gateway's and a worker's
    container, finds each role from PID 1's command line and probes the port that command's flags give."""
    univigu = tmp_path / "univigu"  # the console script's name, running this checkout
    univigu.write_text(f'#!/bin/sh\ncd {REPO} && exec {sys.executable} -m service.cli "$@"\n')
    univigu.chmod(0o755)
    settings = settings_factory(warmup_steps=0)
    gateway_port, metrics_port = free_port(), free_port()
    roles = {
        "gateway": ([str(univigu), "gateway", "--port", str(gateway_port)], f"{gateway_port}/healthz"),
        "worker": (
            [str(univigu), "worker", "--preset", "tiny", "--metrics-port", str(metrics_port)],
            f"{metrics_port}/metrics",
        ),
    }
    containers = {
        role: as_pid_one([*INIT, *command], settings, tmp_path / f"{role}.log")
        for role, (command, _) in roles.items()
    }

    def healthy(pid: int) -> subprocess.CompletedProcess[str] | None:
        command = ["nsenter", "--target", str(pid), "--pid", "--mount", str(univigu), "healthcheck"]
        result = subprocess.run(command, cwd=REPO, env=settings_env(settings), capture_output=True, text=True)
        return result if result.returncode == 0 else None

    try:
        for role, (process, pid) in containers.items():
            answer = wait_for(partial(healthy, pid), timeout=180, what=f"the {role} to report healthy")
            assert answer.stdout.strip() == f"healthy: http://127.0.0.1:{roles[role][1]}", answer.stdout
            assert process.poll() is None
    finally:
        for process, _ in containers.values():
            process.kill()
            process.wait()
