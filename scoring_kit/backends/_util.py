"""URL, JSON and body helpers shared by the HTTP backends and detection (pure functions).

No client and no state: :mod:`~scoring_kit.backends.detect` (the probes) and
:mod:`~scoring_kit.backends._common` (the request loop) both build on these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson

from .. import _settings
from .._exceptions import ConfigError, ProtocolError
from .._settings import API_KEY_ENV
from .._types import FloatArray
from ..wire import VLLM_NEG_INF, CompletionRequest

__all__ = [
    "API_KEY_ENV",
    "choice_text",
    "compact_json",
    "completion_body",
    "display_url",
    "dumps_json",
    "empty_scores",
    "error_message",
    "extract_message",
    "int_or",
    "json_headers",
    "loads_json",
    "normalise_url",
    "resolve_api_key",
    "snippet",
]

_MAX_BODY_IN_MESSAGE = 500


def resolve_api_key(api_key: str | None) -> str | None:
    """``api_key`` if given, else ``$SCORING_KIT_API_KEY``, else ``None`` (empty is unset)."""
    key = api_key if api_key is not None else _settings.api_key()
    return key or None


def json_headers(key: str | None, **extra: str) -> dict[str, str]:
    """Request headers: ``accept: application/json``, the bearer ``key`` when set, ``extra``.

    >>> json_headers("k")
    {'accept': 'application/json', 'authorization': 'Bearer k'}
    """
    headers = {"accept": "application/json", **extra}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers


def normalise_url(url: str, *, strip_v1: bool = False) -> str:
    """Strip blanks and trailing slashes (and a trailing ``/v1`` when ``strip_v1``).

    Raises
    ------
    ConfigError
        A ``ValueError``: the URL is not ``http://`` or ``https://`` with a host.

    Examples
    --------
    >>> normalise_url("http://127.0.0.1:8000/v1/", strip_v1=True)
    'http://127.0.0.1:8000'
    """
    out = url.strip().rstrip("/")
    parts = urlsplit(out)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        msg = f"base URL must look like http://host:port[/path], got {display_url(url)!r}"
        raise ConfigError(msg)
    if strip_v1 and out.endswith("/v1"):
        out = out[: -len("/v1")]
    return out


def display_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def dumps_json(obj: Any) -> bytes:
    """Encode a request body (orjson; numpy arrays and scalars allowed)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def loads_json(content: bytes) -> Any:
    """Decode a response body.

    orjson first (fast on long logprob lists); on failure the stdlib parser, which also
    accepts the ``NaN`` / ``-Infinity`` literals that Python servers may emit.

    Raises
    ------
    ValueError
        When the body is not JSON (truncated, HTML error page, empty).
    """
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def extract_message(body: Any) -> str | None:
    """The error text in a JSON error body, or ``None`` when it has none.

    Understands ``{"error": "..."}`` (the seed's server), ``{"error": {"message": ...}}``
    (vLLM ≥ 0.10, SGLang), ``{"message": ...}`` (vLLM ≤ 0.9) and ``{"detail": ...}``
    (FastAPI / Starlette).

    Examples
    --------
    >>> extract_message({"error": {"message": "bad span", "code": 400}})
    'bad span'
    >>> extract_message({"detail": "Not Found"})
    'Not Found'
    """
    if not isinstance(body, Mapping):
        return None
    for key in ("error", "message", "detail"):
        value = body.get(key)
        if value is None or value == "" or value == {}:
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping):
            inner = value.get("message")
            if isinstance(inner, str) and inner:
                return inner
            return compact_json(value)
        return compact_json(value)
    return None


def compact_json(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode("utf-8", "replace")
    except TypeError:
        return str(value)


def snippet(content: bytes, limit: int = _MAX_BODY_IN_MESSAGE) -> str:
    text = content.decode("utf-8", "replace").strip()
    if len(text) > limit:
        return text[:limit] + f"… ({len(content)} bytes)"
    return text


def error_message(content: bytes, *, reason: str = "") -> str:
    """The message of a non-2xx answer: the JSON error text, else the body text (truncated)."""
    try:
        body = loads_json(content)
    except ValueError:
        body = None
    msg = extract_message(body)
    if msg is not None:
        return msg
    text = snippet(content)
    if text:
        return text
    return reason or "empty response body"


def choice_text(data: Any, *, what: str, backend: str) -> str:
    """``choices[0].text`` of an OpenAI-style completion, or :class:`ProtocolError`."""
    try:
        text = data["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        msg = f"{what}: answer has no choices[0].text string; got {compact_json(data)[:200]}"
        raise ProtocolError(msg, backend=backend)
    return text


def int_or(value: Any, default: int) -> int:
    """``value`` when it is an int (not a bool), else ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def empty_scores() -> FloatArray:
    """The result for a request with no ranges."""
    return np.empty(0, dtype=np.float64)


def completion_body(request: CompletionRequest, model: str | None) -> dict[str, Any]:
    """The OpenAI-style ``/completions`` body for ``request`` (token-id prompt, no priority).

    Shared by the seed's ``/completions`` and stock vLLM's ``/v1/completions``; each caller
    adds what only its server takes (``priority``, ``stream``).
    """
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt),
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "stop_token_ids": list(request.stop_token_ids),
        "skip_special_tokens": False,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    return body


def logprob_value(value: object) -> float | None:
    """One logprob of a JSON answer as a float (vLLM's ``-9999.0`` stand-in and anything
    below it is ``-inf``), or None when it is not a number (the caller names where)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return -math.inf if value <= VLLM_NEG_INF else float(value)
