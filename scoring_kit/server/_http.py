"""The server's JSON responses (orjson). Every non-2xx body is ``{"error": "<message>"}``.

:class:`~scoring_kit.server._fields.RequestError` is re-exported: the refusal a handler raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .._exceptions import MissingDependencyError
from ._fields import RequestError

try:
    from starlette.responses import Response
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _msg = "the scoring_kit server needs starlette and uvicorn: pip install 'scoring_kit[engine]'"
    raise MissingDependencyError(_msg) from _exc

__all__ = ["JSONResponse", "RequestError", "error_response", "json_response"]


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
