"""Hostile clients: per-key isolation, rate limits, path traversal, oversized and slow bodies.

The body tests talk raw HTTP/1.1 to a live uvicorn (tests/live_http.py): a TestClient hands the app the
whole body at once and cannot show streaming limits or timeouts.
"""

from __future__ import annotations

import contextlib
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import assert_envelope
from fastapi.testclient import TestClient
from live_http import serve_gateway

from service.contract.result_files import ResultFiles
from service.contract.schemas import JobResult, JobStatus
from service.contract.settings import Settings
from service.gateway.app import create_app

KEYS = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}


@pytest.fixture
def keyed(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_factory(api_keys=["key-a", "key-b"]))) as client:
        yield client


def test_one_key_never_sees_another_keys_jobs(keyed: TestClient) -> None:
    a, b = KEYS
    job_id = keyed.post("/generate", json={"prompt": "mine"}, headers=a).json()["id"]
    store = keyed.app.state.services.store  # type: ignore[attr-defined]
    files = keyed.app.state.services.files  # type: ignore[attr-defined]
    assert store.start(job_id, "w1")
    files.write_json(job_id, {"caption": "private"})
    assert store.finish(job_id, JobStatus.succeeded, result=JobResult(result_url=f"/jobs/{job_id}/result"))

    for method, path in [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/result"),
        ("GET", f"/jobs/{job_id}/video"),
        ("POST", f"/jobs/{job_id}/cancel"),
    ]:
        assert_envelope(keyed.request(method, path, headers=b), 404, "job_not_found", "id")
    assert keyed.get("/jobs", headers=b).json()["jobs"] == []

    assert keyed.get(f"/jobs/{job_id}", headers=a).json()["status"] == "succeeded"
    assert keyed.get(f"/jobs/{job_id}/result", headers=a).json() == {"caption": "private"}
    assert [job["id"] for job in keyed.get("/jobs", headers=a).json()["jobs"]] == [job_id]
    raw = store.redis.hgetall(f"{store.prefix}:job:{job_id}")
    assert b"key-a" not in b"".join([*raw.keys(), *raw.values()]), "the key itself is stored"


def test_missing_or_wrong_keys_answer_401_on_every_job_route(keyed: TestClient) -> None:
    job_id = keyed.post("/generate", json={"prompt": "mine"}, headers=KEYS[0]).json()["id"]
    for headers in ({}, {"X-API-Key": "key-c"}, {"X-API-Key": ""}):
        for method, path in [
            ("GET", "/jobs"),
            ("GET", f"/jobs/{job_id}"),
            ("POST", f"/jobs/{job_id}/cancel"),
            ("GET", f"/jobs/{job_id}/video"),
        ]:
            assert_envelope(keyed.request(method, path, headers=headers), 401, "unauthorized")


def test_without_keys_every_job_stays_visible(client: TestClient) -> None:
    job_id = client.post("/generate", json={"prompt": "shared"}).json()["id"]
    assert client.get(f"/jobs/{job_id}", headers={"X-API-Key": "anything"}).status_code == 200
    assert [job["id"] for job in client.get("/jobs").json()["jobs"]] == [job_id]


def test_rate_limit_per_key_answers_429_with_retry_after(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(api_keys=["key-a", "key-b"], rate_limit_per_second=0.5, rate_limit_burst=3)
    a, b = KEYS
    with TestClient(create_app(settings)) as client:
        assert [client.get("/jobs", headers=a).status_code for _ in range(3)] == [200, 200, 200]
        limited = client.get("/jobs", headers=a)
        assert_envelope(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 2
        assert_envelope(client.post("/generate", json={"prompt": "x"}, headers=a), 429, "rate_limited")
        assert client.get("/jobs", headers=b).status_code == 200, "one key's limit spent another's"
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_rate_limit_without_keys_is_per_client_and_zero_disables(
    settings_factory: Callable[..., Settings],
) -> None:
    with TestClient(create_app(settings_factory(rate_limit_per_second=0.5, rate_limit_burst=2))) as client:
        assert [client.get("/jobs").status_code for _ in range(3)] == [200, 200, 429]
    with TestClient(create_app(settings_factory(rate_limit_per_second=0))) as client:
        assert {client.get("/jobs").status_code for _ in range(30)} == {200}


def test_rate_limit_refills(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(rate_limit_per_second=20, rate_limit_burst=1))) as client:
        assert client.get("/jobs").status_code == 200
        statuses = [client.get("/jobs").status_code]
        time.sleep(0.2)  # four tokens' worth of refill at 20/s (a wait, not a timing assertion)
        statuses.append(client.get("/jobs").status_code)
        assert statuses == [429, 200]


TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "..%5c..%5cwindows",
    "%2Fetc%2Fpasswd",
    "....//....//etc",
    "0" * 31 + "%00",
    "0" * 32 + "%2F..",
]


