"""The bearer-key check: ``authorization: Bearer <key>`` on every request but ``GET /health``.

An ASGI middleware (:class:`BearerAuth`), so it also guards unknown routes (``401``, not
``404``, to a client without the key). The key is compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from ._http import error_response

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["BearerAuth"]


class BearerAuth:
    """``authorization: Bearer <key>`` on every request except ``GET /health``."""

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        # compare_digest on equal-length digests: constant time whatever the token.
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(
            _digest(token.strip()), _digest(self._key)
        )
        if ok:
            await self.app(scope, receive, send)
            return
        reason = "missing" if not header else "invalid"
        response = error_response(
            401,
            f"{reason} API key: send the header `authorization: Bearer <key>` "
            "(every endpoint except GET /health needs it)",
            {"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
