"""Every request body is capped and timed while it streams in, before any route buffers it.

An ASGI middleware wraps ``receive``:

- **Size.** A body over its cap answers 413: at once from a Content-Length, or as soon as the streamed
  bytes cross the cap (chunked bodies have no Content-Length), so memory stays flat whatever is sent.
  Multipart uploads get the upload cap (``max_upload_bytes`` plus the form framing), paths in
  ``path_caps`` their own cap (the OpenAI chat completion carries a base64 video in JSON); every other
  body gets ``max_json_body_bytes``.
- **Time.** A body that sends nothing for ``body_idle_timeout_seconds``, or that is not whole after
  ``body_timeout_seconds``, answers 408: a slow or stalled client costs one idle coroutine for a bounded
  time, never a stuck worker thread.

Both raise ``HTTPException`` from ``receive``, which the route's body reading lets through to the one
error mapping in ``service.gateway.errors``. Once the body is complete, ``receive`` is passed through untouched
(responses listen on it for the client going away).
"""

from __future__ import annotations

import anyio
from starlette.exceptions import HTTPException

from service.gateway.http_metrics import ASGIApp, Message, Receive, Scope, Send

MULTIPART = b"multipart/form-data"


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        max_multipart_bytes: int,
        idle_timeout_seconds: float,
        total_timeout_seconds: float,
        path_caps: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.path_caps = path_caps or {}
        self.max_bytes = max_bytes
        self.max_multipart_bytes = max_multipart_bytes
        self.idle_timeout_seconds = idle_timeout_seconds
        self.total_timeout_seconds = total_timeout_seconds

    def _cap(self, scope: Scope) -> tuple[int, int | None]:
        """The cap for this request's body and its declared Content-Length (None if absent or invalid)."""
        headers = dict(scope.get("headers", []))
        multipart = headers.get(b"content-type", b"").lower().startswith(MULTIPART)
        declared = headers.get(b"content-length", b"")
        cap = self.max_multipart_bytes if multipart else self.path_caps.get(scope["path"], self.max_bytes)
        return (
            cap,
            int(declared) if declared.isdigit() else None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap, declared = self._cap(scope)
        deadline = anyio.current_time() + self.total_timeout_seconds
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            if declared is not None and declared > cap:
                raise HTTPException(413, f"the request body has {declared} bytes; at most {cap} are accepted")
            timeout = min(self.idle_timeout_seconds, deadline - anyio.current_time())
            try:
                with anyio.fail_after(max(timeout, 0)):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body did not arrive in time (nothing for {self.idle_timeout_seconds:g} s,"
                    f" or not whole after {self.total_timeout_seconds:g} s); send it faster",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise HTTPException(413, f"the request body exceeds {cap} bytes")
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
