"""httpx plumbing shared by the HTTP backends (``score``, ``vllm``, ``sglang``).

The pure URL / JSON helpers are in :mod:`~scoring_kit.backends._util`, the probes in
:mod:`~scoring_kit.backends.detect`.

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
import inspect
import logging
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Self, TypedDict, TypeVar, Unpack, cast

import httpx

from .._exceptions import (
    BackendError,
    BackendPromptError,
    BackendUnavailable,
    ConfigError,
    PromptError,
    ProtocolError,
    ScoringAPIError,
)
from ._retry import RetryPolicy, parse_retry_after
from ._util import (
    API_KEY_ENV,
    display_url,
    dumps_json,
    error_message,
    extract_message,
    json_headers,
    loads_json,
    normalise_url,
    resolve_api_key,
    snippet,
)
from .base import ScoreRequest, ScorerStats, validate_score_request

if TYPE_CHECKING:
    from .detect import Detection

__all__ = [
    "API_KEY_ENV",
    "BackendPromptError",
    "HTTPBackend",
    "HTTPOptions",
    "StockHTTPBackend",
    "resolve_api_key",
    "with_http_options",
]

logger = logging.getLogger("scoring_kit.backends")

_USER_AGENT = "scoring_kit/0.1 (+httpx)"


# --------------------------------------------------------------------------- base class


class HTTPOptions(TypedDict, total=False):
    """The connection options every HTTP backend takes by keyword.

    Written once: the defaults and their meaning are those of :class:`HTTPBackend`
    (``api_key=None``, ``timeout=300.0``, ``concurrency=4``, ``retry=None``,
    ``transport=None``); a backend's constructor takes ``**options: Unpack[HTTPOptions]``
    and passes them on.
    """

    api_key: str | None
    timeout: float | httpx.Timeout | None
    concurrency: int
    retry: RetryPolicy | None
    transport: httpx.AsyncBaseTransport | None


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
    #: What :func:`~scoring_kit.backends.detect.detect_backend` found (set by
    #: :func:`~scoring_kit.backends.auto.make_scorer`; ``None`` for a scorer built directly).
    detection: Detection | None = None

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
            raise ConfigError(msg)
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
        headers = json_headers(self._api_key, **{"user-agent": _USER_AGENT})
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
                head = self._redact(snippet(resp.content, 200))
                msg = (
                    f"{what}: {cause} from {shown} after {attempt} attempt(s); "
                    f"body starts {head!r}"
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


# --------------------------------------------------------------------------- constructors


_F = TypeVar("_F", bound=Callable[..., None])


def with_http_options(init: _F) -> _F:
    """Give a backend ``__init__`` that takes ``**options: Unpack[HTTPOptions]`` its real
    signature: its own parameters, then :class:`HTTPBackend`'s keyword options with their
    defaults, so ``inspect.signature`` and Jupyter's ``?`` list every keyword."""
    own = inspect.signature(init)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in params}
    shared = inspect.signature(HTTPBackend.__init__).parameters.values()
    params += [p for p in shared if p.name in HTTPOptions.__annotations__ and p.name not in names]
    cast("Any", init).__signature__ = own.replace(parameters=params)
    return init


class StockHTTPBackend(HTTPBackend):
    """Shared by the stock-server backends (vLLM, SGLang): the server root (a trailing
    ``/v1`` is dropped), an optional model name, and the model's context length.

    Parameters
    ----------
    base_url
        Server root, with or without a trailing ``/v1``.
    model
        Served model name (``None``: the backend resolves or ignores it).
    max_model_len
        The model's context, checked locally when known.
    **options
        :class:`HTTPOptions`: ``api_key``, ``timeout``, ``concurrency``, ``retry``,
        ``transport``.
    """

    @with_http_options
    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        max_model_len: int | None = None,
        **options: Unpack[HTTPOptions],
    ) -> None:
        super().__init__(normalise_url(base_url, strip_v1=True), model=model, **options)
        self.max_model_len = max_model_len

    @classmethod
    def from_detection(
        cls,
        base_url: str,
        detection: Detection,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Self:
        """The scorer :func:`~scoring_kit.backends.auto.make_scorer` builds for ``detection``
        (model and ``max_model_len`` as the server reported them, unless ``model`` is given).
        """
        scorer = cls(
            base_url,
            model=model or detection.model,
            api_key=api_key,
            concurrency=concurrency,
            transport=transport,
            max_model_len=detection.max_model_len,
        )
        scorer.detection = detection
        return scorer
