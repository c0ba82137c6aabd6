"""OpenAI's error shape for the ``/v1/`` layer: ``{"error": {"message", "type", "param", "code"}}``.

Which error gets which status and code is decided in ``service.gateway.errors`` for the whole gateway; this
renderer only writes that decision in OpenAI's shape, with one convention of OpenAI's API applied:
an invalid parameter (our 422) answers 400, as OpenAI's own API does (the SDK raises BadRequestError).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.gateway.errors import ErrorReply

# OpenAI answers a request with bad parameters 400 (invalid_request_error); everything else keeps its status.
_STATUS = {422: 400}


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorInfo


def error_type(status: int) -> str:
    """OpenAI's ``type`` for a status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")


def render_openai(reply: ErrorReply) -> JSONResponse:
    status = _STATUS.get(reply.status, reply.status)
    info = OpenAIErrorInfo(message=reply.message, type=error_type(status), param=reply.param, code=reply.code)
    return JSONResponse(OpenAIError(error=info).model_dump(), status_code=status, headers=reply.headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI descriptions of this layer's error answers."""
    return {status: {"model": OpenAIError} for status in statuses}
