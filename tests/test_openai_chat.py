"""/v1/chat/completions and /v1/models driven by the official `openai` package against a live gateway and a
tiny CPU worker: a video sent as a `video_url` data URL comes back captioned as the assistant message."""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import make_settings
from live_http import LiveService, serve_gateway
from openai_live import openai_fixtures

from model.media import write_mp4
from service.cli.redis_server import RedisServer
from service.contract.connection import connect_redis, job_store
from service.contract.schemas import ServedModel

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


live, client = openai_fixtures("openai-chat")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8)
    return write_mp4(frames, tmp_path_factory.mktemp("clip") / "clip.mp4", fps=8)


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def video_message(url: str, text: str | None = None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "video_url", "video_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def test_models_lists_the_served_model_and_its_alias_resolves(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert (model.id, model.object) == ("univigu-tiny", "model")
    assert client.models.retrieve("univigu").id == "univigu-tiny"
    assert client.models.retrieve("univigu-tiny").id == "univigu-tiny"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-4o")
    assert unknown.value.code == "model_not_found"


def test_a_video_with_text_is_captioned(client: openai.OpenAI, live: LiveService, clip: Path) -> None:
    completion = client.chat.completions.create(
        model="univigu-tiny",
        messages=[
            {"role": "system", "content": "You describe videos."},  # ignored: the caption model has no system
            *video_message(data_url(clip), "an animal"),
        ],
        max_tokens=12,
        seed=5,
        extra_body={"steps": 3, "video_reuse": 2},
    )
    assert completion.object == "chat.completion" and completion.model == "univigu-tiny"
    (choice,) = completion.choices
    assert (choice.index, choice.finish_reason, choice.message.role) == (0, "stop", "assistant")
    assert isinstance(choice.message.content, str) and choice.message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )

    # The same job through the native API: its caption, its options, and its upload gone.
    job_id = completion.job_id  # type: ignore[attr-defined]
    assert completion.id == f"chatcmpl-{job_id}"
    job = httpx.get(f"{live.url}/jobs/{job_id}").json()
    assert job["type"] == "caption" and job["status"] == "succeeded"
    assert job["result"]["caption"] == choice.message.content
    assert job["params"] == {"prompt": "an animal", "max_tokens": 12, "seed": 5, "steps": 3, "video_reuse": 2}
    assert completion.created == int(datetime.fromisoformat(job["created_at"]).timestamp())
    assert not (live.settings.results_dir / "uploads" / f"{job_id}.upload").exists()

    # A caption job is not a video.
    with pytest.raises(openai.NotFoundError) as not_a_video:
        client.videos.retrieve(f"video_{job_id}")
    assert not_a_video.value.code == "no_video"


def test_a_video_without_text_and_the_alias_model(
    client: openai.OpenAI, live: LiveService, clip: Path
) -> None:
    completion = client.chat.completions.create(
        model="univigu", messages=video_message(data_url(clip)), extra_body={"steps": 2}
    )
    assert completion.choices[0].message.content
    job = httpx.get(f"{live.url}/jobs/{completion.job_id}").json()  # type: ignore[attr-defined]
    assert "prompt" not in job["params"]


def test_refusals_are_the_sdks_exceptions(client: openai.OpenAI, clip: Path) -> None:
    url = data_url(clip)
    with pytest.raises(openai.BadRequestError) as remote:
        client.chat.completions.create(
            model="univigu", messages=video_message("https://example.com/clip.mp4", "describe")
        )
    assert remote.value.code == "unsupported_url"
    assert remote.value.param == "messages[0].content[0].video_url.url"
    assert "no network access" in remote.value.message and "data:" in remote.value.message

    with pytest.raises(openai.BadRequestError) as streaming:
        client.chat.completions.create(model="univigu", messages=video_message(url), stream=True)
    assert streaming.value.param == "stream" and "not supported" in streaming.value.message

    with pytest.raises(openai.BadRequestError) as no_video:
        client.chat.completions.create(model="univigu", messages=[{"role": "user", "content": "hello"}])
    assert no_video.value.param == "messages" and "exactly one video" in no_video.value.message

    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(
            model="univigu",
            messages=[{"role": "user", "content": video_message(url)[0]["content"] * 2}],
        )
    assert "found 2" in two.value.message

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=video_message(url))
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")

    with pytest.raises(openai.BadRequestError) as no_tokens:
        client.chat.completions.create(model="univigu", messages=video_message(url), max_tokens=0)
    assert no_tokens.value.param == "max_tokens"

    not_video = "data:video/mp4;base64," + base64.b64encode(b"not a video at all" * 50).decode()
    with pytest.raises(openai.APIStatusError) as unreadable:
        client.chat.completions.create(model="univigu", messages=video_message(not_video))
    assert (unreadable.value.status_code, unreadable.value.code) == (415, "invalid_video")

    with pytest.raises(openai.BadRequestError) as garbage:
        client.chat.completions.create(model="univigu", messages=video_message("data:video/mp4;base64,@@@"))
    assert "base64" in garbage.value.message


def test_timeout_answers_504_naming_the_job_which_keeps_its_place(
    redis_server: RedisServer, tmp_path: Path, clip: Path
) -> None:
    # A gateway whose model was published but whose worker is gone: the job cannot finish.
    cap = clip.stat().st_size + 1000
    settings = make_settings(
        tmp_path / "results", redis_url=redis_server.url, chat_timeout_seconds=0.5, max_upload_bytes=cap
    )
    redis = connect_redis(settings)
    job_store(settings, redis).publish_model(
        ServedModel(preset="tiny", max_caption_tokens=48, defaults={"fps": 8})
    )
    redis.close()
    with (
        serve_gateway(settings) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as sdk,
    ):
        with pytest.raises(openai.InternalServerError) as timeout:
            sdk.chat.completions.create(model="univigu", messages=video_message(data_url(clip)))
        assert timeout.value.status_code == 504
        assert (timeout.value.code, timeout.value.type) == ("timeout", "server_error")
        job_id = timeout.value.response.headers["x-job-id"]
        assert f"GET /jobs/{job_id}" in timeout.value.message and "not canceled" in timeout.value.message
        job = httpx.get(f"{url}/jobs/{job_id}").json()
        assert job["status"] == "queued" and job["type"] == "caption"  # still waiting for a worker

        big = "data:video/mp4;base64," + base64.b64encode(b"\0" * (cap + 1)).decode()
        with pytest.raises(openai.APIStatusError) as too_large:
            sdk.chat.completions.create(model="univigu", messages=video_message(big))
        assert (too_large.value.status_code, too_large.value.code) == (413, "payload_too_large")

    # Nothing published at all: 503 until a worker starts.
    bare = make_settings(tmp_path / "bare", redis_url=redis_server.url)
    with serve_gateway(bare) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as sdk:
        with pytest.raises(openai.InternalServerError) as unavailable:
            sdk.models.list()
        assert (unavailable.value.status_code, unavailable.value.code) == (503, "no_workers")
