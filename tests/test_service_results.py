"""Finished jobs expire with their files: the record after result_ttl_seconds, the files at the next clean-up."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from conftest import assert_envelope, wait_for
from fastapi.testclient import TestClient

from service.contract.schemas import JobResult, JobStatus
from service.contract.settings import Settings
from service.gateway.app import create_app
from service.gateway.maintenance import UPLOAD_GRACE_SECONDS


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
        assert client.get(f"/jobs/{job_id}/video").content == b"an mp4"
        stale_upload = services.files.upload("f" * 32)
        stale_upload.write_bytes(b"abandoned")
        old = time.time() - UPLOAD_GRACE_SECONDS - 1
        os.utime(stale_upload, (old, old))
        fresh_upload = services.files.upload("e" * 32)
        fresh_upload.write_bytes(b"still streaming")

        wait_for(lambda: not services.files.job_dir(job_id).exists(), timeout=15, what="the files to go")
        assert_envelope(client.get(f"/jobs/{job_id}"), 404, "job_not_found")
        assert not stale_upload.exists()
        assert fresh_upload.exists()