@pytest.mark.parametrize("job_id", TRAVERSALS)
@pytest.mark.parametrize("suffix", ["", "/video", "/result", "/cancel"])
def test_traversal_attempts_never_reach_the_filesystem(client: TestClient, job_id: str, suffix: str) -> None:
    secret = client.app.state.services.files.jobs_dir.parent / "secret.txt"  # type: ignore[attr-defined]
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("outside the jobs directory")
    method = "POST" if suffix == "/cancel" else "GET"
    response = client.request(method, f"/jobs/{job_id}{suffix}")
    assert response.status_code in (404, 405, 422), response.text
    assert set(response.json()) == {"error"}
    assert b"outside" not in response.content and b"root:" not in response.content


@pytest.mark.parametrize("job_id", ["../x", "/etc/passwd", "a/b", "..", "", "x" * 65, "a\x00b", "%2e%2e"])
def test_result_files_refuse_ids_that_are_not_one_plain_name(tmp_path: Path, job_id: str) -> None:
    files = ResultFiles(tmp_path)
    for path_of in (files.job_dir, files.video, files.result_json, files.upload):
        with pytest.raises(ValueError, match="refusing job id"):
            path_of(job_id)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- bodies over a raw socket


def raw_request(url: str, head: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split()[1]), data


def send_until_answered(sock: socket.socket, chunks: Iterator[bytes]) -> int:
    """Send ``chunks`` until the server answers or stops reading; returns the bytes sent."""
    sent = 0
    sock.setblocking(False)
    for chunk in chunks:
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except BlockingIOError:
            pass
        try:
            sock.sendall(chunk)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    sock.setblocking(True)
    return sent


def chunked(payload: bytes, total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """``payload`` then zeros, ``total`` bytes in all, in chunked transfer encoding."""
    yield f"{len(payload):x}\r\n".encode() + payload + b"\r\n"
    filler = f"{size:x}\r\n".encode() + b"0" * size + b"\r\n"
    for _ in range((total - len(payload)) // size):
        yield filler
    yield b"0\r\n\r\n"


@pytest.fixture
def gateway_url(settings_factory: Callable[..., Settings]) -> Iterator[str]:
    settings = settings_factory(
        max_upload_bytes=1_000_000,
        max_json_body_bytes=64 * 1024,
        body_idle_timeout_seconds=1.0,
        body_timeout_seconds=3.0,
    )
    with serve_gateway(settings) as url:
        yield url


BOUNDARY = "hostile-boundary"
MULTIPART_HEAD = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n\r\n'


@pytest.mark.parametrize(
    ("path", "content_type", "start"),
    [
        ("/generate", "application/json", b'{"prompt": "'),
        ("/caption", f"multipart/form-data; boundary={BOUNDARY}", MULTIPART_HEAD.encode()),
    ],
    ids=["json", "upload"],
)
def test_a_chunked_body_over_the_cap_is_refused_while_streaming(
    gateway_url: str, path: str, content_type: str, start: bytes
) -> None:
    total = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        sock = raw_request(
            gateway_url,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n",
        )
        sent = send_until_answered(sock, chunked(start, total))
        status, response = read_response(sock)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sock.close()
    assert status == 413, response
    assert b'"payload_too_large"' in response
    assert sent < 16 * 1024 * 1024, f"the server read {sent} bytes of a body over a 1 MB cap"
    assert peak < 16 * 1024 * 1024, f"the gateway's memory peaked at {peak} bytes (traced)"


@pytest.mark.parametrize("path", ["/generate", "/caption"])
def test_a_declared_length_over_the_cap_is_refused_before_reading(gateway_url: str, path: str) -> None:
    content_type = "application/json" if path == "/generate" else f"multipart/form-data; boundary={BOUNDARY}"
    sock = raw_request(
        gateway_url,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {10**12}\r\n\r\n",
    )
    with sock:
        status, response = read_response(sock)
    assert status == 413, response
    assert b'"payload_too_large"' in response


@pytest.mark.parametrize(
    ("path", "content_type", "start"),
    [
        ("/generate", "application/json", b'{"prompt": "a'),
        ("/caption", f"multipart/form-data; boundary={BOUNDARY}", MULTIPART_HEAD.encode() + b"\0" * 100),
    ],
    ids=["json", "upload"],
)
def test_a_stalled_body_answers_408(gateway_url: str, path: str, content_type: str, start: bytes) -> None:
    sock = raw_request(
        gateway_url,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(start) + 1000}\r\n\r\n",
    )
    with sock:
        sock.sendall(start)  # then nothing more
        status, response = read_response(sock)
    assert status == 408, response
    assert b'"request_timeout"' in response


def test_a_trickled_body_answers_408_at_the_total_deadline(gateway_url: str) -> None:
    start = MULTIPART_HEAD.encode()
    sock = raw_request(
        gateway_url,
        f"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(start) + 100_000}\r\n\r\n",
    )
    with sock:
        sock.sendall(start)
        sock.setblocking(False)
        answered = b""
        for _ in range(200):  # one byte every 0.1 s: never idle for 1 s, never whole within 3 s
            with contextlib.suppress(BlockingIOError):
                answered = sock.recv(65536)
            if answered:
                break
            sock.sendall(b"\0")
            time.sleep(0.1)
        sock.setblocking(True)
    assert answered.startswith(b"HTTP/1.1 408"), answered
    assert b'"request_timeout"' in answered
