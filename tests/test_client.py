"""service.client and `univigu submit` against a live gateway (HTTP) and a tiny CPU worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import imageio_ffmpeg
import pytest
from conftest import REPO, TINY_VIDEO, settings_env
from live_http import LiveService, buffering_proxy, live_service, serve_app, serve_gateway
from prometheus_client.parser import text_string_to_metric_families

from service.cli.redis_server import RedisServer
from service.client import ApiError, Client, WaitTimeout
from service.contract.schemas import Job, JobStatus, JobType

pytestmark = pytest.mark.slow

# Runs long enough to be caught queued or running (it is canceled, never run to the end); 64x64x17
# finished before the cancel once workers warm up.
LONG_VIDEO = {"height": 128, "width": 128, "num_frames": 33, "steps": 100}
# Runs for seconds, in many progress states.
STEPPED_VIDEO = {"height": 64, "width": 64, "num_frames": 9, "steps": 60}


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    # Streams read every 0.05 s, so that even a fast machine shows a few live states of a short job.
    with live_service(redis_server, tmp_path_factory.mktemp("client"), events_poll_seconds=0.05) as service:
        yield service


@pytest.fixture
def client(live: LiveService) -> Iterator[Client]:
    with Client(live.url) as http:
        yield http


def frame_count(path: Path) -> int:
    """Decode the whole file with ffmpeg (a broken MP4 raises)."""
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return frames


def test_generate_wait_and_download_a_playable_mp4(client: Client, tmp_path: Path) -> None:
    job = client.generate("a red ball rolls", seed=1, **TINY_VIDEO)
    assert isinstance(job, Job)
    assert job.type == JobType.generate and job.status in (JobStatus.queued, JobStatus.running)
    assert job.params == {"prompt": "a red ball rolls", "seed": 1, **TINY_VIDEO}  # None options left out

    seen: list[Job] = []
    done = client.wait(job.id, timeout=120, on_progress=seen.append)
    assert done.status == JobStatus.succeeded, done.error
    assert done.progress == 100
    progress = [state.progress for state in seen]
    assert progress == sorted(progress) and progress[-1] == 100
    assert seen[-1] == done

    assert client.get(job.id) == done
    assert job.id in [listed.id for listed in client.jobs(type="generate", status="succeeded").jobs]

    saved = client.download(job.id, tmp_path / "nested" / "ball.mp4")
    assert saved == tmp_path / "nested" / "ball.mp4"
    assert frame_count(saved) == TINY_VIDEO["num_frames"]
    assert list(saved.parent.iterdir()) == [saved], "a temporary file was left behind"
    assert client.result(job.id)["params"]["prompt"] == "a red ball rolls"


def test_joint_then_caption_its_video(client: Client, tmp_path: Path) -> None:
    # Seeded: unseeded, the random tiny model now and then samples </s> first and the caption is empty.
    joint = client.wait(client.joint("a cat", max_tokens=8, seed=3, **TINY_VIDEO).id, timeout=120)
    assert joint.status == JobStatus.succeeded, joint.error
    assert joint.result is not None and joint.result.caption
    video = client.download(joint.id, tmp_path / "cat.mp4")  # auto: the video of a joint job
    assert frame_count(video) == TINY_VIDEO["num_frames"]

    job = client.caption(video, prompt="an animal", steps=2, max_tokens=8, seed=4, video_reuse=2)
    assert job.type == JobType.caption
    assert job.params == {"prompt": "an animal", "steps": 2, "max_tokens": 8, "seed": 4, "video_reuse": 2}
    done = client.wait(job.id, timeout=120)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None and done.result.caption

    saved = client.download(job.id, tmp_path / "cat.json")  # auto: the result JSON of a caption job
    assert json.loads(saved.read_text())["caption"] == done.result.caption
    with pytest.raises(ApiError) as no_video:
        client.download(job.id, tmp_path / "none.mp4", what="video")
    assert (no_video.value.status, no_video.value.code) == (404, "no_video")
    assert not (tmp_path / "none.mp4").exists()
    assert not list(tmp_path.glob(".*.part"))


def test_errors_carry_the_api_code_status_and_param(client: Client, tmp_path: Path) -> None:
    with pytest.raises(ApiError) as invalid:
        client.generate("a ball", height=33, width=32)
    assert (invalid.value.status, invalid.value.code, invalid.value.param) == (
        422,
        "invalid_parameter",
        "height",
    )
    assert "multiple of 16" in invalid.value.message
    assert "invalid_parameter" in str(invalid.value)

    with pytest.raises(ApiError) as missing:
        client.get("0" * 32)
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "job_not_found", "id")

    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ApiError) as unreadable:
        client.caption(not_a_video)
    assert (unreadable.value.status, unreadable.value.code) == (415, "invalid_video")


def test_wait_times_out_then_cancel_stops_the_job(client: Client) -> None:
    job = client.generate("a long one", **LONG_VIDEO)
    with pytest.raises(WaitTimeout) as timeout:
        client.wait(job.id, timeout=0.3)
    assert timeout.value.job.id == job.id
    assert not timeout.value.job.status.terminal
    assert job.id in str(timeout.value)

    canceled = client.cancel(job.id)
    assert canceled.id == job.id
    assert canceled.status in (JobStatus.canceled, JobStatus.running)  # a running job stops at its next step
    done = client.wait(job.id, timeout=60)
    assert done.status == JobStatus.canceled

    with pytest.raises(ApiError) as finished:
        client.cancel(job.id)
    assert (finished.value.status, finished.value.code, finished.value.param) == (409, "job_finished", "id")


def requests_by_route(url: str) -> dict[str, float]:
    """The gateway's GET request counts by route template, from its Prometheus metrics."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "univigu_http_requests_total" and sample.labels["method"] == "GET":
                route = sample.labels["route"]
                counts[route] = counts.get(route, 0.0) + sample.value
    return counts


