"""Several servers as one scorer: :class:`ReplicaPool` spreads calls over replicas.

A user who outgrows one GPU runs several replicas of the same model (vLLM, SGLang or the
kit's own server) and passes every URL (``--server A --server B``; ``make_scorer([a, b])``).
Each URL is detected on its own; the replicas must agree on backend kind, model and
``max_model_len`` (:func:`check_replicas_agree`, a one-line :class:`~scoring_kit.ConfigError`
otherwise). The pool then behaves as one :class:`~scoring_kit.backends.base.Scorer`:

* **spreading** – ``score_batch`` cuts ``requests[1:]`` into one contiguous piece per
  replica in service (neighbouring ablations share the longest prefixes) and gives each piece
  to the replica with the least outstanding work (prompt tokens in flight, then tokens served
  so far). Each replica's own backend sends its piece with its own bounded concurrency (its
  connection pool holds ``concurrency`` connections), so the in-flight requests per replica
  stay bounded.
* **prefix caches** – ``requests[0]`` (the baseline, by the protocol's rule) goes to every
  replica before its piece, unless that replica already scored that very prompt (the pool
  remembers the last few prompts each replica scored, with their totals), so every replica's
  prefix cache is warm for its ablations. The flows send the baseline as that lead request
  when a scorer sets ``lead_each_batch`` (this class does).
* **failures** – a call that fails on a replica for a reason of the replica's (no answer or
  a timeout after the backend's own retries, HTTP 5xx or 429, an unusable answer; see
  :func:`is_replica_fault`) is sent again to another replica, and the replica is taken out of
  rotation for ``rest_s`` seconds (it is still tried when every other replica has failed that
  call). Each such event is a :class:`ReplicaFailure` in :attr:`ReplicaPool.failures`, a
  logged warning, and part of :meth:`ReplicaPool.run_meta` (which the matrix flows add to a
  result's ``meta``). A fault of the request itself (a prompt too long, a 4xx) is the same
  on every replica and is returned as it is. A call fails only once every replica failed it.

Replicas that serve the same model give the same numbers as one server: each request is
scored whole by one replica, and only where it goes changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .._exceptions import (
    BackendError,
    BackendPromptError,
    BackendUnavailable,
    ConfigError,
    ProtocolError,
    ScoringAPIError,
)
from .._types import FloatArray
from ._util import display_url, normalise_url
from .base import CompletionRequest, Scorer, ScoreRequest, ScorerStats
from .detect import Detection

__all__ = ["ReplicaFailure", "ReplicaPool", "check_replicas_agree", "is_replica_fault"]

logger = logging.getLogger("scoring_kit.backends.replicas")

_T = TypeVar("_T")
#: Prompts (with their totals) remembered per replica, to skip re-sending a warm lead.
_WARM_ENTRIES = 8


def is_replica_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the replica's fault (worth another replica), not the request's.

    Yes: :class:`~scoring_kit.BackendUnavailable` (no answer, timeouts), a
    :class:`~scoring_kit.ProtocolError` (an unusable answer), a
    :class:`~scoring_kit.ScoringAPIError` with HTTP 5xx or 429. No: a
    :class:`~scoring_kit.BackendPromptError` (checked locally) and any other status (a 4xx,
    or a 2xx with an ``error`` field): another replica would say the same.
    """
    if isinstance(exc, BackendPromptError):
        return False
    if isinstance(exc, BackendUnavailable | ProtocolError):
        return True
    if isinstance(exc, ScoringAPIError):
        status = exc.status_code
        return status is None or status >= 500 or status == 429
    return False


def _key(url: str) -> str:
    return normalise_url(url, strip_v1=True)


def check_replicas_agree(urls: Sequence[str], detections: Sequence[Detection]) -> None:
    """Refuse replicas that differ in backend kind, model or ``max_model_len``.

    Raises
    ------
    ConfigError
        One line naming the two URLs and what differs (also for a URL given twice).
    """
    seen: dict[str, str] = {}
    for url in urls:
        if _key(url) in seen:
            msg = f"replica {display_url(url)} is given twice; pass each server once"
            raise ConfigError(msg)
        seen[_key(url)] = url
    first, ref = urls[0], detections[0]
    for url, det in zip(urls[1:], detections[1:], strict=True):
        for what, a, b in (
            ("backend", ref.backend, det.backend),
            ("model", ref.model, det.model),
            ("max_model_len", ref.max_model_len, det.max_model_len),
        ):
            if a != b:
                msg = (
                    f"replicas disagree on {what}: {display_url(first)} has {a!r}, "
                    f"{display_url(url)} has {b!r}; every replica must serve the same model"
                )
                raise ConfigError(msg)


@dataclass(frozen=True, slots=True)
class ReplicaFailure:
    """One replica failing some calls: ``moved`` of them were sent to another replica."""

    url: str
    error: str
    moved: int

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "error": self.error, "moved": self.moved}


