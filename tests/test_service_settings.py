from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.contract.settings import Settings


def test_environment_prefix_and_redis_url_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/1")
    monkeypatch.setenv("UNIVIGU_MAX_QUEUE_LENGTH", "7")
    monkeypatch.setenv("UNIVIGU_API_KEYS", "alpha, beta,")
    settings = Settings()
    assert settings.redis_url == "redis://example:6380/1"
    assert settings.max_queue_length == 7
    assert settings.api_keys == ["alpha", "beta"]


def test_prefixed_redis_url_wins_over_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    monkeypatch.setenv("UNIVIGU_REDIS_URL", "redis://prefixed:6379/0")
    assert Settings().redis_url == "redis://prefixed:6379/0"


def test_defaults_state_the_worker_lost_bound() -> None:
    settings = Settings()
    assert settings.port == 8000
    assert settings.worker_lost_bound_seconds <= 15


@pytest.mark.parametrize(
    "overrides",
    [{"min_size": 512, "max_size": 256}, {"heartbeat_interval_seconds": 5, "heartbeat_ttl_seconds": 2}],
)
def test_inconsistent_settings_are_rejected(overrides: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)
