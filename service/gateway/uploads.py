"""Streaming multipart uploads: the video part goes straight to disk with a byte cap.

The body is parsed chunk by chunk as it arrives, so an upload over ``max_bytes`` is answered 413 as soon
as the cap is crossed (or at once from its Content-Length), never after buffering the whole body. A
partial file is deleted. File writes run in the thread pool, never on the event loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from service.gateway.errors import HttpError

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
# Room for the multipart framing and the option fields next to the file.
FRAMING_BYTES = 256 * 1024


def _too_large(max_bytes: int) -> HttpError:
    return HttpError(413, "payload_too_large", f"the upload exceeds {max_bytes} bytes", param=FILE_FIELD)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


@dataclass
class ReceivedUpload:
    fields: dict[str, str]
    path: Path
    size: int
    sha256: str
    filename: str | None
    """The file name the client sent (the part's ``filename``), if any; errors name the video by it."""


class _MultipartSink:
    """python-multipart callbacks collecting form fields in memory and file bytes for the caller."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.file_chunks: list[bytes] = []
        self.file_seen = False
        self.filename: str | None = None
        self._part = _Part()
        self._header_field = b""
        self._header_value = b""

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get("content-disposition"))
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part.is_file = self._part.name == FILE_FIELD
        if self._part.is_file:
            if self.file_seen:
                raise HttpError(400, "bad_request", "send exactly one file part", param=FILE_FIELD)
            self.file_seen = True
            filename = options.get(b"filename")
            self.filename = None if filename is None else filename.decode("utf-8", "replace")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part.is_file:
            self.file_chunks.append(data[start:end])
            return
        self._part.data += data[start:end]
        if len(self._part.data) > MAX_FIELD_BYTES:
            raise HttpError(
                413, "payload_too_large", f"form field exceeds {MAX_FIELD_BYTES} bytes", param=None
            )

    def _end(self) -> None:
        if not self._part.is_file and self._part.name:
            self.fields[self._part.name] = self._part.data.decode("utf-8", "replace")


def _write(handle: IO[bytes], digest: hashlib._Hash, data: bytes) -> None:
    handle.write(data)
    digest.update(data)


def _discard(handle: IO[bytes], path: Path) -> None:
    handle.close()
    path.unlink(missing_ok=True)


async def receive_upload(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    destination: Path,
    max_bytes: int,
) -> ReceivedUpload:
    """Parse a multipart body from ``chunks`` into form fields and a file at ``destination``."""
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise HttpError(
            415,
            "unsupported_media_type",
            f"send multipart/form-data with the video in a part named {FILE_FIELD!r} and options as fields",
        )
    if content_length and content_length.isdigit() and int(content_length) > max_bytes + FRAMING_BYTES:
        raise _too_large(max_bytes)
    sink = _MultipartSink()
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    digest = hashlib.sha256()
    size = 0
    handle = await run_in_threadpool(destination.open, "wb")
    try:
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise HttpError(400, "bad_request", f"malformed multipart body: {exc}") from exc
            if sink.file_chunks:
                data = b"".join(sink.file_chunks)
                sink.file_chunks.clear()
                size += len(data)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                await run_in_threadpool(_write, handle, digest, data)
        parser.finalize()
        if not sink.file_seen:
            raise HttpError(422, "invalid_parameter", f"{FILE_FIELD}: field required", param=FILE_FIELD)
    except Exception:  # not a handler: the partial file is removed and the error propagates
        await run_in_threadpool(_discard, handle, destination)
        raise
    await run_in_threadpool(handle.close)
    return ReceivedUpload(
        fields=sink.fields,
        path=destination,
        size=size,
        sha256=digest.hexdigest(),
        filename=sink.filename,
    )
