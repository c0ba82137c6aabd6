"""OpenAPI descriptions of the error envelope, shared by the routers."""

from __future__ import annotations

from typing import Any

from service.contract.schemas import ErrorEnvelope


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorEnvelope} for status in statuses}


SUBMIT_ERRORS = error_responses(400, 401, 408, 413, 415, 422, 429, 503)
READ_ERRORS = error_responses(401, 404, 409, 429, 503)
