"""The OpenAI-compatible layer under ``/v1/``: a thin layer over the native job system.

- ``/v1/videos`` (``videos``): OpenAI's video resource over generate and joint jobs.
- ``/v1/chat/completions`` (``chat``): captioning one video sent as a ``video_url`` data URL.
- ``/v1/models`` (``models``): the served model.

Same queue, same workers, same records as the native API: every route calls the use cases in
``service.gateway.job_actions``. Errors under ``/v1/`` are written in OpenAI's shape (``errors.render_openai``);
the statuses and codes are the gateway's own (``service.gateway.errors``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.gateway.openai import chat, models, videos
from service.gateway.openai.errors import render_openai

PREFIX = "/v1"
CHAT_PATH = f"{PREFIX}/chat/completions"
chat_body_limit = chat.body_limit

__all__ = ["CHAT_PATH", "PREFIX", "build_router", "chat_body_limit", "render_openai"]


def build_router(dependencies: list[Any] | None = None) -> APIRouter:
    router = APIRouter(prefix=PREFIX, dependencies=dependencies or [])
    for module in (videos, chat, models):
        router.include_router(module.router)
    return router
