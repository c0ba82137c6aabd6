"""The FastAPI gateway: ``create_app(settings)`` wires Redis, the job store, the queue and the routers.

The gateway never imports torch (tests/test_service_imports.py checks it): jobs are enqueued by dotted
path and the worker loads the model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.contract.connection import connect_async_redis, connect_redis, job_queue, job_store
from service.contract.metrics import GatewayMetrics
from service.contract.result_files import ResultFiles
from service.contract.schemas import build_request_models
from service.contract.settings import Settings
from service.gateway import openai
from service.gateway.body_limits import BodyLimitMiddleware
from service.gateway.dependencies import Services
from service.gateway.errors import install_error_handlers
from service.gateway.eta import TimingCache
from service.gateway.http_metrics import HttpMetricsMiddleware
from service.gateway.maintenance import Maintenance
from service.gateway.ratelimit import RateLimiter
from service.gateway.routes import caption, events, health, jobs, submit
from service.gateway.served import ServedLimits
from service.gateway.uploads import FRAMING_BYTES
from service.gateway.watcher import JobWatcher
from service.gateway.web import mount_web
from service.gateway.webhooks.delivery import WebhookDispatcher

WATCHER_CONNECTIONS = 8  # the watcher's round trips and each new stream's first read


def build_services(settings: Settings) -> Services:
    redis = connect_redis(settings)
    store = job_store(settings, redis)
    queue = job_queue(settings, redis)
    return Services(
        settings=settings,
        store=store,
        queue=queue,
        files=ResultFiles(settings.results_dir),
        metrics=GatewayMetrics(store, queue, worker_ttl_seconds=settings.heartbeat_ttl_seconds),
        models=build_request_models(settings),
        timing=TimingCache(store, worker_ttl_seconds=settings.heartbeat_ttl_seconds),
        served=ServedLimits(store, settings),
        rate_limiter=(
            RateLimiter(
                redis,
                prefix=settings.key_prefix,
                rate_per_second=settings.rate_limit_per_second,
                burst=settings.rate_limit_burst,
            )
            if settings.rate_limit_per_second > 0
            else None
        ),
    )


def create_app(settings: Settings) -> FastAPI:
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(services.files.ensure_dirs)
        maintenance = Maintenance(settings, services.store, services.files, services.metrics)
        maintenance.start()
        # Without a secret no job has a webhook (submits naming one are refused), so nothing to deliver.
        webhooks = (
            WebhookDispatcher(settings, services.store, services.metrics) if settings.webhook_secret else None
        )
        if webhooks:
            webhooks.start()
        # Made here, not in build_services: an asyncio client belongs to the loop that serves the app.
        redis = connect_async_redis(settings, max_connections=WATCHER_CONNECTIONS)
        app.state.job_watcher = JobWatcher(
            redis,
            services.store,
            services.queue,
            interval=settings.events_poll_seconds,
            worker_ttl_seconds=settings.heartbeat_ttl_seconds,
        )
        watching = asyncio.create_task(app.state.job_watcher.run(), name="job-watcher")
        try:
            yield
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await redis.aclose(close_connection_pool=True)
            if webhooks:
                await run_in_threadpool(webhooks.stop)
            await run_in_threadpool(maintenance.stop)
            await run_in_threadpool(services.store.redis.close)

    app = FastAPI(
        title="Uni-ViGU Serve",
        version="0.1.0",
        summary="Text-to-video, video captioning and joint generation with one diffusion model.",
        lifespan=lifespan,
    )
    app.state.services = services
    # Under /v1/ errors are written in OpenAI's shape; the statuses and codes stay service.gateway.errors' own.
    install_error_handlers(
        app,
        retry_after_seconds=settings.retry_after_seconds,
        renderers={f"{openai.PREFIX}/": openai.render_openai},
    )
    # Documents the API key in OpenAPI (an "Authorize" button in /docs); the check is current_caller's.
    security = (
        [Security(APIKeyHeader(name=settings.api_key_header, auto_error=False, scheme_name="ApiKey"))]
        if settings.api_keys
        else []
    )
    app.include_router(submit.build_router(services.models), dependencies=security)
    app.include_router(caption.build_router(services.models), dependencies=security)
    app.include_router(jobs.router, dependencies=security)
    app.include_router(events.router, dependencies=security)
    app.include_router(health.router)
    # OpenAI clients send the key as "Authorization: Bearer"; the native header works there too.
    bearer = [Security(HTTPBearer(auto_error=False, scheme_name="Bearer"))] if settings.api_keys else []
    app.include_router(openai.build_router(), dependencies=bearer)
    mount_web(app)
    # The request bodies' ranges in /openapi.json are the served model's, read when the schema is asked for.
    app_schema = app.openapi
    app.openapi = lambda: services.served.openapi(app_schema())  # type: ignore[method-assign]
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_json_body_bytes,
        max_multipart_bytes=settings.max_upload_bytes + FRAMING_BYTES,
        idle_timeout_seconds=settings.body_idle_timeout_seconds,
        total_timeout_seconds=settings.body_timeout_seconds,
        path_caps={openai.CHAT_PATH: openai.chat_body_limit(settings)},
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=services.metrics)
    return app
