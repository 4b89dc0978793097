"""The server's JSON responses and the one exception a handler raises to answer with an error.

Every non-2xx body the server sends is ``{"error": "<message>"}`` (:func:`error_response`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from .._exceptions import ScoringKitError

__all__ = ["JSONResponse", "RequestError", "error_response", "json_response"]


class RequestError(ScoringKitError):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``.

    Raised by the request parsers (:mod:`~scoring_kit.server.params`) and the protocol
    handlers; it never leaves the server (the app turns it into the response).
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class JSONResponse(Response):
    """A JSON response rendered with orjson (numpy arrays included)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``content`` as a JSON response."""
    return JSONResponse(content, status_code=status, headers=dict(headers or {}))


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The server's error shape: ``{"error": message}`` with ``status``."""
    return json_response({"error": message}, status, headers)
