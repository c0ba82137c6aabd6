"""The gateway over a real Redis, without workers: validation, envelope, idempotency, cancel, listing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import assert_envelope
from fastapi.testclient import TestClient

from service.cli.redis_server import free_port
from service.contract.schemas import JobResult, JobStatus
from service.contract.settings import Settings
from service.gateway.app import create_app


def queue_length(client: TestClient) -> int:
    return client.app.state.services.queue.depth()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param", "hint"),
    [
        ({"prompt": "a cat", "height": 250}, "height", "multiple of 16"),
        ({"prompt": "a cat", "width": 4096}, "width", "less than or equal to 1280"),
        ({"prompt": "a cat", "num_frames": 20}, "num_frames", "4k+1"),
        ({"prompt": "a cat", "num_frames": 133}, "num_frames", "less than or equal to 129"),
        ({"prompt": "a cat", "steps": 0}, "steps", "greater than or equal to 1"),
        ({"prompt": "a cat", "steps": 101}, "steps", "less than or equal to 100"),
        ({"prompt": "a cat", "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ({"prompt": "a cat", "fps": 0}, "fps", "greater than or equal to 1"),
        ({"prompt": "a cat", "seed": -5}, "seed", "greater than or equal to 0"),
        ({"prompt": "a cat", "height": "tall"}, "height", "integer"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({"height": 64}, "prompt", "required"),
        ({"prompt": "a cat", "colour": "red"}, "colour", "unknown field"),
    ],
)
def test_bad_generate_parameters_answer_422_and_never_reach_the_queue(
    client: TestClient, body: dict, param: str, hint: str
) -> None:
    error = assert_envelope(client.post("/generate", json=body), 422, "invalid_parameter", param)
    assert hint in error["message"]
    assert queue_length(client) == 0


def test_joint_validates_max_tokens(client: TestClient) -> None:
    response = client.post("/joint", json={"prompt": "a cat", "max_tokens": 10_000})
    error = assert_envelope(response, 422, "invalid_parameter", "max_tokens")
    assert "less than or equal to 512" in error["message"]
    assert queue_length(client) == 0


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 422, "invalid_parameter"),
    ],
)
def test_malformed_bodies(
    client: TestClient, content: bytes, content_type: str, status: int, code: str
) -> None:
    response = client.post("/generate", content=content, headers={"content-type": content_type})
    assert_envelope(response, status, code)
    assert queue_length(client) == 0


def test_unknown_routes_methods_and_jobs_use_the_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/nope"), 404, "not_found")
    assert_envelope(client.delete("/generate"), 405, "method_not_allowed")
    assert_envelope(client.get(f"/jobs/{'0' * 32}"), 404, "job_not_found", "id")
    assert_envelope(client.get("/jobs/not-an-id"), 422, "invalid_parameter", "job_id")
    assert_envelope(client.get("/jobs?limit=0"), 422, "invalid_parameter", "limit")
    assert_envelope(client.get("/jobs?status=done"), 422, "invalid_parameter", "status")
    assert_envelope(client.get("/jobs?cursor=nan"), 422, "invalid_parameter", "cursor")
    assert_envelope(client.get("/jobs?cursor=soon"), 422, "invalid_parameter", "cursor")


def test_generate_answers_202_with_a_queued_job(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": "a cat", "height": 64, "num_frames": 17})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["type"] == "generate"
    assert job["progress"] == 0
    assert job["queue_position"] == 0
    assert job["params"] == {"prompt": "a cat", "height": 64, "num_frames": 17}
    assert job["error"] is None and job["result"] is None and job["expires_at"] is None
    assert client.get(f"/jobs/{job['id']}").json() == job
    second = client.post("/joint", json={"prompt": "a dog"}).json()
    assert second["type"] == "joint"
    assert second["queue_position"] == 1
    assert queue_length(client) == 2


def test_idempotency_key_replays_the_same_job_and_rejects_a_different_body(client: TestClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/generate", json={"prompt": "a cat", "steps": 4}, headers=headers)
    again = client.post("/generate", json={"steps": 4, "prompt": "a cat"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert queue_length(client) == 1
    changed = client.post("/generate", json={"prompt": "a dog", "steps": 4}, headers=headers)
    assert_envelope(changed, 422, "idempotency_key_reused", "Idempotency-Key")
    other_type = client.post("/joint", json={"prompt": "a cat", "steps": 4}, headers=headers)
    assert_envelope(other_type, 422, "idempotency_key_reused")
    assert queue_length(client) == 1
    assert client.post("/generate", json={"prompt": "a cat", "steps": 4}).json()["id"] != first.json()["id"]


def test_cancel_a_queued_job_removes_it_from_the_queue(client: TestClient) -> None:
    job = client.post("/generate", json={"prompt": "a cat"}).json()
    canceled = client.post(f"/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["error"]["code"] == "canceled"
    assert canceled.json()["expires_at"] is not None
    assert queue_length(client) == 0
    assert_envelope(client.post(f"/jobs/{job['id']}/cancel"), 409, "job_finished", "id")
    assert_envelope(client.get(f"/jobs/{job['id']}/video"), 409, "job_not_succeeded", "id")
    assert_envelope(client.get(f"/jobs/{job['id']}/result"), 409, "job_not_succeeded", "id")


def test_a_huge_prompt_is_quoted_only_by_a_short_prefix(client: TestClient) -> None:
    prompt = "a cat " * 20_000  # 120 KB
    response = client.post("/generate", json={"prompt": prompt})
    error = assert_envelope(response, 422, "invalid_parameter", "prompt")
    assert "at most 2000 characters" in error["message"]
    assert f"({len(prompt)} characters)" in error["message"]
    assert len(response.content) < 400
    assert queue_length(client) == 0


def finished_with_files(client: TestClient) -> str:
    """A succeeded generate job with a video, a result and an upload, as a worker leaves them."""
    services = client.app.state.services  # type: ignore[attr-defined]
    job_id = client.post("/generate", json={"prompt": "a cat"}).json()["id"]
    services.store.start(job_id, "w1")
    services.files.video_target(job_id).write_bytes(b"an mp4")
    services.files.write_json(job_id, {"id": job_id})
    services.store.finish(job_id, JobStatus.succeeded, result=JobResult(video_url=f"/jobs/{job_id}/video"))
    services.files.record_expiry(job_id, 60)
    return job_id


def test_delete_removes_a_finished_job_and_its_files(client: TestClient) -> None:
    job_id = finished_with_files(client)
    files = client.app.state.services.files  # type: ignore[attr-defined]
    assert client.get(f"/jobs/{job_id}/video").content == b"an mp4"
    deleted = client.delete(f"/jobs/{job_id}")
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert not files.job_dir(job_id).exists()
    for path in ("", "/video", "/result"):
        assert_envelope(client.get(f"/jobs/{job_id}{path}"), 404, "job_not_found", "id")
    assert_envelope(client.delete(f"/jobs/{job_id}"), 404, "job_not_found", "id")
    assert job_id not in [job["id"] for job in client.get("/jobs").json()["jobs"]]


def test_delete_cancels_a_queued_job_first(client: TestClient) -> None:
    job_id = client.post("/generate", json={"prompt": "a cat"}).json()["id"]
    assert queue_length(client) == 1
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert queue_length(client) == 0
    assert_envelope(client.get(f"/jobs/{job_id}"), 404, "job_not_found", "id")
    assert_envelope(client.delete(f"/jobs/{'0' * 32}"), 404, "job_not_found", "id")


def test_delete_is_per_api_key(settings_factory: Callable[..., Settings]) -> None:
    one, two = {"X-API-Key": "k-one"}, {"X-API-Key": "k-two"}
    with TestClient(create_app(settings_factory(api_keys=["k-one", "k-two"]))) as client:
        job_id = client.post("/generate", json={"prompt": "a cat"}, headers=one).json()["id"]
        assert_envelope(client.delete(f"/jobs/{job_id}", headers=two), 404, "job_not_found", "id")
        assert client.get(f"/jobs/{job_id}", headers=one).status_code == 200
        assert client.delete(f"/jobs/{job_id}", headers=one).status_code == 204


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        ("bytes=abc", 400, "invalid_range"),
        ("pages=0-1", 400, "invalid_range"),
        ("bytes=4-2", 400, "invalid_range"),
        ("bytes=" + "9" * 500, 400, "invalid_range"),
        ("bytes=100-200", 416, "range_not_satisfiable"),
    ],
)
def test_bad_ranges_answer_in_the_envelope(client: TestClient, header: str, status: int, code: str) -> None:
    job_id = finished_with_files(client)
    for path in ("video", "result"):
        response = client.get(f"/jobs/{job_id}/{path}", headers={"Range": header})
        error = assert_envelope(response, status, code, "Range")
        assert len(error["message"]) < 250
        if status == 416:
            size = client.app.state.services.files.result_json(job_id).stat().st_size  # type: ignore[attr-defined]
            assert response.headers["content-range"] == f"bytes */{6 if path == 'video' else size}"
    good = client.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=1-2"})
    assert (good.status_code, good.content) == (206, b"n ")


def test_list_jobs_filters_and_paginates(client: TestClient) -> None:
    ids = [client.post("/generate", json={"prompt": f"cat {i}"}).json()["id"] for i in range(5)]
    joint = client.post("/joint", json={"prompt": "a dog"}).json()["id"]
    client.post(f"/jobs/{ids[0]}/cancel")

    first = client.get("/jobs?type=generate&limit=2").json()
    assert [job["id"] for job in first["jobs"]] == [ids[4], ids[3]]
    second = client.get(f"/jobs?type=generate&limit=2&cursor={first['next_cursor']}").json()
    assert [job["id"] for job in second["jobs"]] == [ids[2], ids[1]]
    last = client.get(f"/jobs?type=generate&limit=2&cursor={second['next_cursor']}").json()
    assert [job["id"] for job in last["jobs"]] == [ids[0]]
    assert last["next_cursor"] is None

    assert [job["id"] for job in client.get("/jobs?status=canceled").json()["jobs"]] == [ids[0]]
    assert [job["id"] for job in client.get("/jobs?type=joint&status=queued").json()["jobs"]] == [joint]
    assert len(client.get("/jobs").json()["jobs"]) == 6


def test_full_queue_answers_503_with_retry_after(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(max_queue_length=2))) as client:
        for _ in range(2):
            assert client.post("/generate", json={"prompt": "a cat"}).status_code == 202
        response = client.post("/generate", json={"prompt": "one too many"})
        assert_envelope(response, 503, "queue_full")
        assert response.headers["retry-after"] == "5"
        assert queue_length(client) == 2


def test_unreachable_redis_answers_503_quickly(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        for response in (
            client.post("/generate", json={"prompt": "a cat"}),
            client.get(f"/jobs/{'0' * 32}"),
            client.get("/jobs"),
            client.get("/readyz"),
        ):
            assert_envelope(response, 503, "redis_unavailable")
            assert response.headers["retry-after"] == "5"
        assert client.get("/healthz").json() == {"status": "ok"}
        assert "univigu_redis_up 0.0" in client.get("/metrics").text


def test_full_redis_answers_503_and_keeps_what_was_accepted(client: TestClient) -> None:
    """With maxmemory-policy noeviction (as deployed), a full Redis refuses writes; nothing is lost."""
    accepted = client.post("/generate", json={"prompt": "a cat"})
    assert accepted.status_code == 202
    redis = client.app.state.services.store.redis  # type: ignore[attr-defined]  # the server this test run started
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", 1)
    try:
        response = client.post("/generate", json={"prompt": "one more"})
        assert_envelope(response, 503, "redis_full")
        assert response.headers["retry-after"] == "5"
    finally:
        redis.config_set("maxmemory", 0)
    assert client.get(f"/jobs/{accepted.json()['id']}").json()["status"] == "queued"
    assert queue_length(client) == 1


def test_model_is_unknown_until_a_worker_starts(client: TestClient) -> None:
    assert_envelope(client.get("/model"), 503, "no_workers")


def test_readyz_needs_a_live_worker(client: TestClient) -> None:
    response = client.get("/readyz")
    assert_envelope(response, 503, "no_workers")
    assert "retry-after" in response.headers
    client.app.state.services.store.worker_alive("w1")  # type: ignore[attr-defined]
    assert client.get("/readyz").json() == {"status": "ready", "workers": 1}


def test_api_keys_are_required_when_configured(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(api_keys=["k-one", "k-two"]))) as client:
        assert_envelope(client.post("/generate", json={"prompt": "a cat"}), 401, "unauthorized", "X-API-Key")
        wrong = client.get("/jobs", headers={"X-API-Key": "k-on"})
        assert_envelope(wrong, 401, "unauthorized")
        assert client.get("/jobs", headers={"X-API-Key": "k-two"}).status_code == 200
        accepted = client.post("/generate", json={"prompt": "a cat"}, headers={"X-API-Key": "k-one"})
        assert accepted.status_code == 202
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        spec = client.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["ApiKey"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
        }
        assert spec["paths"]["/generate"]["post"]["security"] == [{"ApiKey": []}]


def test_idempotency_keys_are_scoped_per_api_key(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(api_keys=["k-one", "k-two"]))) as client:
        body = {"prompt": "a cat"}
        one = client.post("/generate", json=body, headers={"X-API-Key": "k-one", "Idempotency-Key": "same"})
        two = client.post("/generate", json=body, headers={"X-API-Key": "k-two", "Idempotency-Key": "same"})
        assert one.json()["id"] != two.json()["id"]


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    job = client.post("/generate", json={"prompt": "a cat"}).json()
    client.get(f"/jobs/{job['id']}")
    client.post("/generate", json={"prompt": "a cat", "height": 1})
    text = client.get("/metrics").text
    assert 'univigu_http_requests_total{method="POST",route="/generate",status="202"} 1.0' in text
    assert 'univigu_http_requests_total{method="POST",route="/generate",status="422"} 1.0' in text
    assert 'route="/jobs/{job_id}",status="200"' in text
    assert job["id"] not in text
    assert "univigu_queue_depth{queue=" in text
    assert "univigu_workers_busy 0.0" in text


def test_openapi_documents_the_limits(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    height = spec["components"]["schemas"]["GenerateRequest"]["properties"]["height"]
    bounds = height["anyOf"][0]
    assert (bounds["minimum"], bounds["maximum"], bounds["multipleOf"]) == (16, 1280, 16)
    assert "multipart/form-data" in spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_an_idempotency_key_whose_job_expired_starts_a_new_job(client: TestClient) -> None:
    headers = {"Idempotency-Key": "old"}
    first = client.post("/generate", json={"prompt": "a cat"}, headers=headers).json()["id"]
    store = client.app.state.services.store  # type: ignore[attr-defined]
    store.redis.delete(f"{store.prefix}:job:{first}")  # the record expired
    again = client.post("/generate", json={"prompt": "a dog"}, headers=headers)
    assert again.status_code == 202
    assert again.json()["id"] != first
    assert (
        client.post("/generate", json={"prompt": "a dog"}, headers=headers).json()["id"] == again.json()["id"]
    )
