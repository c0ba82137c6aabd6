"""A typed Python client of the Uni-ViGU Serve HTTP API (a thin layer: one method per endpoint).

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        job = client.generate("a red ball rolls", height=256, width=256, num_frames=17, steps=20)
        job = client.wait(job.id, on_progress=lambda j: print(j.status, j.progress, j.eta_seconds))
        client.download(job.id, "ball.mp4")

Answers are the gateway's own models from :mod:`service.contract.schemas` (``Job``, ``JobPage``). Every error
answer raises :class:`ApiError` with the envelope's ``code``, ``message`` and ``param``; omitted options
(``None``) are left out of the request, so the model's defaults apply. Only httpx and pydantic are
needed (no torch).
"""

from __future__ import annotations

import mimetypes
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import httpx
from httpx_sse import SSEError, connect_sse

from service.contract.schemas import ErrorEnvelope, Job, JobPage, JobStatus, JobType

DEFAULT_API_KEY_HEADER = "X-API-Key"
# wait() follows the job's event stream. The gateway sends something at least every 3 s (a ping), so a
# stream silent for STREAM_SILENCE seconds is buffered by a proxy (or dead) and wait() polls instead.
STREAM_SILENCE_SECONDS = 8.0
# Polling: the first poll comes after MIN_POLL seconds, each quiet one waits BACKOFF times longer, up to MAX_POLL.
MIN_POLL_SECONDS = 0.2
MAX_POLL_SECONDS = 2.0
BACKOFF = 1.5


class ApiError(Exception):
    """An error answer of the API: ``{"error": {"code", "message", "param"}}`` plus the HTTP status."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (param: {param})" if param else ""))
        self.code = code
        self.message = message
        self.param = param
        self.status = status

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            info = ErrorEnvelope.model_validate_json(response.read()).error
        except ValueError:  # not an envelope (a proxy's page, say): keep what we can
            text = response.text.strip()[:200] or response.reason_phrase
            return cls("http_error", text, None, response.status_code)
        return cls(info.code, info.message, info.param, response.status_code)

    @classmethod
    def from_envelope(cls, data: str) -> ApiError:
        """The error of an event stream's ``error`` event (the envelope, without an HTTP status)."""
        info = ErrorEnvelope.model_validate_json(data).error
        return cls(info.code, info.message, info.param)


