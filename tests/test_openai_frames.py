"""/v1/chat/completions with a video sent as its frames, the way lmms-eval's OpenAI-compatible models send
it, against live gateways: the protocol with the tiny model, and caption quality with the shipped toy
model (frames against the same clips as MP4 ``video_url``\\ s).

lmms-eval does not install here (it would replace torch and pull CUDA packages), so :func:`lmms_eval_payload`
rebuilds its request. The source is EvolvingLMMs-Lab/lmms-eval:

- ``lmms_eval/models/simple/openai_compatible.py``, ``OpenAICompatible.encode_video``: frame indices
  ``np.linspace(0, total - 1, max_frames_num, dtype=int)`` plus the last frame when missing
  (``max_frames_num`` defaults to 10), each frame saved by PIL as PNG and base64-encoded; and
  ``generate_until``: one user message whose content is the task's text, then one ``image_url`` part
  ``data:image/png;base64,...`` per frame, with ``max_tokens`` 1024 and ``temperature`` 0 unless the task
  sets them.
- ``lmms_eval/models/chat/openai_compatible.py`` with ``lmms_eval/protocol.py``
  (``ChatMessages.to_openai_messages``): the same payload keys and defaults; the content parts follow
  the task's messages, a video becoming its frames as ``image_url`` PNG parts where the video stands
  (usually before the question).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import TOY_MODEL, make_settings
from live_http import LiveService, live_service, serve_gateway
from openai_live import openai_fixtures
from PIL import Image

from model.media import read_video, write_mp4
from model.toyworld.describe import Attributes, parse_description
from model.toyworld.detector import detect
from model.toyworld.make import scenes
from model.toyworld.world import FPS, FRAMES, SIDE, render
from service.cli.redis_server import RedisServer
from service.contract.connection import connect_redis, job_store
from service.contract.schemas import ServedModel

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

live, client = openai_fixtures("openai-frames")

LMMS_EVAL_MAX_FRAMES = 10  # OpenAICompatible(max_frames_num=10)
CONTEXT = "Describe the video."  # a task's text; short enough for the toy model's 16 prompt tokens


def png(frame: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def sampled_frames(frames: np.ndarray, max_frames_num: int = LMMS_EVAL_MAX_FRAMES) -> list[str]:
    """``OpenAICompatible.encode_video`` on decoded frames ``(T, H, W, 3)``: base64 PNGs."""
    total = len(frames)
    indices = np.linspace(0, total - 1, max_frames_num, dtype=int)
    if total - 1 not in indices:
        indices = np.append(indices, total - 1)
    return [png(frames[index]) for index in indices.tolist()]


def lmms_eval_payload(frames: list[str], context: str, *, model: str, chat: bool = False) -> dict[str, Any]:
    """The request lmms-eval sends: the simple model's text-then-frames, or the chat model's
    frames-then-text (a video task's usual message), with its default max_tokens and temperature."""
    images = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{frame}"}} for frame in frames
    ]
    text = [{"type": "text", "text": context}]
    content = [*images, *text] if chat else [*text, *images]
    return {
        "messages": [{"role": "user", "content": content}],
        "model": model,
        "max_tokens": 1024,
        "temperature": 0,
    }


def video_payload(mp4: bytes, context: str, *, model: str) -> dict[str, Any]:
    """The same clip and text as one MP4 ``video_url``, with the same defaults."""
    url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": context}]
    return {
        "messages": [{"role": "user", "content": content}],
        "model": model,
        "max_tokens": 1024,
        "temperature": 0,
    }


@pytest.fixture(scope="module")
def moving_clip() -> np.ndarray:
    """17 frames of 48x80 (not the model's size): a red square moving right."""
    frames = np.zeros((17, 48, 80, 3), dtype=np.uint8)
    for index in range(17):
        frames[index, 16:32, 8 + 3 * index : 24 + 3 * index] = (220, 40, 40)
    return frames


def job_of(live: LiveService, completion: Any) -> dict[str, Any]:
    job: dict[str, Any] = httpx.get(f"{live.url}/jobs/{completion.job_id}").json()
    return job


@pytest.mark.parametrize("chat", [False, True], ids=["simple", "chat"])
def test_lmms_eval_frames_are_captioned(
    client: openai.OpenAI, live: LiveService, moving_clip: np.ndarray, chat: bool
) -> None:
    payload = lmms_eval_payload(sampled_frames(moving_clip), "a shape", model="univigu-tiny", chat=chat)
    completion = client.chat.completions.create(**payload, extra_body={"steps": 2})
    job = job_of(live, completion)
    # (The random tiny model's caption may be empty: with seed 0 it can sample </s> first.)
    assert job["status"] == "succeeded" and completion.choices[0].message.content == job["result"]["caption"]
    # max_tokens 1024 is a ceiling above the tiny model's 48: the longest caption; temperature 0: seed 0.
    assert job["params"] == {"prompt": "a shape", "max_tokens": 48, "seed": 0, "steps": 2}
    assert completion.usage is not None and completion.usage.completion_tokens == 48


