"""`univigu up`'s parts on their own, with real short-lived processes: the restart policy, the crash-loop
stop, the data folder's lock and the port check. (`univigu up` itself runs in test_service_up.py.)"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from service.cli.data_folder import DataFolder, DataFolderError
from service.cli.ports import PortUnavailable, check_port
from service.cli.supervisor import CrashLoop, ProcessChild, RestartPolicy, Supervisor

QUICK = RestartPolicy(max_restarts=2, healthy_seconds=60.0, first_delay_seconds=0.01, max_delay_seconds=0.05)


class Python:
    """A ProcessChild running ``python -c code``; counts its starts."""

    def __init__(self, code: str, *, ready: bool = False) -> None:
        self.starts: list[int] = []

        def command(start: int) -> list[str]:
            self.starts.append(start)
            return [sys.executable, "-c", code]

        self.child = ProcessChild(
            "stand-in", command, ready=lambda start: ready, waiting_for="nothing", env={}
        )


def supervise_until_crash_loop(supervisor: Supervisor) -> CrashLoop:
    supervisor.start_all()
    try:
        while True:
            try:
                supervisor.poll()
            except CrashLoop as exc:
                return exc
            time.sleep(0.01)
    finally:
        supervisor.stop_all()


def test_backoff_doubles_up_to_its_bound() -> None:
    policy = RestartPolicy(first_delay_seconds=0.5, max_delay_seconds=8.0)
    assert [policy.delay(restart) for restart in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_a_child_that_keeps_exiting_ends_up_with_its_cause() -> None:
    python = Python("import sys; print('starting'); print('RuntimeError: the cause'); sys.exit(3)")
    crash = supervise_until_crash_loop(Supervisor([python.child], QUICK))
    assert python.starts == [1, 2, 3]  # two restarts, then the third exit ends it
    assert "stand-in exited 3 times in a row without staying ready for 60 s" in str(crash)
    assert "exited with code 3: RuntimeError: the cause" in str(crash)


def test_a_configuration_exit_is_not_restarted() -> None:
    python = Python("import sys; print('the port 9100 is taken'); sys.exit(2)")
    crash = supervise_until_crash_loop(Supervisor([python.child], QUICK))
    assert python.starts == [1]
    assert str(crash) == "the stand-in cannot start with these settings: the port 9100 is taken"


def test_a_healthy_run_starts_a_new_series() -> None:
    # Ready at once and running longer than healthy_seconds: every exit is the first of a series.
    python = Python("import time; time.sleep(0.3)", ready=True)
    supervisor = Supervisor([python.child], RestartPolicy(max_restarts=1, healthy_seconds=0.1))
    supervisor.start_all()
    try:

        def restarted_three_times() -> bool:
            supervisor.poll()
            return len(python.starts) >= 4

        wait_for(restarted_three_times, timeout=60, interval=0.02, what="three restarts")
    finally:
        supervisor.stop_all()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[DataFolder]:
    folder = DataFolder(tmp_path / "data")
    folder.lock()
    yield folder
    folder.unlock()


def test_a_second_up_on_the_same_data_folder_is_refused(folder: DataFolder, tmp_path: Path) -> None:
    with pytest.raises(DataFolderError, match=r"in use by another `univigu up` \(pid \d+\).*--data-dir"):
        DataFolder(tmp_path / "data").lock()
    other = DataFolder(tmp_path / "other")
    other.lock()  # another folder is another lock
    other.unlock()
    folder.unlock()
    again = DataFolder(tmp_path / "data")
    again.lock()
    again.unlock()


def test_a_taken_port_names_the_setting_and_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortUnavailable) as caught:
            check_port("127.0.0.1", port, what="the gateway", setting="UNIVIGU_PORT", flag="--port")
    assert str(caught.value).startswith(f"the gateway port {port} on 127.0.0.1 is unavailable (")
    assert str(caught.value).endswith("choose another with `univigu up --port PORT` (UNIVIGU_PORT)")
    check_port("127.0.0.1", port, what="the gateway", setting="UNIVIGU_PORT", flag="--port")  # free again