@dataclass(slots=True, eq=False)
class _Replica:
    scorer: Scorer
    url: str
    index: int
    outstanding: int = 0  # prompt tokens in flight
    served_tokens: int = 0
    served: int = 0  # calls answered (scores, or a fault of the request's own)
    failed: int = 0  # calls that failed here for the replica's reasons
    down_since: float | None = None
    warm: OrderedDict[str, FloatArray] = field(default_factory=OrderedDict)

    def remember(self, key: str, scores: FloatArray) -> None:
        self.warm[key] = scores
        self.warm.move_to_end(key)
        while len(self.warm) > _WARM_ENTRIES:
            self.warm.popitem(last=False)


def _digest(request: ScoreRequest) -> str:
    h = hashlib.blake2b(np.asarray(request.prompt, dtype=np.int64).tobytes(), digest_size=16)
    h.update(np.asarray(request.ranges, dtype=np.int64).tobytes())
    for im in request.images:
        h.update(im.data_uri().encode())
    return h.hexdigest()


def _pieces(idx: list[int], k: int) -> list[list[int]]:
    """``idx`` cut into ``k`` (at most ``len(idx)``) contiguous, near-equal pieces."""
    k = max(1, min(k, len(idx)))
    step, extra = divmod(len(idx), k)
    out, at = [], 0
    for p in range(k):
        size = step + (1 if p < extra else 0)
        out.append(idx[at : at + size])
        at += size
    return out


