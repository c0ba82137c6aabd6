"""End to end: the gateway (in-process ASGI) and a live `univigu worker --preset tiny` on one real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    TINY_VIDEO,
    WorkerProcess,
    assert_envelope,
    make_settings,
    unpublished_tokenizer,
    wait_for,
)
from fastapi.testclient import TestClient

from model.media import read_video, write_mp4
from service.cli.redis_server import RedisServer, free_port
from service.contract.settings import Settings
from service.gateway.app import create_app

pytestmark = pytest.mark.slow

FINISHED = {"succeeded", "failed", "canceled"}
# Long enough to watch (tens of steps at 64x64 on a CPU, on a worker that warmed up before its first
# job, so no step pays first-use costs), short enough when it runs to the end.
SLOW_VIDEO = {"height": 64, "width": 64, "num_frames": 17, "steps": 48}


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One worker for the whole module (it loads the model once, like in production)."""
    directory = tmp_path_factory.mktemp("e2e")
    settings = make_settings(
        directory / "results", redis_url=redis_server.url, worker_metrics_port=free_port()
    )
    worker = WorkerProcess(settings, directory / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            worker.wait_ready(client)
            yield client
    finally:
        worker.stop()


def settings_of(client: TestClient) -> Settings:
    return client.app.state.services.settings  # type: ignore[attr-defined, no-any-return]


def watch(client: TestClient, job_id: str, timeout: float = 180.0) -> tuple[dict, list[int]]:
    """Poll a job to its end, recording every progress value seen."""
    seen: list[int] = []

    def finished() -> dict | None:
        job = client.get(f"/jobs/{job_id}").json()
        seen.append(job["progress"])
        return job if job["status"] in FINISHED else None

    job = wait_for(finished, timeout=timeout, interval=0.02, what=f"job {job_id} to finish")
    return job, seen


def decode(content: bytes, tmp_path: Path, *, height: int, width: int) -> np.ndarray:
    path = tmp_path / "downloaded.mp4"
    path.write_bytes(content)
    return read_video(path, height=height, width=width, fps=8, max_frames=81)


def test_generate_end_to_end_progress_rises_and_the_mp4_plays(live: TestClient, tmp_path: Path) -> None:
    submitted = live.post("/generate", json={"prompt": "a red ball rolls", "seed": 3, **SLOW_VIDEO})
    assert submitted.status_code == 202
    job, seen = watch(live, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    assert seen == sorted(seen), "progress decreased"
    assert len({p for p in seen if 0 < p < 100}) >= 2, f"progress did not rise step by step: {seen}"
    assert job["progress"] == 100
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
    assert job["expires_at"] > job["finished_at"]
    result = job["result"]
    assert result["video_url"] == f"/jobs/{job['id']}/video"
    assert (result["num_frames"], result["height"], result["width"]) == (17, 64, 64)

    video = live.get(result["video_url"])
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4"
    frames = decode(video.content, tmp_path, height=64, width=64)
    assert frames.shape == (17, 64, 64, 3)

    head = live.get(result["video_url"], headers={"Range": "bytes=0-99"})
    assert head.status_code == 206
    assert head.content == video.content[:100]
    assert head.headers["content-range"] == f"bytes 0-99/{len(video.content)}"

    stored = live.get(result["result_url"]).json()
    assert stored["params"]["prompt"] == "a red ball rolls"
    assert stored["num_frames"] == 17
    # Every effective parameter and the model, in the job and its result file alike.
    assert result["params"] == {**stored["params"], "seed": 3, "step_cache": None, "negative_prompt": None}
    served = live.get("/model").json()
    assert result["params"]["guidance_scale"] == served["defaults"]["guidance_scale"]
    assert result["model"] == stored["model"]
    assert (result["model"]["preset"], result["model"]["weights_sha256"]) == (
        "tiny",
        served["weights_sha256"],
    )


def test_joint_end_to_end_has_video_and_caption(live: TestClient, tmp_path: Path) -> None:
    # Seeded: unseeded, the random tiny model now and then samples </s> first and the caption is empty.
    body = {"prompt": "a cat", "max_tokens": 12, "seed": 3, **TINY_VIDEO}
    job_id = live.post("/joint", json=body).json()["id"]
    job, _ = watch(live, job_id)
    assert job["status"] == "succeeded", job
    assert job["result"]["caption"]
    assert decode(live.get(job["result"]["video_url"]).content, tmp_path, height=32, width=32).shape[0] == 5
    assert live.get(job["result"]["result_url"]).json()["caption"] == job["result"]["caption"]


def test_caption_end_to_end(live: TestClient, tmp_path: Path) -> None:
    clip = write_mp4(
        np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8), tmp_path / "in.mp4", fps=8
    )
    with clip.open("rb") as handle:
        response = live.post(
            "/caption",
            files={"file": ("clip.bin", handle, "application/octet-stream")},
            data={"steps": "3", "max_tokens": "10", "prompt": "describe", "seed": "1"},
        )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["type"] == "caption"
    assert job["params"] == {"steps": 3, "max_tokens": 10, "prompt": "describe", "seed": 1}
    job, _ = watch(live, job["id"])
    assert job["status"] == "succeeded", job
    result = live.get(f"/jobs/{job['id']}/result")
    assert result.headers["content-type"] == "application/json"
    payload = json.loads(result.content)
    assert payload["caption"] == job["result"]["caption"]
    assert len(payload["tokens"]) >= 1
    assert_envelope(live.get(f"/jobs/{job['id']}/video"), 404, "no_video")
    uploads = settings_of(live).results_dir / "uploads"
    assert not (uploads / f"{job['id']}.upload").exists(), "the input upload was not removed"


def test_model_errors_fail_the_job_with_their_code(live: TestClient) -> None:
    # 40 tokens for a model that takes 24: a gateway that knows the tokenizer refuses it at submit (see
    # test_the_worker_publishes_its_model_and_the_gateway_enforces_it); one that does not yet, the worker.
    long_prompt = " ".join(["red"] * 40)
    settings = settings_of(live)
    with unpublished_tokenizer(settings), TestClient(create_app(settings)) as gateway:
        job_id = gateway.post("/joint", json={"prompt": long_prompt, **TINY_VIDEO}).json()["id"]
    job, _ = watch(live, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "prompt_too_long"
    assert job["error"]["param"] == "prompt"


def test_cancel_running_queued_and_finished(live: TestClient) -> None:
    # Still running when the cancel lands (100 steps of 128x128x33 take seconds); it stops at the next step.
    long_video = {**SLOW_VIDEO, "height": 128, "width": 128, "num_frames": 33, "steps": 100}
    running = live.post("/generate", json={"prompt": "long", **long_video}).json()["id"]
    queued = live.post("/generate", json={"prompt": "never runs", **TINY_VIDEO}).json()["id"]
    wait_for(
        lambda: live.get(f"/jobs/{running}").json()["progress"] > 0, timeout=120, what="the job to start"
    )
    assert live.get(f"/jobs/{queued}").json()["queue_position"] == 0

    canceled = live.post(f"/jobs/{queued}/cancel").json()
    assert canceled["status"] == "canceled"
    assert live.post(f"/jobs/{running}/cancel").json()["status"] == "running"
    job, _ = watch(live, running)
    assert job["status"] == "canceled"
    assert job["error"]["code"] == "canceled"
    assert 0 < job["progress"] < 100

    # The worker is free again; the canceled queued job never ran.
    after = live.post("/generate", json={"prompt": "after", **TINY_VIDEO}).json()["id"]
    assert watch(live, after)[0]["status"] == "succeeded"
    never = live.get(f"/jobs/{queued}").json()
    assert never["status"] == "canceled" and never["started_at"] is None and never["result"] is None

    assert_envelope(live.post(f"/jobs/{after}/cancel"), 409, "job_finished")


def test_gateway_and_worker_metrics(live: TestClient) -> None:
    job_id = live.post("/generate", json={"prompt": "metrics", **TINY_VIDEO}).json()["id"]
    assert watch(live, job_id)[0]["status"] == "succeeded"
    gateway = live.get("/metrics").text
    assert "univigu_workers_live 1.0" in gateway
    assert "univigu_queue_depth{queue=" in gateway
    port = settings_of(live).worker_metrics_port
    worker = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'univigu_jobs_finished_total{status="succeeded",type="generate"}' in worker
    assert 'univigu_denoising_step_seconds_count{type="generate"}' in worker
    assert 'univigu_job_queue_wait_seconds_count{type="generate"}' in worker
    assert 'univigu_job_run_seconds_count{type="generate"}' in worker
    assert "univigu_model_load_seconds" in worker
    warmup = [line for line in worker.splitlines() if line.startswith("univigu_model_warmup_seconds ")]
    assert len(warmup) == 1 and float(warmup[0].split()[1]) > 0  # the worker warmed up before serving
    assert "univigu_worker_busy 0.0" in worker
    assert job_id not in worker


def test_readyz_with_a_live_worker(live: TestClient) -> None:
    ready = live.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["workers"] == 1


def test_the_worker_publishes_its_model_and_the_gateway_enforces_it(live: TestClient) -> None:
    model = live.get("/model").json()
    assert model["preset"] == "tiny"
    assert model["max_caption_tokens"] == 48
    assert model["defaults"]["num_frames"] == 17
    too_long = live.post("/joint", json={"prompt": "a cat", **TINY_VIDEO, "max_tokens": 49})
    assert_envelope(too_long, 422, "invalid_parameter", "max_tokens")
    # The tiny model's generate prompt takes 24 tokens (the end token counted), checked at submit.
    assert model["limits"]["generate"]["prompt"]["max_tokens"] == 24 and model["tokenizer_sha256"]
    long_prompt = live.post("/generate", json={"prompt": " ".join(["red"] * 24), **TINY_VIDEO})
    assert_envelope(long_prompt, 422, "prompt_too_long", "prompt")


def test_idempotent_resubmit_returns_the_finished_job(live: TestClient) -> None:
    body = {"prompt": "same", **TINY_VIDEO}
    first = live.post("/generate", json=body, headers={"Idempotency-Key": "e2e-1"}).json()["id"]
    assert watch(live, first)[0]["status"] == "succeeded"
    again = live.post("/generate", json=body, headers={"Idempotency-Key": "e2e-1"})
    assert again.status_code == 202
    assert again.json()["id"] == first
    assert again.json()["status"] == "succeeded"
