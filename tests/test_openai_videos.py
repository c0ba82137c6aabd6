"""/v1/videos driven by the official `openai` package against a live gateway and a tiny CPU worker.

The SDK is a client we did not write: what it sends (multipart/form-data for create, `seconds` and `size`
as strings) and what it parses (its Video, page and delete types, its exception classes) is the contract.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import imageio_ffmpeg
import openai
import pytest
from conftest import wait_for
from live_http import LiveService, serve_gateway
from openai_live import openai_fixtures

pytestmark = [
    pytest.mark.slow,
    # The SDK marks the videos resource deprecated (OpenAI's Sora API shuts down); the shape is what counts.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

SMALL = {"size": "32x32", "seconds": "1"}  # 1 s at the tiny model's 8 fps: 8 frames, rounded to 9
FAST = {"steps": 3}
# Runs long enough to be caught running (it is deleted, never run to the end):
LONG = {"size": "128x128", "seconds": "4"}  # 33 frames: 100 steps take seconds on a warm CPU worker
STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "canceled": "failed",
}


live, client = openai_fixtures("openai-videos")


@pytest.fixture
def native(live: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        yield http


def wait_done(client: openai.OpenAI, video_id: str, timeout: float = 120) -> Any:
    seen: list[Any] = []

    def finished() -> Any:
        video = client.videos.retrieve(video_id)
        seen.append(video)
        return video if video.status in ("completed", "failed") else None

    done = wait_for(finished, timeout=timeout, interval=0.1, what=f"video {video_id}")
    progress = [video.progress for video in seen]
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    return done


def unix(value: str | None) -> int | None:
    return None if value is None else int(datetime.fromisoformat(value).timestamp())


def assert_same_job(native_job: dict[str, Any], video: Any) -> None:
    """GET /jobs/{id} and GET /v1/videos/{id} describe one job the same way."""
    assert video.object == "video"
    assert video.id == f"video_{native_job['id']}" and video.job_id == native_job["id"]
    assert video.status == STATUS[native_job["status"]] and video.job_status == native_job["status"]
    assert video.progress == native_job["progress"]
    assert video.queue_position == native_job["queue_position"]
    assert video.created_at == unix(native_job["created_at"])
    assert video.completed_at == unix(native_job["finished_at"])
    assert video.expires_at == unix(native_job["expires_at"])
    assert video.prompt == native_job["params"]["prompt"]
    assert video.joint == (native_job["type"] == "joint")
    result = native_job["result"]
    if result is not None:
        assert video.size == f"{result['width']}x{result['height']}"
        assert (video.num_frames, video.fps) == (result["num_frames"], result["fps"])
        assert video.seconds == f"{result['num_frames'] / result['fps']:.4f}".rstrip("0").rstrip(".")
        assert video.caption == result["caption"]
    if native_job["error"] is None:
        assert video.error is None
    else:
        assert (video.error.code, video.error.message) == (
            native_job["error"]["code"],
            native_job["error"]["message"],
        )


def frame_count(path: Path) -> int:
    """Decode the whole file with ffmpeg (a broken MP4 raises)."""
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return frames


def test_create_poll_download_list_and_delete(
    client: openai.OpenAI, native: httpx.Client, live: LiveService, tmp_path: Path
) -> None:
    model = client.models.list().data[0].id
    assert model == "univigu-tiny"
    created = client.videos.create(
        prompt="a red ball rolls", model=model, **SMALL, extra_body={"seed": 1, **FAST}
    )
    assert created.object == "video" and created.id.startswith("video_")
    assert created.status in ("queued", "in_progress")
    assert (created.model, created.size, created.prompt) == (model, "32x32", "a red ball rolls")
    # The rounding is stated: 1 s at 8 fps is 8 frames, not 4k+1; 9 frames are 1.125 s.
    assert (created.num_frames, created.fps, created.seconds) == (9, 8, "1.125")
    assert created.seconds_requested == "1"
    assert "rounded to 9 frames (1.125 s)" in created.seconds_note

    done = wait_done(client, created.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    assert done.completed_at >= done.created_at and done.expires_at > done.completed_at
    assert_same_job(native.get(f"/jobs/{done.job_id}").json(), done)
    params = native.get(f"/jobs/{done.job_id}").json()["params"]
    assert params == {
        "prompt": "a red ball rolls",
        "width": 32,
        "height": 32,
        "num_frames": 9,
        "seed": 1,
        "steps": 3,
    }

    video = tmp_path / "ball.mp4"
    client.videos.download_content(created.id).write_to_file(video)
    assert frame_count(video) == 9
    assert video.read_bytes() == native.get(f"/jobs/{done.job_id}/video").content
    thumbnail = client.videos.download_content(created.id, variant="thumbnail")
    assert thumbnail.response.headers["content-type"] == "image/jpeg"
    assert thumbnail.content.startswith(b"\xff\xd8") and thumbnail.content.endswith(b"\xff\xd9")

    listed = client.videos.list(limit=10)
    assert created.id in [item.id for item in listed.data]
    assert_same_job(
        native.get(f"/jobs/{done.job_id}").json(), next(v for v in listed.data if v.id == created.id)
    )

    deleted = client.videos.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)
    assert native.get(f"/jobs/{done.job_id}").status_code == 404
    assert not (live.settings.results_dir / "jobs" / done.job_id).exists(), "the files were not deleted"
    assert created.id not in [item.id for item in client.videos.list(limit=100).data]
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(created.id)


def test_joint_video_reports_its_description_and_agrees_with_the_native_api(
    client: openai.OpenAI, native: httpx.Client
) -> None:
    # Seeded: unseeded, the random tiny model now and then samples </s> first and the caption is empty.
    created = client.videos.create(prompt="a cat", **SMALL, extra_body={"joint": True, "seed": 3, **FAST})
    assert created.joint is True
    done = wait_done(client, created.id)
    assert done.status == "completed"
    job = native.get(f"/jobs/{done.job_id}").json()
    assert job["type"] == "joint" and job["result"]["caption"]
    assert done.caption == job["result"]["caption"]
    assert_same_job(job, done)
    assert_same_job(job, client.videos.retrieve(done.job_id))  # the bare job id is accepted too


def test_states_in_flight_agree_and_delete_stops_a_running_job(
    client: openai.OpenAI, native: httpx.Client, live: LiveService
) -> None:
    running = client.videos.create(prompt="long", **LONG, extra_body={"steps": 100})
    queued = native.post(
        "/generate", json={"prompt": "native", "height": 32, "width": 32, "num_frames": 5}
    ).json()
    wait_for(
        lambda: native.get(f"/jobs/{running.job_id}").json()["progress"] > 0, timeout=120, what="a start"
    )

    # A natively submitted job, still queued behind the running one, reads the same through /v1.
    video = client.videos.retrieve(f"video_{queued['id']}")
    assert video.status == "queued" and video.queue_position == 0
    assert video.size == "32x32" and video.num_frames == 5  # from the request
    assert_same_job(native.get(f"/jobs/{queued['id']}").json(), video)
    with pytest.raises(openai.ConflictError) as unfinished:
        client.videos.download_content(video.id)
    assert unfinished.value.code == "job_not_succeeded"

    # Canceled natively: failed here, with the native status and code alongside.
    assert native.post(f"/jobs/{queued['id']}/cancel").json()["status"] == "canceled"
    canceled = client.videos.retrieve(video.id)
    assert (canceled.status, canceled.job_status, canceled.error.code) == ("failed", "canceled", "canceled")
    assert_same_job(native.get(f"/jobs/{queued['id']}").json(), canceled)

    # Deleting a running video stops it at its next step (a full run takes seconds); the worker goes on.
    assert client.videos.retrieve(running.id).status == "in_progress"
    client.videos.delete(running.id)
    assert native.get(f"/jobs/{running.job_id}").status_code == 404
    wait_for(lambda: f"job {running.job_id} canceled" in live.worker.log(), timeout=30, what="the stop")
    after = wait_done(client, client.videos.create(prompt="after", **SMALL, extra_body=FAST).id, timeout=60)
    assert after.status == "completed"
    assert not (live.settings.results_dir / "jobs" / running.job_id).exists()


def test_list_pages_with_after_limit_and_order(client: openai.OpenAI, native: httpx.Client) -> None:
    ids = [client.videos.create(prompt=f"page {index}", **SMALL, extra_body=FAST).id for index in range(3)]
    native_ids = [
        f"video_{job['id']}"
        for job in native.get("/jobs?limit=100").json()["jobs"]
        if job["type"] != "caption"
    ]
    first = client.videos.list(limit=2)
    assert [video.id for video in first.data] == native_ids[:2] == ids[::-1][:2]  # newest first
    assert first.has_more is True and first.last_id == first.data[-1].id
    assert [video.id for video in client.videos.list(limit=1)] == native_ids  # the SDK follows after=last_id
    oldest = [video.id for video in client.videos.list(limit=2, order="asc")]
    assert oldest == native_ids[::-1]
    after = client.videos.list(after=ids[1], limit=100)
    assert [video.id for video in after.data] == native_ids[native_ids.index(ids[1]) + 1 :]
    assert after.has_more is False
    with pytest.raises(openai.NotFoundError) as unknown:
        client.videos.list(after="video_" + "0" * 32)
    assert unknown.value.param == "after"
    for video_id in ids:
        wait_done(client, video_id)


def test_errors_are_the_sdks_exceptions_in_openais_shape(
    client: openai.OpenAI, native: httpx.Client, live: LiveService, tmp_path: Path
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown_model:
        client.videos.create(prompt="a ball", model="sora-2")
    assert (unknown_model.value.code, unknown_model.value.param) == ("model_not_found", "model")
    assert "univigu-tiny" in unknown_model.value.message

    with pytest.raises(openai.BadRequestError) as bad_size:
        client.videos.create(prompt="a ball", size="100x64")
    assert (bad_size.value.code, bad_size.value.param, bad_size.value.type) == (
        "invalid_parameter",
        "size",
        "invalid_request_error",
    )
    assert "width should be a multiple of 16" in bad_size.value.message
    with pytest.raises(openai.BadRequestError) as too_big:
        client.videos.create(prompt="a ball", size="1792x1024")  # an OpenAI size; over our 1280 limit
    assert too_big.value.param == "size"
    with pytest.raises(openai.BadRequestError) as no_size:
        client.videos.create(prompt="a ball", size="large")
    assert no_size.value.param == "size"

    with pytest.raises(openai.BadRequestError) as too_long:
        client.videos.create(prompt="a ball", seconds="20")  # 160 frames at 8 fps; at most 129
    assert too_long.value.param == "seconds" and "129 frames" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as negative:
        client.videos.create(prompt="a ball", seconds="-1")
    assert negative.value.param == "seconds"
    with pytest.raises(openai.BadRequestError) as steps:
        client.videos.create(prompt="a ball", extra_body={"steps": 0})
    assert steps.value.param == "steps"
    with pytest.raises(openai.BadRequestError) as unknown_field:
        client.videos.create(prompt="a ball", extra_body={"fps": 30})
    assert unknown_field.value.param == "fps" and "unknown field" in unknown_field.value.message
    image = tmp_path / "ref.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(openai.BadRequestError) as reference:
        client.videos.create(prompt="a ball", input_reference=image)
    assert reference.value.param == "input_reference"

    with pytest.raises(openai.NotFoundError) as missing:
        client.videos.retrieve("video_" + "0" * 32)
    assert (missing.value.code, missing.value.param) == ("job_not_found", "id")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("not-a-video")

    # The raw shapes: OpenAI's under /v1/, the native envelope everywhere else.
    raw = native.get("/v1/videos?limit=0")
    assert raw.status_code == 400
    assert raw.json() == {
        "error": {
            "message": raw.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": "limit",
            "code": "invalid_parameter",
        }
    }
    assert set(native.get("/v1/nope").json()["error"]) == {"message", "type", "param", "code"}
    assert native.get("/jobs?limit=0").json()["error"].keys() == {"code", "message", "param"}
    assert native.get("/jobs?limit=0").status_code == 422


def test_json_bodies_and_numeric_seconds_work_too(native: httpx.Client) -> None:
    response = native.post(
        "/v1/videos", json={"prompt": "json", "size": "32x16", "seconds": 0.5, "seed": 3, "steps": 2}
    )
    assert response.status_code == 200, response.text
    video = response.json()
    assert (video["size"], video["num_frames"], video["seconds"]) == ("32x16", 5, "0.625")
    assert response.headers["location"] == f"/v1/videos/{video['id']}"
    assert native.get(f"/v1/videos/{video['id']}").json()["job_id"] == video["job_id"]
    same = native.post(
        "/v1/videos", content=json.dumps({"prompt": "json"}), headers={"content-type": "text/plain"}
    )
    assert same.status_code == 415 and same.json()["error"]["type"] == "invalid_request_error"


def test_bearer_api_keys_are_checked(live: LiveService) -> None:
    settings = live.settings.model_copy(update={"api_keys": ["s3cret"]})
    with serve_gateway(settings) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as refused:
                wrong.videos.list()
            assert refused.value.code == "unauthorized"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as keyed:
            assert keyed.videos.list(limit=1).object == "list"
            assert keyed.models.retrieve("univigu").id == "univigu-tiny"
        # The native header works on /v1 too, and the native API keeps its own header.
        assert httpx.get(f"{url}/v1/videos", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{url}/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 401
