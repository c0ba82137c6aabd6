"""Liveness, readiness and Prometheus metrics (no API key: scraped by the platform)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.contract.schemas import ServedModel
from service.gateway.dependencies import ServicesDep
from service.gateway.errors import HttpError
from service.gateway.job_actions import require_served_model
from service.gateway.routes._responses import error_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
def readyz(services: ServicesDep) -> dict[str, int | str]:
    """Redis answers and at least one worker sent a heartbeat recently."""
    services.store.redis.ping()
    workers = services.store.live_workers(services.settings.heartbeat_ttl_seconds)
    if workers == 0:
        raise HttpError(
            503,
            "no_workers",
            "no live worker; start one with `univigu worker`",
            headers={"Retry-After": str(services.settings.retry_after_seconds)},
        )
    return {"status": "ready", "workers": workers}


@router.get("/model", response_model=ServedModel, responses=error_responses(503))
def served_model(services: ServicesDep) -> ServedModel:
    """The served model's preset, caption limit and the defaults of omitted options."""
    return require_served_model(services)


@router.get("/metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
