"""Retry policy for the HTTP backends: exponential backoff, jitter, ``Retry-After``.

What is retried (see :meth:`RetryPolicy.retries_exception` and
:meth:`RetryPolicy.retries_status`):

* transport failures (``httpx.TransportError``): connect errors, connect/read/write/pool
  timeouts, connection resets and truncated responses;
* the statuses in ``retry_statuses`` (429, 502, 503, 504 by default), waiting what a
  ``Retry-After`` header asks for (seconds or an HTTP date, capped at ``max_delay``);
* 2xx answers whose body is not valid JSON (truncated or garbled).

Scoring and completion requests are idempotent and get all of the above. A request that is
not idempotent (``/train``) is only retried where the server certainly did not act on it:
connect errors, pool timeouts, 429 and 503. Any other 4xx is never retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from .._exceptions import ConfigError

__all__ = ["DEFAULT_RETRY_STATUSES", "RetryPolicy", "Sleep", "parse_retry_after"]

#: An awaitable sleep, ``asyncio.sleep`` by default; tests inject one that records delays.
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_RETRY_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})

#: Statuses that mean "not processed, come back later": safe to retry even when the request
#: is not idempotent.
_NOT_PROCESSED_STATUSES = frozenset({429, 503})

#: Transport errors raised before the request reached the server.
_NOT_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an HTTP backend retries a failed request.

    Parameters
    ----------
    max_attempts
        Total attempts including the first (``1`` disables retrying).
    base_delay
        Backoff before the first retry, in seconds; doubled on each further retry.
    max_delay
        Upper bound for one wait, backoff and ``Retry-After`` alike, in seconds.
    jitter
        Fraction of each backoff that is randomised, in ``[0, 1]``: the wait is
        ``d * (1 - jitter) + uniform(0, d * jitter)``. ``1.0`` is "full jitter", ``0.5``
        (the default) "equal jitter", ``0.0`` none. A ``Retry-After`` wait is not jittered.
    retry_statuses
        HTTP statuses that are retried (429, 502, 503, 504 by default).
    sleep
        The awaitable used to wait, ``asyncio.sleep`` by default. Tests pass a recorder.
    rng
        Random source for the jitter (``random.Random()`` when ``None``).

    Examples
    --------
    >>> RetryPolicy(jitter=0.0).backoff(3)
    2.0
    >>> RetryPolicy().delay(1, retry_after=120.0)
    30.0
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5
    retry_statuses: Collection[int] = DEFAULT_RETRY_STATUSES
    sleep: Sleep = asyncio.sleep
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            msg = f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}"
            raise ConfigError(msg)
        if self.base_delay < 0 or self.max_delay < 0:
            msg = (
                f"RetryPolicy delays must be >= 0, got base_delay={self.base_delay}, "
                f"max_delay={self.max_delay}"
            )
            raise ConfigError(msg)
        if not 0.0 <= self.jitter <= 1.0:
            msg = f"RetryPolicy.jitter must be in [0, 1], got {self.jitter}"
            raise ConfigError(msg)
        object.__setattr__(self, "retry_statuses", frozenset(int(s) for s in self.retry_statuses))

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes exactly one attempt."""
        return cls(max_attempts=1)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), jitter included."""
        d = min(self.max_delay, self.base_delay * (2.0 ** max(0, retry - 1)))
        if self.jitter <= 0.0 or d <= 0.0:
            return d
        rng = self.rng if self.rng is not None else random
        return d * (1.0 - self.jitter) + rng.uniform(0.0, d * self.jitter)

    def delay(self, retry: int, *, retry_after: float | None = None) -> float:
        """The wait before retry ``retry``: ``Retry-After`` when given (capped), else backoff."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_delay)
        return self.backoff(retry)

    def retries_status(self, status: int, *, idempotent: bool = True) -> bool:
        """Whether an answer with HTTP ``status`` is retried."""
        if status not in self.retry_statuses:
            return False
        return idempotent or status in _NOT_PROCESSED_STATUSES

    @staticmethod
    def retries_exception(exc: BaseException, *, idempotent: bool = True) -> bool:
        """Whether a transport failure is retried."""
        if not isinstance(exc, httpx.TransportError):
            return False
        if idempotent:
            return True
        return isinstance(exc, _NOT_SENT_ERRORS)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header value, or ``None``.

    Accepts delta-seconds (``"120"``, ``"1.5"``) and an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``); a date in the past gives ``0.0``.

    Examples
    --------
    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        secs = float(text)
    except ValueError:
        pass
    else:
        if secs != secs or secs in (float("inf"), float("-inf")):  # NaN / inf
            return None
        return max(0.0, secs)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ref = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - ref).total_seconds())
