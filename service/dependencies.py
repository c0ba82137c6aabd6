"""What the routes get injected: the gateway's components, the caller's API key and Idempotency-Key.

These dependencies do no I/O, so they are ``async def``: FastAPI runs sync dependencies in the thread
pool, and a thread hop per dependency per request shows up in the gateway's tail latency.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import ApiError
from service.jobs import JobStore
from service.metrics import GatewayMetrics
from service.queue import JobQueue
from service.results import ResultFiles
from service.schemas import RequestModels
from service.settings import Settings

MAX_IDEMPOTENCY_KEY_CHARS = 255


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: JobStore
    queue: JobQueue
    files: ResultFiles
    metrics: GatewayMetrics
    models: RequestModels


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def scope_for_key(settings: Settings, presented: str, *, where: str) -> str:
    """Check an API key (when keys are configured) and return the caller's scope: the value job
    ownership and Idempotency-Keys are keyed by. ``where`` names the header(s) for the 401 message.

    Every configured key is compared in constant time, and all of them are compared, so the answer's
    timing says nothing about which key or how much of it matched.
    """
    keys = settings.api_keys
    if not keys:
        return "anonymous"
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(presented.encode(), key.encode())
    if not matched:
        raise ApiError(
            401,
            "unauthorized",
            f"a valid API key is required in the {where}",
            param=settings.api_key_header,
            headers={"WWW-Authenticate": "ApiKey"},
        )
    return hashlib.sha256(presented.encode()).hexdigest()[:16]


async def client_scope(request: Request, services: ServicesDep) -> str:
    """The native API's caller: the API key in the ``api_key_header`` header (see ``scope_for_key``)."""
    header = services.settings.api_key_header
    return scope_for_key(services.settings, request.headers.get(header, ""), where=f"{header} header")


ClientScope = Annotated[str, Depends(client_scope)]


async def idempotency_key(
    key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Same key and body: the same job. Different body: 422."),
    ] = None,
) -> str | None:
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise ApiError(
            422,
            "invalid_parameter",
            f"Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
            param="Idempotency-Key",
        )
    return key


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
