"""File downloads with Range requests whose errors answer in the error envelope.

Starlette's FileResponse answers a malformed ``Range`` with a plain-text 400 and an unsatisfiable one
with an empty 416. :class:`Download` raises :class:`HttpError` instead, which the one error mapping
(:mod:`service.gateway.errors`) writes as every other error: a native envelope, or the OpenAI-compatible
layer's under ``/v1/``. An ``If-Range`` that no longer matches still makes the range ignored (the whole
file is sent), as Starlette decides before parsing the range.
"""

from __future__ import annotations

from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from service.gateway.errors import HttpError, quote_input


class Download(FileResponse):
    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as exc:
            raise HttpError(
                400,
                "invalid_range",
                f"{exc.content.rstrip('.')}: got Range {quote_input(http_range)}; send e.g. bytes=0-1023",
                param="Range",
            ) from exc
        except RangeNotSatisfiable as exc:
            raise HttpError(
                416,
                "range_not_satisfiable",
                f"Range {quote_input(http_range)} starts beyond the file's {exc.max_size} bytes",
                param="Range",
                headers={"Content-Range": f"bytes */{exc.max_size}"},
            ) from exc
