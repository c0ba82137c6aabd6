"""POST /caption: a multipart upload of a video plus options, streamed to disk and probed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.contract.schemas import Job, RequestModels, params_and_webhook
from service.gateway.dependencies import CallerDep, IdempotencyKey, Services, ServicesDep
from service.gateway.job_actions import accepted, new_job_id, submit_caption
from service.gateway.routes._responses import SUBMIT_ERRORS
from service.gateway.uploads import FILE_FIELD, receive_upload


def _form_schema(models: RequestModels) -> dict[str, Any]:
    options = models.caption.model_json_schema()
    properties = {FILE_FIELD: {"type": "string", "format": "binary", "description": "The video."}}
    properties.update(options.get("properties", {}))
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [FILE_FIELD], "properties": properties}
                }
            },
        }
    }


def _validate_options(services: Services, fields: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """The job's parameters and its webhook."""
    present = {name: value for name, value in fields.items() if value != ""}
    try:
        options = services.models.caption.model_validate(present)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    return params_and_webhook(options)


def build_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post(
        "/caption",
        status_code=202,
        response_model=Job,
        responses=SUBMIT_ERRORS,
        openapi_extra=_form_schema(models),
    )
    async def caption(
        request: Request,
        response: Response,
        services: ServicesDep,
        caller: CallerDep,
        idempotency_key: IdempotencyKey,
    ) -> Job:
        """Caption an uploaded video (form part `file`; options as form fields). Answers 202."""
        job_id = new_job_id()
        files, ttl = services.files, services.settings.result_ttl_seconds
        try:
            upload = await receive_upload(
                request.stream(),
                content_type=request.headers.get("content-type"),
                content_length=request.headers.get("content-length"),
                destination=await run_in_threadpool(files.new_upload, job_id, ttl),
                max_bytes=services.settings.max_upload_bytes,
            )
            params, webhook = _validate_options(services, upload.fields)
        except Exception:  # not a handler: the upload is removed and the error propagates to the mapping
            await run_in_threadpool(files.remove_job, job_id)
            raise
        submission = await run_in_threadpool(
            submit_caption,
            services,
            params,
            job_id=job_id,
            caller=caller,
            idempotency_key=idempotency_key,
            sha256=upload.sha256,
            filename=upload.filename,
            webhook=webhook,
        )
        return await run_in_threadpool(accepted, services, submission, response)

    return router
