"""Finished jobs expire with their files: the record after result_ttl_seconds, the files at the next
clean-up, and only files whose expiry was recorded with them (a fresh or foreign Redis deletes nothing)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_envelope, queued, wait_for
from fastapi.testclient import TestClient

from service.contract.connection import connect_redis, job_store
from service.contract.result_files import ResultFiles
from service.contract.schemas import JobResult, JobStatus
from service.contract.settings import Settings
from service.gateway.app import create_app


def test_results_expire_and_are_deleted(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(result_ttl_seconds=1, cleanup_interval_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        job_id = client.post("/generate", json={"prompt": "short-lived"}).json()["id"]
        services.store.start(job_id, "w1")
        video = services.files.video_target(job_id)
        video.write_bytes(b"an mp4")
        services.files.write_json(job_id, {"id": job_id})
        services.store.finish(
            job_id, JobStatus.succeeded, result=JobResult(video_url=f"/jobs/{job_id}/video")
        )
        services.files.record_expiry(job_id, settings.result_ttl_seconds)  # as the worker does
        assert client.get(f"/jobs/{job_id}/video").content == b"an mp4"

        wait_for(lambda: not services.files.job_dir(job_id).exists(), timeout=15, what="the files to go")
        assert_envelope(client.get(f"/jobs/{job_id}"), 404, "job_not_found")


@pytest.fixture
def files(tmp_path: Path) -> ResultFiles:
    files = ResultFiles(tmp_path / "results")
    files.ensure_dirs()
    return files


def job_with_files(files: ResultFiles, job_id: str, *, expires_in: float | None) -> str:
    files.video_target(job_id).write_bytes(b"an mp4")
    files.upload(job_id).write_bytes(b"its input")
    if expires_in is not None:
        files.record_expiry(job_id, expires_in)
    return job_id


def test_the_cleaner_deletes_only_what_has_provably_expired(settings: Settings, files: ResultFiles) -> None:
    # `settings` has a namespace no job was ever written to: a fresh Redis as far as these files know.
    store = job_store(settings, connect_redis(settings))
    expired = job_with_files(files, "expired", expires_in=-1)
    not_yet = job_with_files(files, "not-yet", expires_in=3600)
    unrecorded = job_with_files(files, "unrecorded", expires_in=None)  # e.g. written before this rule
    still_held = job_with_files(files, "held", expires_in=-1)
    queued(store, still_held)  # Redis still holds its record: the files stay with it

    assert files.clean_expired(store) == 1
    assert not files.job_dir(expired).exists()
    assert not files.upload(expired).exists()
    for kept in (not_yet, unrecorded, still_held):
        assert files.video(kept).read_bytes() == b"an mp4"
        assert files.upload(kept).exists()


def test_an_expiry_is_recorded_only_for_a_job_with_files(files: ResultFiles) -> None:
    files.record_expiry("nothing-written", 60)
    assert not files.job_dir("nothing-written").exists()
    files.upload("upload-only").write_bytes(b"its input")
    files.record_expiry("upload-only", 60)
    assert files.expires_at("upload-only") == pytest.approx(time.time() + 60, abs=5)


def test_an_upload_whose_job_never_came_to_be_goes_once_its_expiry_passed(
    settings: Settings, files: ResultFiles
) -> None:
    store = job_store(settings, connect_redis(settings))
    orphan = files.new_upload("orphan", -1)  # the gateway stopped before it created the job
    orphan.write_bytes(b"half a video")
    waiting = files.new_upload("waiting", -1)
    queued(store, "waiting")  # queued for longer than its upload's first expiry: its record holds it
    fresh = files.new_upload("fresh", 3600)

    assert files.clean_expired(store) == 1
    assert not orphan.exists() and not files.job_dir("orphan").exists()
    assert waiting.exists() and fresh.exists()
