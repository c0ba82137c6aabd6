"""``/v1/models``: the one served model, named ``univigu-<preset>`` (alias ``univigu``)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.gateway.dependencies import ServicesDep
from service.gateway.job_actions import require_served_model
from service.gateway.openai.common import OpenAICaller, resolve_model
from service.gateway.openai.errors import error_responses
from service.gateway.openai.schemas import Model, ModelList

router = APIRouter(tags=["openai"])


@router.get("/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(services: ServicesDep, _: OpenAICaller) -> ModelList:
    """The served model (503 until a worker has started)."""
    model = await run_in_threadpool(require_served_model, services)
    return ModelList(data=[Model(id=model.id)])


@router.get("/models/{model_id}", response_model=Model, responses=error_responses(401, 404, 503))
async def retrieve_model(model_id: str, services: ServicesDep, _: OpenAICaller) -> Model:
    """The served model by its id or the alias `univigu`; any other name answers 404."""
    model = await run_in_threadpool(resolve_model, services, model_id)
    return Model(id=model.id)