def test_wait_follows_the_event_stream_instead_of_polling(client: Client, live: LiveService) -> None:
    job = client.generate("a green circle", seed=4, **STEPPED_VIDEO)
    before = requests_by_route(live.url)
    seen: list[Job] = []
    done = client.wait(job.id, timeout=120, on_progress=seen.append)
    after = requests_by_route(live.url)
    assert done.status == JobStatus.succeeded and seen[-1] == done
    assert any(0 < state.progress < 100 for state in seen), [state.progress for state in seen]
    assert after.get("/jobs/{job_id}/events", 0) == before.get("/jobs/{job_id}/events", 0) + 1
    assert after.get("/jobs/{job_id}", 0) == before.get("/jobs/{job_id}", 0), "wait() polled"


def test_wait_polls_when_a_proxy_buffers_the_event_stream(client: Client, live: LiveService) -> None:
    paths: list[str] = []
    busy = client.generate("keeps the one worker busy", **LONG_VIDEO)  # so the job waits, its stream silent
    seen: list[Job] = []

    def follow(job: Job) -> None:
        if not seen:  # the first state wait() sees comes from polling: let the job run now
            client.cancel(busy.id)
        seen.append(job)

    with serve_app(buffering_proxy(live.url, paths)) as url, Client(url) as proxied:
        job = proxied.generate("a yellow square", seed=6, **TINY_VIDEO)
        done = proxied.wait(job.id, timeout=120, on_progress=follow, silence_seconds=1.0)
    assert done.status == JobStatus.succeeded and seen[-1] == done
    assert paths.count(f"/jobs/{job.id}/events") == 1, "the silent stream was given up, not retried"
    assert paths.count(f"/jobs/{job.id}") >= 1, "then it polled"
    assert paths.index(f"/jobs/{job.id}/events") < paths.index(f"/jobs/{job.id}")


def test_api_key_is_sent_in_the_configured_header(live: LiveService) -> None:
    settings = live.settings.model_copy(update={"api_keys": ["s3cret"], "api_key_header": "X-Token"})
    with serve_gateway(settings) as url:
        with Client(url) as anonymous, pytest.raises(ApiError) as refused:
            anonymous.jobs()
        assert (refused.value.status, refused.value.code, refused.value.param) == (
            401,
            "unauthorized",
            "X-Token",
        )
        with Client(url, api_key="s3cret", api_key_header="X-Token") as keyed:
            assert keyed.jobs(limit=1).jobs is not None


def run_cli(live: LiveService, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli", "submit", "--url", live.url, *args]
    env = settings_env(live.settings) | {"PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def tiny_flags() -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in TINY_VIDEO.items()]


def test_cli_generate_waits_and_saves_the_mp4(live: LiveService, tmp_path: Path) -> None:
    out = tmp_path / "ball.mp4"
    run = run_cli(
        live, "generate", "a red ball", *tiny_flags(), "--seed=2", "--wait", f"--out={out}", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert "100%" in run.stderr  # the progress bar reached the end
    assert f"saved {out}" in run.stderr
    assert frame_count(out) == TINY_VIDEO["num_frames"]


def test_cli_joint_then_caption_save_outputs_and_print_captions(live: LiveService, tmp_path: Path) -> None:
    run = run_cli(
        live, "joint", "a cat", *tiny_flags(), "--max-tokens=8", "--wait", "--out=cat.mp4", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "cat.json").read_text())
    assert run.stdout.strip() == result["caption"]
    assert frame_count(tmp_path / "cat.mp4") == TINY_VIDEO["num_frames"]

    captioned = run_cli(
        live, "caption", "cat.mp4", "--steps=2", "--max-tokens=8", "--video-reuse=2", "--wait", cwd=tmp_path
    )
    assert captioned.returncode == 0, captioned.stderr
    (saved,) = set(tmp_path.glob("*.json")) - {tmp_path / "cat.json"}  # default name: <job id>.json
    assert captioned.stdout.strip() == json.loads(saved.read_text())["caption"]


def test_cli_without_wait_prints_the_job_and_reports_api_errors(live: LiveService, tmp_path: Path) -> None:
    queued = run_cli(live, "generate", "a dog", *tiny_flags(), cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    job = Job.model_validate_json(queued.stdout)
    assert job.params["prompt"] == "a dog"

    invalid = run_cli(live, "generate", "a dog", "--num-frames=6", "--wait", cwd=tmp_path)
    assert invalid.returncode == 2
    assert "invalid_parameter" in invalid.stderr and "num_frames" in invalid.stderr
    assert list(tmp_path.iterdir()) == []  # nothing saved
