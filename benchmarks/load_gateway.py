"""Load benchmark of the gateway (a script, not a test): submit, poll and download under load.

It starts everything it measures on this machine: a redis-server in a temporary directory, the gateway
(`univigu gateway`, one uvicorn process) and ``--workers`` tiny CPU workers, one of them kept busy by a
long job for the whole run. Then N concurrent clients each loop: submit a job (POST /generate), poll it
(GET /jobs/{id}) up to ``--polls`` times every ``--poll-interval`` seconds (with jitter), download its
video (GET /jobs/{id}/video) if it succeeded meanwhile, submit the next. Latencies are measured at the
client, after ``--warmup`` seconds, and printed as a Markdown table for BENCHMARKS.md / RELIABILITY.md.

    python benchmarks/load_gateway.py --clients 100 --duration 30
    python benchmarks/load_gateway.py --clients 50 --workers 2 --duration 600   # the 10-minute soak

At the end every submitted job must reach a terminal state (the invariant submitted = terminal): jobs
still queued when the load stops are canceled (a terminal state), running ones finish. The gateway's
resident memory is sampled every ``--rss-interval`` seconds; the report gives it after the warm-up, at
the end and at its highest, so a leak shows as growth over a long run.

Workers are limited to one torch thread (a GPU worker barely uses the CPU; on a CPU-only machine an
unlimited one would take every core from the gateway). The queue limit is raised for the run.
Everything is stopped and deleted at the end.
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

from service.cli.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]
SUBMIT_BODY = {"prompt": "a benchmark job", "height": 32, "width": 32, "num_frames": 5, "steps": 2}
BUSY_JOB = {"prompt": "keeps the worker busy", "height": 128, "width": 128, "num_frames": 33, "steps": 1000}


TERMINAL = {"succeeded", "failed", "canceled"}


@dataclass
class Samples:
    submit: list[float] = field(default_factory=list)
    poll: list[float] = field(default_factory=list)
    download: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)

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
        length = 0  # every answer of the gateway here carries a Content-Length (no chunked bodies)
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def timed(
    connection: Connection, samples: list[float], method: str, path: str, body: bytes, measure_from: float
) -> tuple[int, bytes]:
    began = time.perf_counter()
    status, answer = await connection.request(method, path, body)
    if time.monotonic() >= measure_from:
        samples.append(time.perf_counter() - began)
    return status, answer


async def one_client(
    connection: Connection, samples: Samples, *, measure_from: float, end: float, args: argparse.Namespace
) -> None:
    rng = random.Random()
    submit_body = json.dumps(SUBMIT_BODY).encode()
    await asyncio.sleep(rng.uniform(0, args.poll_interval))  # spread the clients' phases
    while time.monotonic() < end:
        status, body = await timed(connection, samples.submit, "POST", "/generate", submit_body, measure_from)
        if status != 202:
            samples.error(f"submit {status}")
            await asyncio.sleep(args.poll_interval)
            continue
        job_id = json.loads(body)["id"]
        samples.submitted.append(job_id)
        for _ in range(args.polls):
            await asyncio.sleep(args.poll_interval * rng.uniform(0.5, 1.5))
            if time.monotonic() >= end:
                return
            status, body = await timed(connection, samples.poll, "GET", f"/jobs/{job_id}", b"", measure_from)
            if status != 200:
                samples.error(f"poll {status}")
                continue
            job_status = json.loads(body)["status"]
            if job_status == "succeeded":
                path = f"/jobs/{job_id}/video"
                status, _ = await timed(connection, samples.download, "GET", path, b"", measure_from)
                if status != 200:
                    samples.error(f"download {status}")
            if job_status in TERMINAL:
                break


def resident_kib(pid: int) -> int:
    """VmRSS of a process, from /proc (Linux); 0 where unavailable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in status.splitlines() if line.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


async def sample_memory(
    pid: int, samples: Samples, *, measure_from: float, end: float, interval: float
) -> None:
    while time.monotonic() < end:
        await asyncio.sleep(interval)
        if time.monotonic() >= measure_from:
            samples.rss_kib.append(resident_kib(pid))