class ReplicaPool:
    """One scorer over several replicas of the same model (see the module notes).

    Parameters
    ----------
    scorers
        One backend per replica (all of one kind), e.g. from
        :func:`~scoring_kit.backends.auto.make_scorer` given a list of URLs.
    urls
        The replicas' URLs, for messages and ``meta`` (default: each scorer's ``base_url``).
    rest_s
        Seconds a failed replica stays out of rotation before it is tried again.
    """

    #: the flows send the baseline first in every batch (it warms each replica's cache)
    lead_each_batch = True

    def __init__(
        self,
        scorers: Sequence[Scorer],
        *,
        urls: Sequence[str] | None = None,
        rest_s: float = 60.0,
    ) -> None:
        if not scorers:
            raise ConfigError("a replica pool needs at least one scorer")
        names = {s.name for s in scorers}
        if len(names) != 1:
            raise ConfigError(f"replicas must be of one backend kind, got {sorted(names)}")
        given = list(urls) if urls is not None else [
            str(getattr(s, "base_url", f"replica {i}")) for i, s in enumerate(scorers)]
        if len(given) != len(scorers):
            raise ConfigError(f"{len(given)} URLs for {len(scorers)} replicas")
        self.name: str = scorers[0].name
        self.detection: Detection | None = getattr(scorers[0], "detection", None)
        self.rest_s = float(rest_s)
        self.stats = ScorerStats()
        self.failures: list[ReplicaFailure] = []
        self._reps = [_Replica(s, display_url(u), i)
                      for i, (s, u) in enumerate(zip(scorers, given, strict=True))]
        self._calls = self._failed = self._failovers = 0

    def __repr__(self) -> str:
        return f"ReplicaPool({self.name!r}, {[r.url for r in self._reps]})"

    @property
    def replicas(self) -> tuple[Scorer, ...]:
        """The backends, one per replica, in the order given."""
        return tuple(r.scorer for r in self._reps)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(r.url for r in self._reps)

    # -- choosing a replica -------------------------------------------------------------

    def _resting(self, rep: _Replica) -> bool:
        return rep.down_since is not None and time.monotonic() - rep.down_since < self.rest_s

    def _pick(self, tried: set[int]) -> _Replica | None:
        """The untried replica with the least outstanding work (resting ones last)."""
        left = [r for r in self._reps if r.index not in tried]
        if not left:
            return None
        return min(left, key=lambda r: (self._resting(r), r.outstanding, r.served_tokens, r.index))

    def _in_service(self) -> int:
        return max(1, sum(not self._resting(r) for r in self._reps))

    def _fail(self, rep: _Replica, exc: BaseException, moved: int) -> None:
        rep.down_since = time.monotonic()
        rep.failed += moved
        self._failovers += moved
        error = str(exc) or type(exc).__name__
        self.failures.append(ReplicaFailure(rep.url, error, moved))
        logger.warning(
            "replica %s failed %d call(s) (%s); sending them to another replica, and "
            "resting it for %.0f s", rep.url, moved, error, self.rest_s)

    def _sync_stats(self) -> None:
        s = self.stats
        reps = [r.scorer.stats for r in self._reps]
        s.calls, s.failed_calls = self._calls, self._failed
        s.retries = sum(r.retries for r in reps)
        s.prompt_tokens = sum(r.prompt_tokens for r in reps)
        s.computed_tokens = sum(r.computed_tokens for r in reps)
        s.extra["replica_failovers"] = float(self._failovers)
        for rep in self._reps:
            s.extra[f"calls@{rep.url}"] = float(rep.served)

    # -- single calls -------------------------------------------------------------------

    async def _failover(
        self, call: Callable[[Scorer], Awaitable[_T]], tokens: int
    ) -> tuple[_T | None, BackendError | None, _Replica | None]:
        """Run ``call`` on replicas until one answers; ``(result, error, replica)``."""
        tried: set[int] = set()
        last: BackendError | None = None
        while (rep := self._pick(tried)) is not None:
            tried.add(rep.index)
            rep.outstanding += tokens
            try:
                result = await call(rep.scorer)
            except BackendError as exc:
                if not is_replica_fault(exc):
                    rep.served += 1
                    return None, exc, rep
                self._fail(rep, exc, 1)
                last = exc
                continue
            finally:
                rep.outstanding -= tokens
            rep.down_since = None
            rep.served += 1
            rep.served_tokens += tokens
            return result, None, rep
        return None, last, None

    async def _score_one(self, request: ScoreRequest) -> FloatArray | BackendError:
        result, err, rep = await self._failover(lambda s: s.score(request), len(request.prompt))
        if err is not None or result is None:
            return err if err is not None else BackendUnavailable("no replica to score on")
        if rep is not None:
            rep.remember(_digest(request), result)
        return result

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Score ``request`` on the least busy replica (another one if that one fails)."""
        out = await self._score_one(request)
        self._calls += 1
        self._failed += isinstance(out, BaseException)
        self._sync_stats()
        if isinstance(out, BaseException):
            raise out
        return out

    async def complete(self, request: CompletionRequest) -> str:
        """Generate on the least busy replica (another one if that one fails)."""
        result, err, _ = await self._failover(lambda s: s.complete(request), len(request.prompt))
        self._sync_stats()
        if err is not None:
            raise err
        assert result is not None
        return result

    # -- batches ------------------------------------------------------------------------

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Score many requests over the replicas; each slot holds the totals or the error.

        ``requests[0]`` goes first to every replica taking part (unless it has scored that
        prompt already); the others are cut into one contiguous piece per replica in
        service. A piece's calls that fail for the replica's reasons go to another replica.
        """
        reqs = list(requests)
        if not reqs:
            return []
        out: list[FloatArray | BackendError | None] = [None] * len(reqs)
        lead_key = _digest(reqs[0])
        pieces = _pieces(list(range(1, len(reqs))), self._in_service())
        await asyncio.gather(*(self._run_piece(reqs, p, lead_key, out) for p in pieces if p))
        head = out[0]
        if head is None or (isinstance(head, BaseException) and is_replica_fault(head)):
            out[0] = await self._score_one(reqs[0])
        done: list[FloatArray | BackendError] = [
            r if r is not None else BackendUnavailable("no replica to score on") for r in out]
        self._calls += len(done)
        self._failed += sum(isinstance(r, BaseException) for r in done)
        self._sync_stats()
        return done

    async def _run_piece(
        self,
        reqs: list[ScoreRequest],
        idx: list[int],
        lead_key: str,
        out: list[FloatArray | BackendError | None],
    ) -> None:
        """Score ``reqs[i] for i in idx`` on one replica, the faulted rest on others."""
        tried: set[int] = set()
        while idx and (rep := self._pick(tried)) is not None:
            tried.add(rep.index)
            send_lead = lead_key not in rep.warm
            sub = ([reqs[0]] if send_lead else []) + [reqs[i] for i in idx]
            tokens = sum(len(r.prompt) for r in sub)
            rep.outstanding += tokens
            try:
                res = await rep.scorer.score_batch(sub)
            finally:
                rep.outstanding -= tokens
            if send_lead:
                head, res = res[0], res[1:]
                if not isinstance(head, BaseException):
                    rep.remember(lead_key, head)
                if out[0] is None or isinstance(out[0], BaseException):
                    out[0] = head
            elif out[0] is None:
                out[0] = rep.warm[lead_key]
                rep.warm.move_to_end(lead_key)
            moved: list[int] = []
            for i, r in zip(idx, res, strict=True):
                out[i] = r
                if isinstance(r, BaseException) and is_replica_fault(r):
                    moved.append(i)
            rep.served += len(idx) - len(moved) + int(send_lead and not moved)
            rep.served_tokens += tokens
            fault = out[moved[0]] if moved else None
            if isinstance(fault, BaseException):
                self._fail(rep, fault, len(moved))
            else:
                rep.down_since = None
            idx = moved

    # -- reporting and shutdown ---------------------------------------------------------

    def run_meta(self) -> dict[str, Any]:
        """What a result's ``meta`` records of the replicas: each one's URL, calls answered
        and calls failed, and every failure (``replica_failures``)."""
        return {
            "replicas": [
                {"url": r.url, "calls": r.served, "failed": r.failed} for r in self._reps
            ],
            "replica_failures": [f.as_dict() for f in self.failures],
        }

    async def aclose(self) -> None:
        """Close every replica's backend."""
        await asyncio.gather(*(r.scorer.aclose() for r in self._reps))
