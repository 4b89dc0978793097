"""httpx plumbing shared by the HTTP backends (``score``, ``vllm``, ``sglang``).

:class:`HTTPBackend` owns one ``httpx.AsyncClient`` (per event loop: a client is bound to
the loop it first ran on, and the sync facade runs each call on a fresh loop), sends JSON
encoded with orjson, retries under a :class:`~scoring_kit.backends._retry.RetryPolicy`, and
maps every httpx failure onto the scoring_kit error tree. This module and the backends are
the only places that touch httpx exceptions.

The API key only ever lives in the client's default headers; every message built here is
passed through :meth:`HTTPBackend._redact`, so the key never shows in an error, a repr or a
log line, even when a server echoes it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import orjson

from .._exceptions import (
    BackendError,
    BackendUnavailable,
    PromptError,
    ProtocolError,
    ScoringAPIError,
)
from .._types import FloatArray
from ._retry import RetryPolicy, parse_retry_after
from .base import CompletionRequest, ScoreRequest, ScorerStats, validate_score_request

__all__ = [
    "API_KEY_ENV",
    "BackendPromptError",
    "HTTPBackend",
    "ProbeResult",
    "choice_text",
    "completion_body",
    "display_url",
    "dumps_json",
    "empty_scores",
    "error_message",
    "extract_message",
    "int_or",
    "loads_json",
    "normalise_url",
    "probe",
    "resolve_api_key",
]

logger = logging.getLogger("scoring_kit.backends")

#: Environment variable read when no ``api_key`` is passed.
API_KEY_ENV = "SCORING_KIT_API_KEY"

_USER_AGENT = "scoring_kit/0.1 (+httpx)"
_MAX_BODY_IN_MESSAGE = 500


class BackendPromptError(BackendError, PromptError):
    """A prompt this backend cannot score: a bad span, or longer than the model's context.

    It is a :class:`~scoring_kit.PromptError` (the request itself is at fault, so retrying
    does not help) and also a :class:`~scoring_kit.BackendError`, so that ``score_batch``
    records it in the request's slot instead of losing the whole batch.

    Attributes
    ----------
    limit, actual
        The limit that was exceeded and the value found, when the error is about a length.
    """

    def __init__(
        self,
        msg: str,
        *,
        backend: str | None = None,
        limit: int | None = None,
        actual: int | None = None,
    ) -> None:
        super().__init__(msg, backend=backend)
        self.limit = limit
        self.actual = actual


# --------------------------------------------------------------------------- helpers


def resolve_api_key(api_key: str | None) -> str | None:
    """``api_key`` if given, else ``$SCORING_KIT_API_KEY``, else ``None`` (empty is unset)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return key or None


def normalise_url(url: str, *, strip_v1: bool = False) -> str:
    """Strip blanks and trailing slashes (and a trailing ``/v1`` when ``strip_v1``).

    Raises
    ------
    ValueError
        When the URL is not ``http://`` or ``https://`` with a host.

    Examples
    --------
    >>> normalise_url("http://127.0.0.1:8000/v1/", strip_v1=True)
    'http://127.0.0.1:8000'
    """
    out = url.strip().rstrip("/")
    parts = urlsplit(out)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        msg = f"base URL must look like http://host:port[/path], got {display_url(url)!r}"
        raise ValueError(msg)
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
            return _compact(value)
        return _compact(value)
    return None


