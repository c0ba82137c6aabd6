"""The web page at ``/``: plain HTML, CSS and JavaScript over the HTTP API (no build step, no CDN).

The page builds its forms from ``/openapi.json`` (so field ranges follow the running settings), submits
with ``fetch`` and follows the job's event stream ``GET /jobs/{id}/events`` (polling ``GET /jobs/{id}``
where a proxy buffers the stream); every URL it uses is relative, so it also works behind a path prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).resolve().parent
# URL path -> (file in this package, media type). Only these are served (not the package's .py files).
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/style.css": ("style.css", "text/css; charset=utf-8"),
}


def _asset(name: str, media_type: str) -> Callable[[], FileResponse]:
    def serve() -> FileResponse:
        return FileResponse(WEB_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return serve


def mount_web(app: FastAPI) -> None:
    """Serve ``index.html`` at ``/`` and its script and style sheet under ``/web/``."""
    for path, (name, media_type) in ASSETS.items():
        app.add_api_route(path, _asset(name, media_type), methods=["GET"], include_in_schema=False)
