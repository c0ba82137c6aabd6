"""A worker group with real processes: `univigu worker` on two CPU devices under torchrun (gloo), a real
Redis and the gateway. Jobs of every mode run across both ranks and give what one process gives; cancel
stops both; a rank killed mid-job fails the job as worker_lost, the group exits non-zero, and a restarted
group serves the next job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import (
    REPO,
    TINY_VIDEO,
    WorkerProcess,
    settings_env,
    unpublished_tokenizer,
    wait_for,
    wait_for_status,
)
from fastapi.testclient import TestClient
from gloo_group import run_on_group

from model.errors import InvalidParameterError
from model.media import write_mp4
from model.parallel import ParallelPlan
from model.pipeline import UniViGUPipeline
from service.contract.settings import Settings
from service.gateway.app import create_app
from worker.group import Rank, WorkerGroup

pytestmark = pytest.mark.slow

GROUP = {"devices": ["cpu", "cpu"], "sequence_parallel": 2, "warmup_steps": 1}
"""Two ranks splitting each pass's tokens (the tiny model has 2 heads); the warm-up runs on the group too."""
LONG_JOB = {"prompt": "a long one", "height": 64, "width": 64, "num_frames": 17, "steps": 100}
FINISHED = {"succeeded", "failed", "canceled"}


@pytest.fixture
def group_settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(**GROUP)


def rank_pids(launcher: WorkerProcess) -> dict[int, int]:
    """The group's processes, by rank: the children of the launcher (torchrun's agent) and their RANK."""
    pid = launcher.process.pid
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    ranks = {}
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next(entry for entry in environ if entry.startswith(b"RANK="))
        ranks[int(rank.removeprefix(b"RANK="))] = child
    return ranks


def upload_caption(client: TestClient, clip: Path, **fields: str) -> str:
    with clip.open("rb") as handle:
        response = client.post("/caption", files={"file": ("clip.mp4", handle, "video/mp4")}, data=fields)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_a_group_serves_every_mode_as_one_process_would(
    group_settings: Settings, start_worker: Callable[[Settings], WorkerProcess], tmp_path: Path
) -> None:
    clip = write_mp4(
        np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8), tmp_path / "in.mp4", fps=8
    )
    with TestClient(create_app(group_settings)) as client:
        start_worker(group_settings).wait_ready(client)
        model = client.get("/model").json()
        assert (model["devices"], model["guidance_parallel"], model["sequence_parallel"]) == (
            ["cpu", "cpu"],
            1,
            2,
        )

        jobs = {
            "generate": client.post("/generate", json={"prompt": "a cat", "seed": 1, **TINY_VIDEO}),
            "joint": client.post(
                "/joint", json={"prompt": "a cat", "max_tokens": 9, "seed": 3, **TINY_VIDEO}
            ),
        }
        ids = {mode: response.json()["id"] for mode, response in jobs.items()}
        ids["caption"] = upload_caption(client, clip, steps="3", max_tokens="7", seed="1")
        done = {mode: wait_for_status(client, job_id, FINISHED) for mode, job_id in ids.items()}
        for mode, job in done.items():
            assert (job["status"], job["progress"]) == ("succeeded", 100), (mode, job)
        assert client.get(done["generate"]["result"]["video_url"]).status_code == 200
        group_tokens = {mode: client.get(f"/jobs/{ids[mode]}/result").json() for mode in ("joint", "caption")}

    pipe = UniViGUPipeline.from_preset("tiny")
    joint = pipe.joint("a cat", max_tokens=9, seed=3, **TINY_VIDEO)
    caption = pipe.caption(clip, steps=3, max_tokens=7, seed=1)
    assert group_tokens["joint"]["caption"] == joint.text
    assert group_tokens["caption"]["tokens"] == caption.tokens


