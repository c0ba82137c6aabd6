"""POST /caption uploads: streamed with a byte cap (413), probed (415), options validated (422)."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from conftest import assert_envelope
from fastapi.testclient import TestClient

from model.media import write_mp4
from service.contract.schemas import ServedModel
from service.contract.settings import Settings
from service.gateway.app import create_app
from service.gateway.errors import HttpError
from service.gateway.uploads import receive_upload

BOUNDARY = "univigu-test-boundary"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)
    return write_mp4(frames, tmp_path_factory.mktemp("clip") / "clip.mp4", fps=8).read_bytes()


def uploads_of(client: TestClient) -> list[Path]:
    directory = client.app.state.services.files.uploads_dir  # type: ignore[attr-defined]
    return list(directory.iterdir())


def left_behind(client: TestClient) -> list[Path]:
    """Every upload and job folder (an upload's recorded expiry) on disk: what a refused upload must not leave."""
    files = client.app.state.services.files  # type: ignore[attr-defined]
    return [*files.uploads_dir.iterdir(), *files.jobs_dir.iterdir()]


def queue_length(client: TestClient) -> int:
    return client.app.state.services.queue.depth()  # type: ignore[attr-defined]


def multipart(file_bytes: bytes, fields: dict[str, str] | None = None) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (fields or {}).items()
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n".encode()
        + file_bytes
        + b"\r\n"
    )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def test_a_video_upload_is_accepted_and_kept_for_the_worker(client: TestClient, clip: bytes) -> None:
    response = client.post("/caption", files={"file": ("x.dat", clip, "text/plain")}, data={"steps": "4"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["type"] == "caption" and job["params"] == {"steps": 4}
    assert [path.name for path in uploads_of(client)] == [f"{job['id']}.upload"]
    assert uploads_of(client)[0].read_bytes() == clip
    files = client.app.state.services.files  # type: ignore[attr-defined]
    ttl = client.app.state.services.settings.result_ttl_seconds  # type: ignore[attr-defined]
    # recorded before the upload's first byte: had the job never been created, the clean-up would delete it
    assert files.expires_at(job["id"]) == pytest.approx(time.time() + ttl, abs=60)
    client.post(f"/jobs/{job['id']}/cancel")
    assert uploads_of(client) == [], "canceling a queued caption job keeps its upload"


@pytest.mark.parametrize(
    "content",
    [
        b"just some text, not a video at all\n" * 100,
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"",
        bytes(np.random.default_rng(1).integers(0, 256, 64 * 1024, dtype=np.uint8)),
        b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" * 50 + b"%%EOF\n",
    ],
    ids=["text", "hls-playlist", "empty", "random-bytes", "pdf"],
)
def test_non_videos_answer_415_whatever_their_name_and_type(client: TestClient, content: bytes) -> None:
    response = client.post("/caption", files={"file": ("movie.mp4", content, "video/mp4")})
    error = assert_envelope(response, 415, "invalid_video")
    assert "'movie.mp4'" in error["message"]
    uploads_dir = client.app.state.services.files.uploads_dir  # type: ignore[attr-defined]
    assert ".upload" not in error["message"] and str(uploads_dir) not in error["message"]
    assert left_behind(client) == []
    assert queue_length(client) == 0


def test_an_upload_over_the_limit_answers_413_from_its_content_length(
    settings_factory: Callable[..., Settings], clip: bytes
) -> None:
    with TestClient(create_app(settings_factory(max_upload_bytes=1000))) as client:
        response = client.post("/caption", files={"file": ("v.mp4", b"\0" * 2_000_000, "video/mp4")})
        assert_envelope(response, 413, "payload_too_large", "file")
        assert left_behind(client) == []
        assert queue_length(client) == 0


def test_a_chunked_upload_over_the_limit_answers_413_and_leaves_no_file(
    settings_factory: Callable[..., Settings],
) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the cap is found while streaming
        data = multipart(b"\0" * 600_000)
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    with TestClient(create_app(settings_factory(max_upload_bytes=100_000))) as client:
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        response = client.post("/caption", content=body(), headers=headers)
        # The upload parser's file cap or the body cap of BodyLimitMiddleware, whichever is crossed first.
        assert_envelope(response, 413, "payload_too_large")
        assert left_behind(client) == []
        assert queue_length(client) == 0


def test_the_stream_is_not_read_past_the_limit(tmp_path: Path) -> None:
    chunk = 64 * 1024
    data = multipart(b"\0" * (50 * chunk))
    consumed = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal consumed
        for start in range(0, len(data), chunk):
            consumed += 1
            yield data[start : start + chunk]

    destination = tmp_path / "upload"
    receive = functools.partial(
        receive_upload,
        chunks(),
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
        content_length=None,
        destination=destination,
        max_bytes=3 * chunk,
    )
    with pytest.raises(HttpError) as raised:
        anyio.run(receive)
    assert raised.value.status == 413
    assert consumed <= 5, f"read {consumed} chunks of {len(data) // chunk} for a 3-chunk limit"
    assert not destination.exists()


@pytest.mark.parametrize(
    ("fields", "param", "hint"),
    [
        ({"steps": "0"}, "steps", "greater than or equal to 1"),
        ({"steps": "many"}, "steps", "integer"),
        ({"max_tokens": "100000"}, "max_tokens", "less than or equal to 512"),
        ({"seed": "-1"}, "seed", "greater than or equal to 0"),
        ({"video_reuse": "0"}, "video_reuse", "greater than or equal to 1"),
        ({"height": "64"}, "height", "unknown field"),
    ],
)
def test_bad_caption_options_answer_422(
    client: TestClient, clip: bytes, fields: dict[str, str], param: str, hint: str
) -> None:
    response = client.post("/caption", files={"file": ("v.mp4", clip, "video/mp4")}, data=fields)
    error = assert_envelope(response, 422, "invalid_parameter", param)
    assert hint in error["message"]
    assert left_behind(client) == []
    assert queue_length(client) == 0


def test_caption_longer_than_the_served_model_allows_never_reaches_the_queue(
    client: TestClient, clip: bytes
) -> None:
    store = client.app.state.services.store  # type: ignore[attr-defined]
    store.publish_model(ServedModel(preset="tiny", max_caption_tokens=48, defaults={}))
    response = client.post(
        "/caption", files={"file": ("v.mp4", clip, "video/mp4")}, data={"max_tokens": "49"}
    )
    error = assert_envelope(response, 422, "invalid_parameter", "max_tokens")
    assert error["message"] == "max_tokens must be between 1 and 48, got 49"
    assert left_behind(client) == []
    assert queue_length(client) == 0
    accepted = client.post(
        "/caption", files={"file": ("v.mp4", clip, "video/mp4")}, data={"max_tokens": "48"}
    )
    assert accepted.status_code == 202


@pytest.mark.parametrize(
    ("filename", "named"),
    [
        ("holiday.mov", "'holiday.mov'"),
        ("x" * 500 + ".mp4", "(504 characters)"),
        (None, "the uploaded video"),
    ],
)
def test_upload_errors_name_the_clients_file_never_the_stored_one(
    client: TestClient, filename: str | None, named: str
) -> None:
    disposition = 'form-data; name="file"' + ("" if filename is None else f'; filename="{filename}"')
    body = (
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: video/mp4\r\n\r\n".encode()
        + b"not a video\n" * 50
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    response = client.post(
        "/caption", content=body, headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    error = assert_envelope(response, 415, "invalid_video")
    assert named in error["message"]
    assert ".upload" not in error["message"]
    assert len(error["message"]) < 400
    assert left_behind(client) == []


def test_missing_file_and_wrong_content_types(client: TestClient) -> None:
    assert_envelope(client.post("/caption", data={"steps": "3"}), 415, "unsupported_media_type")
    missing = client.post("/caption", files={"other": ("v.mp4", b"x", "video/mp4")}, data={"steps": "3"})
    assert_envelope(missing, 422, "invalid_parameter", "file")
    assert_envelope(client.post("/caption", json={"steps": 3}), 415, "unsupported_media_type")
    assert queue_length(client) == 0


def test_caption_idempotency_covers_the_file(client: TestClient, clip: bytes, tmp_path: Path) -> None:
    headers = {"Idempotency-Key": "cap-1"}
    first = client.post("/caption", files={"file": ("v.mp4", clip, "video/mp4")}, headers=headers)
    again = client.post("/caption", files={"file": ("w.mp4", clip, "video/mp4")}, headers=headers)
    assert again.json()["id"] == first.json()["id"]
    other_clip = write_mp4(
        np.zeros((5, 32, 32, 3), dtype=np.uint8), tmp_path / "other.mp4", fps=8
    ).read_bytes()
    changed = client.post("/caption", files={"file": ("v.mp4", other_clip, "video/mp4")}, headers=headers)
    assert_envelope(changed, 422, "idempotency_key_reused")
    assert len(uploads_of(client)) == 1
    assert queue_length(client) == 1