def test_refusals_name_the_part(client: openai.OpenAI, moving_clip: np.ndarray) -> None:
    frame = f"data:image/png;base64,{png(moving_clip[0])}"

    def send(content: list[dict[str, Any]], **options: Any) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model="univigu", messages=[{"role": "user", "content": content}], **options
            )
        return refused.value

    def image(url: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": url}}

    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    both = send([video, image(frame)])
    assert (both.status_code, both.param) == (400, "messages") and "not both" in both.message

    remote = send([image("https://example.com/frame.png")])
    assert (remote.code, remote.param) == ("unsupported_url", "messages[0].content[0].image_url.url")
    assert "data:image/png;base64" in remote.message

    gif = send([image(frame), image("data:image/gif;base64,R0lGODlh")])
    assert gif.param == "messages[0].content[1].image_url.url" and "image/png" in gif.message

    not_png = send([image("data:image/png;base64," + base64.b64encode(b"not an image at all").decode())])
    assert (not_png.status_code, not_png.code) == (415, "invalid_video")

    buffer = io.BytesIO()
    Image.fromarray(moving_clip[1]).save(buffer, format="JPEG")
    jpeg = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    mixed = send([image(frame), image(jpeg)])
    assert (mixed.status_code, mixed.code) == (415, "invalid_video") and "mix PNG and JPEG" in mixed.message

    too_many = send([image(frame)] * 130)
    assert too_many.param == "messages" and "at most 129 frames" in too_many.message

    rate = send([image(frame)], extra_body={"frames_fps": 0})
    assert rate.status_code == 400 and rate.param == "frames_fps"

    with pytest.raises(openai.APIStatusError) as split:
        client.chat.completions.create(
            model="univigu",
            messages=[
                {"role": "user", "content": [image(frame)]},
                {"role": "user", "content": [image(frame)]},
            ],
        )
    assert "one user message" in split.value.message


@pytest.fixture
def no_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A gateway whose toy-sized model was published but that has no worker: a chat request answers 504
    at once and its job keeps its upload, the clip the worker would read. Yields the URL and uploads."""
    settings = make_settings(tmp_path / "results", redis_url=redis_server.url, chat_timeout_seconds=0.1)
    redis = connect_redis(settings)
    defaults = {"height": SIDE, "width": SIDE, "num_frames": FRAMES, "fps": FPS, "steps": 20}
    job_store(settings, redis).publish_model(
        ServedModel(preset="toy", max_caption_tokens=32, defaults=defaults)
    )
    redis.close()
    with serve_gateway(settings) as url:
        yield url, settings.results_dir / "uploads"


@pytest.mark.parametrize(
    ("count", "frames_fps", "clip_frames"),
    [(10, None, FRAMES), (32, None, FRAMES), (1, None, FRAMES), (10, FPS, 9)],
    ids=["10 spread", "32 thinned", "1 held", "10 at 8 fps"],
)
def test_frames_become_a_clip_of_the_models_size_and_length(
    no_worker: tuple[str, Path], moving_clip: np.ndarray, count: int, frames_fps: int | None, clip_frames: int
) -> None:
    url, uploads = no_worker
    payload = lmms_eval_payload(sampled_frames(moving_clip, count)[:count], "", model="univigu")
    extra = {} if frames_fps is None else {"frames_fps": frames_fps}
    with (
        openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as sdk,
        pytest.raises(openai.APIStatusError) as waited,
    ):
        sdk.chat.completions.create(**payload, extra_body=extra)
    assert waited.value.status_code == 504
    clip = uploads / f"{waited.value.response.headers['x-job-id']}.upload"
    # What the worker makes of it: the model's fps, at most its frame count, 4k+1 frames.
    frames = read_video(clip, height=SIDE, width=SIDE, fps=FPS, max_frames=FRAMES)
    assert frames.shape == (clip_frames, SIDE, SIDE, 3)
    shown = detect(frames)
    assert (shown.colour, shown.shape, shown.motion) == ("red", "square", "still" if count == 1 else "right")


@pytest.fixture(scope="module")
def toy(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """A gateway and one worker serving the shipped toy-world model."""
    with live_service(redis_server, tmp_path_factory.mktemp("toy"), TOY_MODEL, warmup_steps=0) as service:
        yield service


def test_toy_clips_sent_as_lmms_eval_frames_are_captioned_like_the_mp4s(
    toy: LiveService, tmp_path: Path
) -> None:
    """Ten toy clips, each sent twice with the same text and lmms-eval's defaults (temperature 0, so both
    get seed 0): as the MP4 and as the ten PNG frames lmms-eval samples from it. The captions must name
    the same colour, shape and motion on at least nine."""
    agree, right = 0, {"video": 0, "frames": 0}
    with openai.OpenAI(base_url=f"{toy.url}/v1", api_key="k", max_retries=0) as sdk:
        for index, scene in enumerate(scenes(10, held_out=False, seed=2026)):
            mp4 = write_mp4(render(scene), tmp_path / f"{index}.mp4", fps=FPS)
            decoded = read_video(mp4, height=SIDE, width=SIDE, fps=FPS, max_frames=FRAMES)  # decord's frames
            answers = {
                "video": sdk.chat.completions.create(
                    **video_payload(mp4.read_bytes(), CONTEXT, model="univigu")
                ),
                "frames": sdk.chat.completions.create(
                    **lmms_eval_payload(sampled_frames(decoded), CONTEXT, model="univigu")
                ),
            }
            said = {
                form: parse_description(answer.choices[0].message.content or "")
                for form, answer in answers.items()
            }
            agree += said["video"] == said["frames"]
            for form, attributes in said.items():
                right[form] += attributes.matches(Attributes.of(scene))["all"]
    assert agree >= 9, (agree, right)
