"""What the routes get injected: the gateway's components, the caller (API key, rate limit) and its
Idempotency-Key.

These dependencies are ``async def``: FastAPI runs sync dependencies in the thread pool, and a thread
hop per dependency per request shows up in the gateway's tail latency. Only the rate limit does I/O
(one Redis call, in the thread pool), and only when it is on.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from service.contract.metrics import GatewayMetrics
from service.contract.queue import JobQueue
from service.contract.result_files import ResultFiles
from service.contract.schemas import RequestModels
from service.contract.settings import Settings
from service.contract.store import JobStore
from service.gateway.errors import HttpError
from service.gateway.eta import TimingCache
from service.gateway.ratelimit import RateLimiter
from service.gateway.served import ServedLimits

MAX_IDEMPOTENCY_KEY_CHARS = 255


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: JobStore
    queue: JobQueue
    files: ResultFiles
    metrics: GatewayMetrics
    models: RequestModels
    timing: TimingCache
    served: ServedLimits
    rate_limiter: RateLimiter | None = None


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


@dataclass(frozen=True)
class Caller:
    """Who sent a request.

    ``scope`` namespaces the caller's Idempotency-Keys and rate limit. ``owner`` is stored on the jobs
    the caller creates and decides which jobs it may see: a hash of its API key (never the key), or None
    when API keys are off, and then every job is visible to everyone.
    """

    scope: str
    owner: str | None


ANONYMOUS = Caller(scope="anonymous", owner=None)


def authenticate(settings: Settings, presented: str, *, where: str) -> Caller:
    """Check an API key (when keys are configured); ``where`` names the header(s) for the 401 message.

    Every configured key is compared in constant time, and all of them are compared, so the answer's
    timing says nothing about which key or how much of it matched.
    """
    keys = settings.api_keys
    if not keys:
        return ANONYMOUS
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(presented.encode(), key.encode())
    if not matched:
        raise HttpError(
            401,
            "unauthorized",
            f"a valid API key is required in the {where}",
            param=settings.api_key_header,
            headers={"WWW-Authenticate": "ApiKey"},
        )
    digest = hashlib.sha256(presented.encode()).hexdigest()[:16]
    return Caller(scope=digest, owner=digest)


async def spend_rate_limit(request: Request, services: Services, caller: Caller) -> Caller:
    """Spend one of the caller's rate-limit tokens (per key; per client IP when keys are off)."""
    limiter = services.rate_limiter
    if limiter is not None:
        client = caller.owner or f"ip:{request.client.host if request.client else 'unknown'}"
        await run_in_threadpool(limiter.take, client)
    return caller


async def current_caller(request: Request, services: ServicesDep) -> Caller:
    """The native API's caller: the API key in the ``api_key_header`` header, then its rate limit."""
    header = services.settings.api_key_header
    caller = authenticate(services.settings, request.headers.get(header, ""), where=f"{header} header")
    return await spend_rate_limit(request, services, caller)


CallerDep = Annotated[Caller, Depends(current_caller)]


async def idempotency_key(
    key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Same key and body: the same job. Different body: 422."),
    ] = None,
) -> str | None:
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise HttpError(
            422,
            "invalid_parameter",
            f"Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
            param="Idempotency-Key",
        )
    return key


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
