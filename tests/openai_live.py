"""The fixtures of the tests that drive /v1/ with the official `openai` package (test_openai_*.py).

``live, client = openai_fixtures("openai-chat")`` at the top of a test module gives it two fixtures:
``live``, a gateway on HTTP next to a ready tiny worker (``live_http.live_service``, one per module, in a
temporary folder named after the argument), and ``client``, the SDK pointed at its ``/v1`` (one per test).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from live_http import LiveService, live_service

from service.cli.redis_server import RedisServer


def openai_fixtures(directory: str) -> tuple[Any, Any]:
    """``(live, client)`` fixtures for a test module; ``directory`` names its temporary folder."""

    @pytest.fixture(scope="module")
    def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
        with live_service(redis_server, tmp_path_factory.mktemp(directory)) as service:
            yield service

    @pytest.fixture
    def client(live: LiveService) -> Iterator[openai.OpenAI]:
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key="test-key", max_retries=0) as sdk:
            yield sdk

    return live, client