class WaitTimeout(TimeoutError):
    """``wait()`` gave up before the job finished; the job itself goes on (cancel it if needed)."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(
            f"job {job.id} still {job.status.value} ({job.progress}%) after {timeout:g} s; "
            "wait again or cancel it"
        )
        self.job = job
        self.timeout = timeout


def _options(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


class Client:
    """Synchronous client; use it as a context manager (or call :meth:`close`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        api_key_header: str = DEFAULT_API_KEY_HEADER,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {api_key_header: api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- submitting ----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        step_cache: float | None = None,
        idempotency_key: str | None = None,
        webhook: str | None = None,
    ) -> Job:
        """Text to video (POST /generate). Returns the queued job; see :meth:`wait`.

        ``webhook``: a URL that gets the job's end as a signed event (see docs/api.md, Webhooks)."""
        body = _options(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            fps=fps,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            step_cache=step_cache,
            webhook=webhook,
        )
        return self._submit("/generate", idempotency_key, json=body)

    def joint(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        step_cache: float | None = None,
        idempotency_key: str | None = None,
        webhook: str | None = None,
    ) -> Job:
        """A video and its caption from one prompt (POST /joint); ``webhook`` as in :meth:`generate`."""
        body = _options(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            fps=fps,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            max_tokens=max_tokens,
            step_cache=step_cache,
            webhook=webhook,
        )
        return self._submit("/joint", idempotency_key, json=body)

    def caption(
        self,
        path: str | os.PathLike[str],
        *,
        prompt: str | None = None,
        steps: int | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        video_reuse: int | None = None,
        idempotency_key: str | None = None,
        webhook: str | None = None,
    ) -> Job:
        """Caption a video file (POST /caption, multipart; the file is streamed, not read into memory).

        ``video_reuse``: a full pass over the video every this many steps (1: exact); None: the model's
        default. ``webhook`` as in :meth:`generate`."""
        path = Path(path)
        options = _options(
            prompt=prompt,
            steps=steps,
            max_tokens=max_tokens,
            seed=seed,
            video_reuse=video_reuse,
            webhook=webhook,
        )
        fields = {name: str(value) for name, value in options.items()}
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as video:
            return self._submit(
                "/caption", idempotency_key, data=fields, files={"file": (path.name, video, content_type)}
            )

    def _submit(self, url: str, idempotency_key: str | None, **request: Any) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate_json(self._request("POST", url, headers=headers, **request).content)

    # --- reading and canceling -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job now: status, progress, queue position while queued, result once succeeded."""
        return Job.model_validate_json(self._request("GET", f"/jobs/{job_id}").content)

    def jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        type: JobType | str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> JobPage:
        """Recent jobs, newest first (GET /jobs); pass ``page.next_cursor`` as ``cursor`` for more."""
        params = _options(status=status, type=type, limit=limit, cursor=cursor)
        return JobPage.model_validate_json(self._request("GET", "/jobs", params=params).content)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; a finished one raises ApiError ``job_finished`` (409)."""
        return Job.model_validate_json(self._request("POST", f"/jobs/{job_id}/cancel").content)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 600.0,
        on_progress: Callable[[Job], None] | None = None,
        silence_seconds: float = STREAM_SILENCE_SECONDS,
        min_interval: float = MIN_POLL_SECONDS,
        max_interval: float = MAX_POLL_SECONDS,
    ) -> Job:
        """Follow the job until it is succeeded, failed or canceled and return it (check ``job.status``).

        Follows ``GET /jobs/{id}/events`` (resuming with ``Last-Event-ID`` when a stream that was
        delivering drops). When the stream cannot be opened, or sends nothing for ``silence_seconds`` (a
        proxy that buffers it), it polls ``GET /jobs/{id}`` instead, backing off from ``min_interval`` to
        ``max_interval`` while nothing changes. ``on_progress`` sees every state it receives. Raises
        :class:`WaitTimeout` after ``timeout`` seconds (the job keeps running; on a stream, within the
        gateway's 3 s ping interval of the deadline).
        """
        deadline = time.monotonic() + timeout
        job = self._follow_events(job_id, deadline, timeout, on_progress, silence_seconds)
        if job is not None:
            return job
        return self._poll(job_id, deadline, timeout, on_progress, min_interval, max_interval)

    def _follow_events(
        self,
        job_id: str,
        deadline: float,
        timeout: float,
        on_progress: Callable[[Job], None] | None,
        silence_seconds: float,
    ) -> Job | None:
        """The job's final state from its event stream; None when the stream does not work (poll)."""
        job: Job | None = None
        seen: str | None = None
        while True:
            delivered = False
            headers = {"Last-Event-ID": seen} if seen else {}
            read_timeout = httpx.Timeout(self._http.timeout.connect, read=silence_seconds)
            try:
                with connect_sse(
                    self._http, "GET", f"/jobs/{job_id}/events", headers=headers, timeout=read_timeout
                ) as source:
                    if source.response.status_code == 204:  # ended in the state we have
                        return job
                    if source.response.is_error:
                        return None  # polling reports the error (or finds an older gateway's jobs)
                    for event in source.iter_sse():
                        delivered = True
                        if event.event == "job":
                            job, seen = Job.model_validate_json(event.data), event.id
                            if on_progress is not None:
                                on_progress(job)
                            if job.status.terminal:
                                return job
                        elif event.event == "error":
                            raise ApiError.from_envelope(event.data)
                        if time.monotonic() > deadline:
                            raise WaitTimeout(job or self.get(job_id), timeout)
            except (httpx.TransportError, SSEError):
                pass  # silent (buffered), refused or dropped
            if not delivered or time.monotonic() > deadline:
                return None

    def _poll(
        self,
        job_id: str,
        deadline: float,
        timeout: float,
        on_progress: Callable[[Job], None] | None,
        min_interval: float,
        max_interval: float,
    ) -> Job:
        interval = min_interval
        job = self.get(job_id)
        while True:
            if on_progress is not None:
                on_progress(job)
            if job.status.terminal:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(job, timeout)
            time.sleep(min(interval, remaining))
            previous, job = job, self.get(job_id)
            moved = (job.status, job.progress) != (previous.status, previous.progress)
            interval = min_interval if moved else min(interval * BACKOFF, max_interval)

    # --- results -------------------------------------------------------------------------------------

    def result(self, job_id: str) -> dict[str, Any]:
        """The result JSON of a succeeded job (caption, tokens, parameters used, sizes)."""
        body: dict[str, Any] = self._request("GET", f"/jobs/{job_id}/result").json()
        return body

    def download(
        self,
        job_id: str,
        path: str | os.PathLike[str],
        *,
        what: Literal["auto", "video", "result"] = "auto",
    ) -> Path:
        """Save a succeeded job's output to ``path``: the MP4 of generate/joint jobs, the result JSON of
        caption jobs (``what="auto"``). Streams to a temporary file next to ``path``, then renames it, so
        ``path`` is never left half-written."""
        if what == "auto":
            what = "result" if self.get(job_id).type == JobType.caption else "video"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        with self._stream("GET", f"/jobs/{job_id}/{what}") as response:
            try:
                with temporary.open("xb") as out:  # plain open(): the umask applies, unlike mkstemp's 0600
                    _copy(response.iter_bytes(), out)
                os.replace(temporary, path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        return path

    # --- transport -----------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **request: Any) -> httpx.Response:
        response = self._http.request(method, url, **request)
        if response.is_error:
            raise ApiError.from_response(response)
        return response

    @contextmanager
    def _stream(self, method: str, url: str) -> Iterator[httpx.Response]:
        with self._http.stream(method, url) as response:
            if response.is_error:
                raise ApiError.from_response(response)
            yield response


def _copy(chunks: Iterator[bytes], out: BinaryIO) -> None:
    for chunk in chunks:
        out.write(chunk)