def test_a_refused_and_a_canceled_job_end_on_every_rank_and_the_group_serves_on(
    group_settings: Settings, start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    with TestClient(create_app(group_settings)) as client:
        start_worker(group_settings).wait_ready(client)
        # The gateway counts characters until it knows the tokenizer; the model's (24 tokens for tiny)
        # refuses the prompt on every rank.
        with unpublished_tokenizer(group_settings), TestClient(create_app(group_settings)) as counting_chars:
            wordy = counting_chars.post("/generate", json={"prompt": "word " * 40, **TINY_VIDEO}).json()["id"]
        assert wait_for_status(client, wordy, FINISHED)["error"]["code"] == "prompt_too_long"
        job_id = client.post("/generate", json=LONG_JOB).json()["id"]
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0, timeout=120, what="progress")
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        assert wait_for_status(client, job_id, FINISHED)["status"] == "canceled"
        after = client.post("/generate", json={"prompt": "after", **TINY_VIDEO}).json()["id"]
        assert wait_for_status(client, after, FINISHED)["status"] == "succeeded"


@pytest.mark.parametrize("victim", [1, 0], ids=["follower", "leader"])
def test_a_killed_rank_fails_the_job_worker_lost_and_a_restarted_group_serves_the_next(
    victim: int, group_settings: Settings, start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    with TestClient(create_app(group_settings)) as client:
        group = start_worker(group_settings)
        group.wait_ready(client)
        job_id = client.post("/generate", json=LONG_JOB).json()["id"]
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0, timeout=120, what="progress")

        os.kill(rank_pids(group)[victim], signal.SIGKILL)
        job = wait_for_status(
            client, job_id, FINISHED, timeout=group_settings.worker_lost_bound_seconds + 0.5
        )
        assert (job["status"], job["error"]["code"]) == ("failed", "worker_lost"), job
        assert group.process.wait(timeout=60) != 0, "a broken group exits non-zero so that it is restarted"

        start_worker(group_settings).wait_ready(client)
        after = client.post("/generate", json={"prompt": "after", **TINY_VIDEO}).json()["id"]
        assert wait_for_status(client, after, FINISHED)["status"] == "succeeded"
        assert client.get(f"/jobs/{job_id}").json()["status"] == "failed"


@pytest.mark.parametrize(
    ("group", "model", "message"),
    [
        (
            {"devices": ["cpu", "cpu", "cpu"], "guidance_parallel": 2},
            "tiny",
            "a worker group of 3 devices needs guidance_parallel x sequence_parallel = 3",
        ),
        (  # the toy model has 3 heads; this is found once every rank has loaded it
            {"devices": ["cpu", "cpu"], "sequence_parallel": 2},
            "toy",
            "sequence_parallel must divide the model's 3 attention heads",
        ),
    ],
    ids=["devices", "heads"],
)
def test_a_layout_that_does_not_fit_stops_the_group_with_exit_2(
    group: dict[str, object], model: str, message: str, group_settings: Settings
) -> None:
    misfit = group_settings.model_copy(update=group)
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--preset", model],
        cwd=REPO,
        env=settings_env(misfit),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


def refuse_video_reuse() -> str:
    """Run on both ranks of a group: what a group's leader says to a caption that asks for video reuse, and
    the default it publishes."""
    plan = ParallelPlan.build(1, 2, torch.device("cpu"))
    rank = Rank(dist.get_rank(), 2, dist.get_rank(), "cpu")
    group = WorkerGroup(rank, plan, dist.new_group(backend="gloo"), ["cpu", "cpu"])
    leader = group.lead(UniViGUPipeline.from_preset("tiny"), "native")
    assert leader.defaults.video_reuse == 1  # a group captions exactly
    try:
        leader.caption(np.zeros((5, 32, 32, 3), dtype=np.uint8), video_reuse=2)
    except InvalidParameterError as error:
        return f"{error.param}: {error.message}"
    return "accepted"


def test_a_group_refuses_video_reuse_before_any_rank_runs() -> None:
    message = run_on_group(2, refuse_video_reuse)[0]
    assert message.startswith("video_reuse: video_reuse 2 needs the whole job on one device")
    assert "splits every job across 2 (guidance_parallel 1 x sequence_parallel 2)" in message
