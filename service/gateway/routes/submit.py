"""POST /generate and POST /joint (JSON bodies)."""

# No `from __future__ import annotations`: the request models are built at runtime from the settings
# and FastAPI must see them as real classes.

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.contract.schemas import Job, JobType, RequestModels, params_and_webhook
from service.gateway.dependencies import Caller, CallerDep, IdempotencyKey, Services, ServicesDep
from service.gateway.job_actions import accepted, new_job_id, submit
from service.gateway.routes._responses import SUBMIT_ERRORS


def _submit(
    services: Services,
    job_type: JobType,
    body: BaseModel,
    caller: Caller,
    key: str | None,
    response: Response,
) -> Job:
    params, webhook = params_and_webhook(body)
    submission = submit(
        services, job_type, params, job_id=new_job_id(), caller=caller, idempotency_key=key, webhook=webhook
    )
    return accepted(services, submission, response)


def _endpoint(
    job_type: JobType, request_model: type[BaseModel], summary: str
) -> Callable[..., Coroutine[Any, Any, Job]]:
    # async with the Redis work in one thread-pool call: FastAPI then validates on the event loop
    # instead of hopping threads again (sync endpoints cost two hops per request).
    async def endpoint(
        body: request_model,  # type: ignore[valid-type]
        response: Response,
        services: ServicesDep,
        caller: CallerDep,
        idempotency_key: IdempotencyKey,
    ) -> Job:
        return await run_in_threadpool(_submit, services, job_type, body, caller, idempotency_key, response)

    endpoint.__doc__ = f"{summary} Answers 202 with the queued job; poll GET /jobs/{{id}}."
    return endpoint


def build_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["jobs"])
    for path, job_type, request_model, summary in (
        ("/generate", JobType.generate, models.generate, "Text to video."),
        ("/joint", JobType.joint, models.joint, "A video and its caption from one prompt."),
    ):
        router.add_api_route(
            path,
            _endpoint(job_type, request_model, summary),
            methods=["POST"],
            status_code=202,
            response_model=Job,
            responses=SUBMIT_ERRORS,
            name=job_type.value,
        )
    return router
