"""Property-based fuzzing of the whole HTTP API, generated from the app's own OpenAPI schema.

schemathesis turns ``app.openapi()`` into hypothesis strategies for every operation in it, so a route
added later (e.g. the OpenAI-compatible ``/v1/...`` routes) is fuzzed without touching this file. Both
schema-conforming (positive) and schema-violating (negative) requests go over real HTTP to a live
gateway on a real Redis, with API keys on. Each answer must be no 5xx, a documented status with the
documented content type and body schema, and, for every 4xx, the error envelope (OpenAI's error
shape under ``/v1/``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_http import serve_gateway
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.contract.schemas import ServedModel
from service.contract.settings import Settings
from service.gateway.app import create_app

# Per generation mode; the whole test stays well under 90 s on two CPU cores.
EXAMPLES_PER_MODE = 400
API_KEY = "fuzz-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def assert_error_envelope(path: str, status: int, body: object) -> None:
    """Our envelope, or OpenAI's error shape under ``/v1/`` (the compatible layer's own)."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    fields = {"message", "type", "param", "code"} if path.startswith("/v1/") else {"code", "message", "param"}
    assert set(error) == fields, body
    assert isinstance(error["code"], str) and error["code"] and error["message"], body
    assert status < 500, body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzz_every_operation_of_the_openapi_schema(
    settings_factory: Callable[..., Settings], mode: GenerationMode, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings_factory(
        api_keys=[API_KEY],
        max_queue_length=100_000,  # positive submits pile up: no worker drains them here
        heartbeat_interval_seconds=1.0,
        heartbeat_ttl_seconds=3600.0,
    )
    app = create_app(config)
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = {
        f"{result.ok().method.upper()} {result.ok().path}" for result in schema.get_all_operations()
    }
    statuses: dict[str, set[int]] = {}
    cases = 0

    with serve_gateway(config) as url:
        store = app.state.services.store
        store.worker_alive("fuzz-worker")  # /readyz and /model answer as with a live worker
        tiny = {
            "height": 64,
            "width": 64,
            "num_frames": 17,
            "fps": 8,
            "steps": 8,
        }  # as a tiny worker publishes them
        store.publish_model(ServedModel(preset="tiny", max_caption_tokens=48, defaults=tiny))

        @settings(
            max_examples=EXAMPLES_PER_MODE,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            nonlocal cases
            cases += 1
            case = data.draw(schema.as_strategy(generation_mode=mode))
            response = case.call(base_url=url, headers={"X-API-Key": API_KEY}, timeout=30)
            case.validate_response(response, checks=CHECKS)
            label = f"{case.method.upper()} {case.operation.path}"
            statuses.setdefault(label, set()).add(response.status_code)
            if response.status_code >= 400:
                assert_error_envelope(case.operation.path, response.status_code, response.json())

        fuzz()

    with capsys.disabled():
        print(
            f"\nfuzz {mode}: {cases} cases over {len(statuses)} of {len(operations)} operations: {statuses}"
        )
    assert cases >= EXAMPLES_PER_MODE // 2
    assert len(statuses) >= len(operations) // 2, f"only {sorted(statuses)} of {sorted(operations)} reached"
