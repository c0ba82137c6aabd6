"""The OpenAI-compatible layer's pieces without a worker: seconds to frames, the video object of each
native status, failed-job errors, and the error shape under /v1/ (and only there)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import openai
import pytest
from conftest import assert_envelope, queued
from fastapi.testclient import TestClient

from model.limits import hard_limits
from service.contract.schemas import ErrorInfo, Job, JobResult, JobStatus, JobType, ServedModel
from service.contract.settings import Settings
from service.gateway.app import create_app
from service.gateway.errors import HttpError, failed_job_error
from service.gateway.openai.videos import frames_for, parse_size, seconds_text, to_video

FRAMES = Settings().cap(hard_limits("generate")).rules["num_frames"]  # 1 to 129 frames
TINY = ServedModel(
    preset="tiny",
    max_caption_tokens=48,
    defaults={"height": 64, "width": 64, "num_frames": 17, "fps": 8},
)


@pytest.mark.parametrize(
    ("seconds", "fps", "frames"),
    [("4", 8, 33), ("4", 16, 65), ("8", 16, 129), ("1", 8, 9), ("2.125", 8, 17), (0.1, 8, 1), ("0.5", 8, 5)],
)
def test_seconds_become_the_nearest_4k_plus_1_frames(seconds: str | float, fps: int, frames: int) -> None:
    count, note = frames_for(seconds, fps, FRAMES)
    assert count == frames and (count - 1) % 4 == 0
    assert f"{count} frames" in note and f"{fps} fps" in note


def test_seconds_outside_the_frame_range_or_not_positive_are_refused() -> None:
    with pytest.raises(HttpError) as long:
        frames_for("12", 16, FRAMES)  # 193 frames; at most 129
    assert (long.value.status, long.value.param) == (422, "seconds")
    assert "between 0.0625 and 8.0625" in long.value.message
    for bad in ("0", "-2", "soon", "nan", "inf"):
        with pytest.raises(HttpError):
            frames_for(bad, 8, FRAMES)
    with pytest.raises(HttpError):
        frames_for(
            "4", 8, Settings(max_frames=31).cap(hard_limits("generate")).rules["num_frames"]
        )  # 33 frames > 29, the largest 4k+1 under 31


def test_sizes_are_width_by_height() -> None:
    assert parse_size("832x480") == (832, 480)
    assert parse_size(" 720 X 1280 ") == (720, 1280)
    for bad in ("832", "832x", "x480", "832*480", "-16x16"):
        with pytest.raises(HttpError):
            parse_size(bad)


def _job(status: JobStatus, **fields: object) -> Job:
    base: dict[str, object] = {
        "id": "a" * 32,
        "type": JobType.generate,
        "status": status,
        "progress": 0,
        "created_at": datetime(2026, 1, 1, 12, 0, 0, 750000, tzinfo=UTC),
        "started_at": None,
        "finished_at": None,
        "expires_at": None,
        "params": {"prompt": "a cat", "num_frames": 9},
        "error": None,
        "result": None,
    }
    return Job.model_validate({**base, **fields})


def test_the_video_object_of_each_native_status() -> None:
    queued_video = to_video(_job(JobStatus.queued, queue_position=2), TINY)
    assert (queued_video.status, queued_video.queue_position, queued_video.model) == (
        "queued",
        2,
        "univigu-tiny",
    )
    assert queued_video.created_at == int(datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp())
    assert (queued_video.size, queued_video.num_frames, queued_video.seconds) == ("64x64", 9, "1.125")
    assert queued_video.completed_at is None and queued_video.error is None

    assert to_video(_job(JobStatus.running, progress=40), TINY).status == "in_progress"
    finished = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
    done = to_video(
        _job(
            JobStatus.succeeded,
            type=JobType.joint,
            progress=100,
            finished_at=finished,
            expires_at=finished,
            result=JobResult(caption="a cat walks", fps=8, num_frames=9, height=32, width=48),
        ),
        TINY,
    )
    assert (done.status, done.size, done.caption, done.joint) == ("completed", "48x32", "a cat walks", True)
    assert done.completed_at == done.expires_at == int(finished.timestamp())

    canceled = to_video(
        _job(JobStatus.canceled, finished_at=finished, error=ErrorInfo(code="canceled", message="canceled")),
        TINY,
    )
    assert (canceled.status, canceled.job_status, canceled.error.code) == ("failed", "canceled", "canceled")
    failed = to_video(_job(JobStatus.failed, error=ErrorInfo(code="gpu_oom", message="out of memory")), TINY)
    assert (failed.status, failed.error.code) == ("failed", "gpu_oom")


def test_seconds_text() -> None:
    assert [seconds_text(value) for value in (4.0, 4.125, 65 / 16, 0.0625)] == [
        "4",
        "4.125",
        "4.0625",
        "0.0625",
    ]


def test_failed_jobs_map_to_the_gateways_statuses() -> None:
    def status(code: str, param: str | None = None) -> tuple[int, str]:
        error = failed_job_error("j", ErrorInfo(code=code, message="m", param=param))
        return error.status, error.code

    assert status("prompt_too_long", "prompt") == (422, "prompt_too_long")
    assert status("invalid_video") == (415, "invalid_video")
    assert status("video_too_large") == (422, "video_too_large")
    assert status("canceled") == (409, "job_canceled")
    assert status("gpu_oom") == (500, "gpu_oom")
    assert status("worker_lost") == (500, "worker_lost")
    assert failed_job_error("j", None).status == 500


def test_errors_under_v1_are_in_openais_shape_and_only_there(client: TestClient) -> None:
    def openai_error(response: object, status: int, code: str, kind: str) -> dict:
        assert response.status_code == status, response.text  # type: ignore[attr-defined]
        body = response.json()  # type: ignore[attr-defined]
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert (body["error"]["code"], body["error"]["type"]) == (code, kind)
        return body["error"]

    openai_error(client.get("/v1/nope"), 404, "not_found", "invalid_request_error")
    openai_error(client.delete("/v1/models"), 405, "method_not_allowed", "invalid_request_error")
    limit = openai_error(client.get("/v1/videos?limit=0"), 400, "invalid_parameter", "invalid_request_error")
    assert limit["param"] == "limit"
    order = openai_error(client.get("/v1/videos?order=up"), 400, "invalid_parameter", "invalid_request_error")
    assert order["param"] == "order"
    missing = openai_error(
        client.get(f"/v1/videos/video_{'0' * 32}"), 404, "job_not_found", "invalid_request_error"
    )
    assert missing["param"] == "id"
    no_model = client.get("/v1/models")
    openai_error(no_model, 503, "no_workers", "server_error")
    assert no_model.headers["retry-after"] == "5"
    openai_error(client.post("/v1/videos", json={"prompt": "x"}), 503, "no_workers", "server_error")
    openai_error(
        client.post("/v1/videos", content=b"{", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
        "invalid_request_error",
    )
    bad = openai_error(
        client.post("/v1/videos", json={"size": "32x32"}), 400, "invalid_parameter", "invalid_request_error"
    )
    assert bad["param"] == "prompt"

    # The native API keeps its envelope and its statuses.
    assert_envelope(client.get("/nope"), 404, "not_found")
    assert_envelope(client.get("/jobs?limit=0"), 422, "invalid_parameter", "limit")
    assert_envelope(client.get("/model"), 503, "no_workers")


def test_native_and_v1_reads_of_one_record_agree(client: TestClient) -> None:
    store = client.app.state.services.store  # type: ignore[attr-defined]
    store.publish_model(TINY)
    job_id = queued(store, "b" * 32)
    native = client.get(f"/jobs/{job_id}").json()
    video = client.get(f"/v1/videos/video_{job_id}").json()
    assert (video["status"], video["job_status"], video["progress"]) == (
        "queued",
        "queued",
        native["progress"],
    )
    assert video["created_at"] == int(datetime.fromisoformat(native["created_at"]).timestamp())
    assert video["size"] == "64x64" and video["seconds"] == "2.125"  # the model's defaults
    assert [item["id"] for item in client.get("/v1/videos").json()["data"]] == [f"video_{job_id}"]
    assert client.delete(f"/v1/videos/{job_id}").json() == {
        "id": f"video_{job_id}",
        "object": "video.deleted",
        "deleted": True,
    }
    assert_envelope(client.get(f"/jobs/{job_id}"), 404, "job_not_found")
    assert client.get("/v1/videos").json()["data"] == []


def test_a_rate_limited_v1_request_raises_the_sdks_rate_limit_error(
    settings_factory: Callable[..., Settings],
) -> None:
    """A 429 under /v1/ is written in OpenAI's shape, so the official SDK raises its RateLimitError
    (with the Retry-After header), while the native API keeps its own envelope."""
    settings = settings_factory(rate_limit_per_second=0.01, rate_limit_burst=1)
    with TestClient(create_app(settings)) as http:
        http.app.state.services.store.publish_model(TINY)  # type: ignore[attr-defined]
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
        sdk.models.list()  # spends the one token of the burst
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.models.list()
        assert raised.value.status_code == 429
        assert raised.value.code == "rate_limited"
        assert int(raised.value.response.headers["retry-after"]) >= 1
        assert raised.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        assert_envelope(http.get("/jobs"), 429, "rate_limited")