def _compact(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode("utf-8", "replace")
    except TypeError:
        return str(value)


def _snippet(content: bytes, limit: int = _MAX_BODY_IN_MESSAGE) -> str:
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
    text = _snippet(content)
    if text:
        return text
    return reason or "empty response body"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one detection probe answered: ``status`` (``None`` when nothing answered)."""

    method: str
    path: str
    status: int | None
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.body is not None

    def describe(self) -> str:
        """One line: ``GET /v1/models → 404 {"detail":"Not Found"}``."""
        head = f"{self.method} {self.path} → "
        if self.status is None:
            return head + (self.error or "no answer")
        extra = ""
        if self.body is not None:
            text = _compact(self.body)
            extra = " " + (text if len(text) <= 120 else text[:120] + "…")
        elif self.error:
            extra = f" ({self.error})"
        return f"{head}{self.status}{extra}"


async def probe(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    path: str,
    *,
    body: Any = None,
) -> ProbeResult:
    """One request, no retries; never raises for HTTP or transport failures."""
    content = dumps_json(body) if body is not None else None
    headers = {"content-type": "application/json"} if content is not None else None
    try:
        resp = await client.request(method, url, content=content, headers=headers)
    except httpx.HTTPError as exc:
        return ProbeResult(method, path, None, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    try:
        data = loads_json(resp.content) if resp.content else None
    except ValueError:
        return ProbeResult(method, path, resp.status_code, error="body is not JSON")
    return ProbeResult(method, path, resp.status_code, data)


# --------------------------------------------------------------------------- base class


async def _close_with_loop(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """Parked after one step; closing it (loop shutdown or ``aclose``) closes ``client``."""
    try:
        yield
    finally:
        await client.aclose()


class HTTPBackend:
    """Common state and request loop of the HTTP scorers.

    Parameters
    ----------
    base_url
        Server root (already normalised by the subclass).
    model
        Model name sent in request bodies (``None``: the subclass resolves it).
    api_key
        Bearer token; ``None`` reads ``$SCORING_KIT_API_KEY``.
    timeout
        Seconds (or an ``httpx.Timeout``) for every phase of one request.
    concurrency
        Connections kept in the pool and requests in flight in ``score_batch``.
    retry
        The :class:`RetryPolicy` (``RetryPolicy()`` when ``None``).
    transport
        An ``httpx`` transport to use instead of the network (``httpx.MockTransport`` in
        tests).
    """

    name: str = "http"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 300.0,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if concurrency < 1:
            msg = f"concurrency must be >= 1, got {concurrency}"
            raise ValueError(msg)
        self.base_url = base_url
        self.model = model
        self.concurrency = int(concurrency)
        self.retry = retry if retry is not None else RetryPolicy()
        self.stats = ScorerStats()
        self._api_key = resolve_api_key(api_key)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._http_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._closer: AsyncGenerator[None, None] | None = None

    # -- presentation ------------------------------------------------------------------

    def __repr__(self) -> str:
        key = ", api_key=<set>" if self._api_key else ""
        return (
            f"{type(self).__name__}(base_url={display_url(self.base_url)!r}, "
            f"model={self.model!r}{key})"
        )

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "<redacted>")
        return text

    # -- the client --------------------------------------------------------------------

    async def _client(self) -> httpx.AsyncClient:
        """The shared client for the running loop (created on first use).

        A client is tied to the loop it first ran on, so a call from another loop (the sync
        facade runs each call under ``asyncio.run``) gets a new one. The pool of each client
        is closed when its loop shuts down: an async generator parked in that loop runs
        ``aclose`` when ``asyncio.run`` finalises the loop's async generators.
        """
        loop = asyncio.get_running_loop()
        current = self._http
        bound = self._http_loop() if self._http_loop is not None else None
        if current is not None and not current.is_closed and bound is loop:
            return current
        if current is not None and not current.is_closed:
            logger.debug("%r: event loop changed; opening a new connection pool", self)
        headers = {"user-agent": _USER_AGENT, "accept": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        client = httpx.AsyncClient(
            headers=headers,
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=self.concurrency,
                max_keepalive_connections=self.concurrency,
            ),
            transport=self._transport,
            follow_redirects=False,
        )
        closer = _close_with_loop(client)
        await closer.__anext__()  # parks it in this loop's set of async generators
        self._http, self._http_loop, self._closer = client, weakref.ref(loop), closer
        return client

    async def aclose(self) -> None:
        """Close the connection pool (the scorer opens a new one if used again)."""
        client, closer, bound = self._http, self._closer, self._http_loop
        self._http = self._closer = self._http_loop = None
        if client is None or closer is None or bound is None:
            return
        if bound() is asyncio.get_running_loop():
            await closer.aclose()  # runs client.aclose()

    async def __aenter__(self) -> HTTPBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- bookkeeping -------------------------------------------------------------------

    @contextlib.contextmanager
    def _tracking(self, *, requests: int = 1, prompt_tokens: int = 0) -> Iterator[None]:
        """Count ``requests`` calls and their tokens; failed too if a BackendError escapes."""
        self.stats.calls += requests
        self.stats.prompt_tokens += prompt_tokens
        try:
            yield
        except BackendError:
            self.stats.failed_calls += requests
            raise

    def _count_round_trip(self) -> None:
        self.stats.extra["round_trips"] = self.stats.extra.get("round_trips", 0.0) + 1.0

    def _check_request(self, request: ScoreRequest, *, max_len: int | None = None) -> None:
        """Validate spans locally; raise :class:`BackendPromptError` (no round trip wasted)."""
        try:
            validate_score_request(request.prompt, request.ranges, max_len=max_len)
        except PromptError as exc:
            raise BackendPromptError(f"{self.name}: {exc}", backend=self.name) from exc

    # -- the request loop --------------------------------------------------------------

    def url(self, path: str) -> str:
        """``base_url`` joined with ``path`` (which starts with ``/``)."""
        return self.base_url + path

    async def _request_json(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        what: str,
        idempotent: bool = True,
        retry: RetryPolicy | None = None,
    ) -> tuple[int, Any]:
        """Send one request with retries; return ``(status, decoded JSON)`` of a 2xx answer.

        Raises
        ------
        BackendUnavailable
            Transport failure (connect, timeout, reset) after the last attempt.
        ScoringAPIError
            Non-2xx answer (``"<what> HTTP <status>: <message>"``), or a 2xx JSON object with
            an ``error`` field (``"<what> error: <message>"``).
        ProtocolError
            2xx answer that is not JSON after the last attempt.
        """
        policy = retry if retry is not None else self.retry
        content = dumps_json(body) if body is not None else None
        headers = {"content-type": "application/json"} if content is not None else None
        shown = display_url(url)
        client = await self._client()
        attempt = 0
        while True:
            attempt += 1
            self._count_round_trip()
            try:
                resp = await client.request(method, url, content=content, headers=headers)
            except httpx.TransportError as exc:
                cause = self._redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
                if attempt < policy.max_attempts and policy.retries_exception(
                    exc, idempotent=idempotent
                ):
                    await self._wait(policy, attempt, None, cause, what, shown)
                    continue
                msg = f"{what}: no answer from {shown} after {attempt} attempt(s): {cause}"
                raise BackendUnavailable(msg, backend=self.name) from exc
            except httpx.HTTPError as exc:  # decoding errors, too many redirects
                cause = self._redact(f"{type(exc).__name__}: {exc}")
                msg = f"{what}: unusable answer from {shown}: {cause}"
                raise ProtocolError(msg, backend=self.name) from exc

            status = resp.status_code
            if not 200 <= status < 300:
                message = self._redact(error_message(resp.content, reason=resp.reason_phrase))
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
                if attempt < policy.max_attempts and policy.retries_status(
                    status, idempotent=idempotent
                ):
                    await self._wait(
                        policy, attempt, retry_after, f"HTTP {status}: {message}", what, shown
                    )
                    continue
                gave_up = f" (gave up after {attempt} attempts)" if attempt > 1 else ""
                if status in (401, 403):
                    gave_up += (
                        " (the server refused the API key sent)" if self._api_key else
                        " (the server wants an API key: pass api_key= or --api-key, or set "
                        "$SCORING_KIT_API_KEY)"
                    )
                raise ScoringAPIError(
                    f"{what} HTTP {status}: {message}{gave_up}",
                    status_code=status,
                    message=message,
                    backend=self.name,
                    retry_after=retry_after,
                )
            try:
                data = loads_json(resp.content)
            except ValueError as exc:
                cause = f"HTTP {status} body is not valid JSON ({exc})"
                if idempotent and attempt < policy.max_attempts:
                    await self._wait(policy, attempt, None, cause, what, shown)
                    continue
                snippet = self._redact(_snippet(resp.content, 200))
                msg = (
                    f"{what}: {cause} from {shown} after {attempt} attempt(s); "
                    f"body starts {snippet!r}"
                )
                raise ProtocolError(msg, backend=self.name) from exc
            if isinstance(data, Mapping) and data.get("error") not in (None, "", {}):
                message = self._redact(extract_message(data) or "unknown error")
                raise ScoringAPIError(
                    f"{what} error: {message}",
                    status_code=status,
                    message=message,
                    backend=self.name,
                )
            return status, data

    async def _wait(
        self,
        policy: RetryPolicy,
        attempt: int,
        retry_after: float | None,
        cause: str,
        what: str,
        shown: str,
    ) -> None:
        delay = policy.delay(attempt, retry_after=retry_after)
        self.stats.retries += 1
        logger.info(
            "%s: %s from %s; retry %d of %d in %.2f s%s",
            what,
            cause,
            shown,
            attempt,
            policy.max_attempts - 1,
            delay,
            " (Retry-After)" if retry_after is not None else "",
        )
        await policy.sleep(delay)


# --------------------------------------------------------------------------- parsing


def choice_text(data: Any, *, what: str, backend: str) -> str:
    """``choices[0].text`` of an OpenAI-style completion, or :class:`ProtocolError`."""
    try:
        text = data["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        msg = f"{what}: answer has no choices[0].text string; got {_compact(data)[:200]}"
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
