"""What the OpenAI-compatible routes share: the caller's API key, the served model's name, video ids."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from service.contract.errors import JobNotFound
from service.contract.schemas import MODEL_ALIAS, ServedModel
from service.gateway.dependencies import Caller, Services, ServicesDep, authenticate, spend_rate_limit
from service.gateway.errors import HttpError, quote_input
from service.gateway.job_actions import require_served_model

VIDEO_ID_PREFIX = "video_"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def video_id_for(job_id: str) -> str:
    """The OpenAI id of a job: ``video_`` + the native job id (32 hex digits)."""
    return f"{VIDEO_ID_PREFIX}{job_id}"


def job_id_of(video: str) -> str:
    """The native job id of ``video_<job id>``; the bare job id is accepted too. Unknown shapes: 404."""
    job_id = video.removeprefix(VIDEO_ID_PREFIX)
    if not _JOB_ID.match(job_id):
        raise JobNotFound(video)
    return job_id


async def openai_caller(request: Request, services: ServicesDep) -> Caller:
    """The caller from ``Authorization: Bearer <key>`` (what OpenAI clients send) or, failing that, the
    native API key header; checked and rate-limited like the native API's caller."""
    settings = services.settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    presented = presented or request.headers.get(settings.api_key_header, "")
    where = f"Authorization header (Bearer) or the {settings.api_key_header} header"
    return await spend_rate_limit(request, services, authenticate(settings, presented, where=where))


OpenAICaller = Annotated[Caller, Depends(openai_caller)]


def model_names(model: ServedModel) -> list[str]:
    """The names that select the served model: its id (``univigu-<preset>``) and the alias ``univigu``."""
    return list(dict.fromkeys([model.id, MODEL_ALIAS]))


def resolve_model(services: Services, requested: str | None) -> ServedModel:
    """The served model, if ``requested`` names it (or is omitted); 404 model_not_found otherwise."""
    model = require_served_model(services)
    if requested is not None and requested not in model_names(model):
        raise HttpError(
            404,
            "model_not_found",
            f"the model {quote_input(requested)} does not exist here; this server serves {model.id!r}"
            f" (also accepted: {MODEL_ALIAS!r}); see GET /v1/models",
            param="model",
        )
    return model


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``max_bytes`` (never buffered beyond)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise HttpError(413, "payload_too_large", f"the request body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HttpError(413, "payload_too_large", f"the request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HttpError(400, "invalid_json", "the body must be a JSON object")
    return value


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for a request body declared in openapi_extra
    (where ``#/$defs/...`` references would dangle)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
