"""The gateway served over real HTTP (uvicorn in a thread) next to a live tiny worker, for the tests of
clients that need a URL: service.client, `univigu submit` (a subprocess) and the web page (a browser);
and a buffering reverse proxy to put in front of it.

Built from conftest's pieces (make_settings, WorkerProcess, wait_for); one per test module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from conftest import TINY_MODEL, WorkerProcess, make_settings, wait_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.cli.redis_server import RedisServer, free_port
from service.contract.settings import Settings
from service.gateway.app import create_app


@contextmanager
def serve_gateway(settings: Settings) -> Iterator[str]:
    """``create_app(settings)`` on a free local port; yields its base URL."""
    with serve_app(create_app(settings)) as url:
        yield url


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """An ASGI app under uvicorn on a free local port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"http-{port}", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=30, what="the server to start")
    assert server.started, "the server did not start (see the log above)"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


HOP_BY_HOP = {"connection", "content-length", "content-encoding", "transfer-encoding", "keep-alive"}


def buffering_proxy(upstream: str, paths: list[str]) -> Starlette:
    """A reverse proxy that passes each answer on only once it is complete, as nginx does with
    proxy_buffering on: an event stream then arrives whole, at its end. Records the paths it forwards."""

    async def forward(request: Request) -> Response:
        paths.append(request.url.path)
        headers = {name: value for name, value in request.headers.items() if name != "host"}
        async with httpx.AsyncClient(base_url=upstream, timeout=None) as http:
            answer = await http.request(
                request.method,
                request.url.path,
                params=request.query_params,
                headers=headers,
                content=await request.body(),
            )
        kept = {name: value for name, value in answer.headers.items() if name not in HOP_BY_HOP}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


@dataclass(frozen=True)
class LiveService:
    url: str
    settings: Settings
    worker: WorkerProcess


@contextmanager
def live_service(
    redis_server: RedisServer, directory: Path, model: tuple[str, ...] = TINY_MODEL, **overrides: Any
) -> Iterator[LiveService]:
    """A gateway on HTTP and one `univigu worker` serving ``model`` (the tiny preset by default), ready
    (the worker loaded the model); ``overrides`` are settings of both."""
    settings = make_settings(directory / "results", redis_url=redis_server.url, **overrides)
    worker = WorkerProcess(settings, directory / "worker.log", model)
    try:
        with serve_gateway(settings) as url, httpx.Client(base_url=url, timeout=10) as http:
            worker.wait_ready(http)  # type: ignore[arg-type]  # it only calls .get("/readyz")
            yield LiveService(url, settings, worker)
    finally:
        worker.stop()
