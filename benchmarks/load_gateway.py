"""Load benchmark of the gateway (a script, not a test): submit and poll latency while a worker is busy.

It starts everything it measures on this machine: a redis-server in a temporary directory, the gateway
(`univigu gateway`, one uvicorn process) and one tiny CPU worker kept busy by a long job for the whole
run. Then N concurrent clients each loop: submit a job (POST /generate), poll it (GET /jobs/{id})
``--polls`` times every ``--poll-interval`` seconds (with jitter), submit the next. Latencies are
measured at the client, after ``--warmup`` seconds, and printed as a Markdown table for BENCHMARKS.md.

    python benchmarks/load_gateway.py --clients 100 --duration 30

The worker is limited to one torch thread (a GPU worker barely uses the CPU; on a CPU-only machine an
unlimited one would take every core from the gateway). Submitted jobs just queue up; the queue limit is
raised for the run. Everything is stopped and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]
SUBMIT_BODY = {"prompt": "a benchmark job", "height": 32, "width": 32, "num_frames": 5, "steps": 2}
BUSY_JOB = {"prompt": "keeps the worker busy", "height": 128, "width": 128, "num_frames": 33, "steps": 1000}


@dataclass
class Samples:
    submit: list[float] = field(default_factory=list)
    poll: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: its own overhead stays out of the numbers."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def one_client(
    connection: Connection, samples: Samples, *, measure_from: float, end: float, args: argparse.Namespace
) -> None:
    rng = random.Random()
    submit_body = json.dumps(SUBMIT_BODY).encode()
    await asyncio.sleep(rng.uniform(0, args.poll_interval))  # spread the clients' phases
    while time.monotonic() < end:
        began = time.perf_counter()
        status, body = await connection.request("POST", "/generate", submit_body)
        elapsed = time.perf_counter() - began
        if status != 202:
            samples.error(f"submit {status}")
            await asyncio.sleep(args.poll_interval)
            continue
        if time.monotonic() >= measure_from:
            samples.submit.append(elapsed)
        job_id = json.loads(body)["id"]
        for _ in range(args.polls):
            await asyncio.sleep(args.poll_interval * rng.uniform(0.5, 1.5))
            if time.monotonic() >= end:
                return
            began = time.perf_counter()
            status, _ = await connection.request("GET", f"/jobs/{job_id}")
            elapsed = time.perf_counter() - began
            if status != 200:
                samples.error(f"poll {status}")
            elif time.monotonic() >= measure_from:
                samples.poll.append(elapsed)


async def run_load(port: int, args: argparse.Namespace) -> Samples:
    samples = Samples()
    connections = [Connection("127.0.0.1", port) for _ in range(args.clients)]
    measure_from = time.monotonic() + args.warmup
    end = measure_from + args.duration
    try:
        await asyncio.gather(
            *(one_client(c, samples, measure_from=measure_from, end=end, args=args) for c in connections)
        )
    finally:
        for connection in connections:
            connection.close()
    return samples


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def report(samples: Samples, seconds: float, args: argparse.Namespace, busy: bool) -> str:
    rows = []
    for name, values in (
        ("submit (POST /generate)", samples.submit),
        ("poll (GET /jobs/{id})", samples.poll),
    ):
        if not values:
            rows.append(f"| {name} | 0 | - | - | - | - | - |")
            continue
        ms = [value * 1000 for value in values]
        rows.append(
            f"| {name} | {len(ms)} | {len(ms) / seconds:.0f} | {statistics.median(ms):.1f} | "
            f"{percentile(ms, 95):.1f} | {percentile(ms, 99):.1f} | {max(ms):.1f} |"
        )
    header = (
        f"Gateway load: {args.clients} concurrent clients for {args.duration:.0f} s (after {args.warmup:.0f} s "
        f"warm-up), each submitting a job then polling it {args.polls}x every ~{args.poll_interval} s; "
        f"one tiny CPU worker busy with one job throughout ({'yes' if busy else 'NO'}); "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, one uvicorn process.\n\n"
        "| operation | requests | req/s | p50 ms | p95 ms | p99 ms | max ms |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    errors = f"\nErrors: {samples.errors}\n" if samples.errors else "\nErrors: none\n"
    return header + "\n".join(rows) + "\n" + errors


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--polls", type=int, default=5, help="polls per submitted job")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between a client's polls")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="univigu-bench-") as temporary:
        directory = Path(temporary)
        redis = RedisServer(directory / "redis")
        redis.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("UNIVIGU_")}
        env |= {
            "UNIVIGU_REDIS_URL": redis.url,
            "UNIVIGU_RESULTS_DIR": str(directory / "results"),
            "UNIVIGU_MAX_QUEUE_LENGTH": "1000000",
            "UNIVIGU_MAX_STEPS": str(BUSY_JOB["steps"]),
            "UNIVIGU_PORT": str(port),
            "UNIVIGU_WORKER_METRICS_PORT": "0",
        }
        cli = [sys.executable, "-m", "service.cli", "--log-level", "WARNING"]
        gateway = subprocess.Popen([*cli, "gateway"], cwd=REPO, env=env)
        worker_env = env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        worker = subprocess.Popen([*cli, "worker", "--preset", "tiny"], cwd=REPO, env=worker_env)
        try:
            wait_until(lambda: ready(url), 180, "the gateway and the worker")
            busy_id = httpx.post(f"{url}/generate", json=BUSY_JOB, timeout=10).json()["id"]
            wait_until(
                lambda: httpx.get(f"{url}/jobs/{busy_id}", timeout=10).json()["status"] == "running",
                180,
                "the worker to be busy",
            )
            samples = asyncio.run(run_load(port, args))
            busy = httpx.get(f"{url}/jobs/{busy_id}", timeout=10).json()["status"] == "running"
            httpx.post(f"{url}/jobs/{busy_id}/cancel", timeout=10)  # so the worker stops at its next step
        finally:
            for process in (worker, gateway):
                process.terminate()
            for process in (worker, gateway):
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            redis.stop()
    sys.stdout.write(report(samples, args.duration, args, busy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