async def run_load(port: int, gateway_pid: int, args: argparse.Namespace) -> Samples:
    samples = Samples()
    connections = [Connection("127.0.0.1", port) for _ in range(args.clients)]
    measure_from = time.monotonic() + args.warmup
    end = measure_from + args.duration
    memory = sample_memory(
        gateway_pid, samples, measure_from=measure_from, end=end, interval=args.rss_interval
    )
    try:
        await asyncio.gather(
            memory,
            *(one_client(c, samples, measure_from=measure_from, end=end, args=args) for c in connections),
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


def drain(url: str, submitted: list[str], timeout: float) -> dict[str, int]:
    """Cancel what is still queued, wait for the rest; the submitted jobs' final statuses, counted."""
    final: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as http:
        for job_id in submitted:
            if http.get(f"/jobs/{job_id}").json()["status"] == "queued":
                http.post(f"/jobs/{job_id}/cancel")
        pending = list(submitted)
        while pending and time.monotonic() < deadline:
            for job_id in pending:
                status = http.get(f"/jobs/{job_id}").json()["status"]
                if status in TERMINAL:
                    final[job_id] = status
            pending = [job_id for job_id in pending if job_id not in final]
            time.sleep(0.5)
    counts = {status: 0 for status in sorted(TERMINAL)} | {"not terminal": len(submitted) - len(final)}
    for status in final.values():
        counts[status] += 1
    return counts


def report(
    samples: Samples, seconds: float, args: argparse.Namespace, busy: bool, final: dict[str, int]
) -> str:
    rows = []
    for name, values in (
        ("submit (POST /generate)", samples.submit),
        ("poll (GET /jobs/{id})", samples.poll),
        ("download (GET /jobs/{id}/video)", samples.download),
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
        f"warm-up), each submitting a job then polling it up to {args.polls}x every ~{args.poll_interval} s "
        f"and downloading its video once it succeeded; {args.workers} tiny CPU worker(s), one busy with a "
        f"long job throughout ({'yes' if busy else 'NO'}); "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, one uvicorn process.\n\n"
        "| operation | requests | req/s | p50 ms | p95 ms | p99 ms | max ms |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    errors = f"\nErrors: {samples.errors}\n" if samples.errors else "\nErrors: none\n"
    terminal = sum(count for status, count in final.items() if status in TERMINAL)
    invariant = (
        f"\nJobs: {len(samples.submitted)} submitted (202), {terminal} terminal {final} "
        f"(still queued at the end: canceled); submitted = terminal: "
        f"{'held' if terminal == len(samples.submitted) else 'FAILED'}\n"
    )
    memory = ""
    if samples.rss_kib:
        rss = [kib / 1024 for kib in samples.rss_kib]
        memory = (
            f"\nGateway RSS (MiB, every {args.rss_interval:g} s after warm-up): start {rss[0]:.1f}, "
            f"end {rss[-1]:.1f}, max {max(rss):.1f}, growth {rss[-1] - rss[0]:+.1f}\n"
        )
    return header + "\n".join(rows) + "\n" + errors + invariant + memory


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--polls", type=int, default=5, help="polls per submitted job")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between a client's polls")
    parser.add_argument("--workers", type=int, default=1, help="tiny CPU workers (one runs the busy job)")
    parser.add_argument("--rss-interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for terminal")
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
        workers = [
            subprocess.Popen([*cli, "worker", "--preset", "tiny"], cwd=REPO, env=worker_env)
            for _ in range(args.workers)
        ]
        try:
            wait_until(lambda: ready(url), 180, "the gateway and the worker")
            busy_id = httpx.post(f"{url}/generate", json=BUSY_JOB, timeout=10).json()["id"]
            wait_until(
                lambda: httpx.get(f"{url}/jobs/{busy_id}", timeout=10).json()["status"] == "running",
                180,
                "the worker to be busy",
            )
            samples = asyncio.run(run_load(port, gateway.pid, args))
            busy = httpx.get(f"{url}/jobs/{busy_id}", timeout=10).json()["status"] == "running"
            httpx.post(f"{url}/jobs/{busy_id}/cancel", timeout=10)  # so the worker stops at its next step
            final = drain(url, samples.submitted, args.drain_timeout)
        finally:
            for process in (*workers, gateway):
                process.terminate()
            for process in (*workers, gateway):
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            redis.stop()
    sys.stdout.write(report(samples, args.duration, args, busy, final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
