"""``ScoreClient``: the seed's ``POST {base_url}/score`` protocol (backend name ``"score"``).

The wire format is in ``PROTOCOL.md``: the body is :meth:`ScoreRequest.body`, the answer
``{"scores": [{"range_index": i, "total_logprob": x}, ...]}``, one entry per range in range
order. Errors follow the reference client: ``score API HTTP <status>: <message>`` for a
non-2xx answer and ``score API error: <message>`` for a 2xx answer with an ``error`` field.

When the server offers ``POST /score/batch`` (``GET /health`` lists ``"score_batch"`` in its
``capabilities``), :meth:`ScoreClient.score_batch` sends the baseline alone and the other
requests in chunks, one round trip per chunk::

    {"model": m, "requests": [{"prompt": [...], "score_ranges": [[a, b], ...]}, ...]}
    -> {"results": [{"scores": [...]} | {"error": "..."}, ...]}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Self, Unpack

import httpx
import numpy as np

from .._exceptions import BackendError, ConfigError, ProtocolError, ScoringAPIError
from .._types import FloatArray
from ._common import BackendPromptError, HTTPBackend, HTTPOptions, with_http_options
from ._util import (
    choice_text,
    completion_body,
    empty_scores,
    extract_message,
    int_or,
    normalise_url,
)
from .base import CompletionRequest, ScoreRequest, gather_in_order
from .detect import probe

if TYPE_CHECKING:
    from .detect import Detection

__all__ = ["ScoreClient", "parse_scores"]

logger = logging.getLogger("scoring_kit.backends.http")

_WHAT = "score API"
#: Statuses meaning "this server has no /score/batch after all": fall back to /score.
_NO_ENDPOINT = frozenset({404, 405, 501})


def parse_scores(
    data: Any, n_ranges: int, *, what: str = _WHAT, backend: str = "score"
) -> FloatArray:
    """Totals from a ``/score`` answer, checked against the number of ranges sent.

    Parameters
    ----------
    data
        The decoded JSON answer.
    n_ranges
        How many ranges the request had.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(n_ranges,)``.

    Raises
    ------
    ProtocolError
        No ``scores`` list, a count other than ``n_ranges``, a ``range_index`` out of
        order, or a ``total_logprob`` that is not a number.

    Examples
    --------
    >>> parse_scores({"scores": [{"range_index": 0, "total_logprob": -1.5}]}, 1)
    array([-1.5])
    """
    scores = data.get("scores") if isinstance(data, Mapping) else None
    if not isinstance(scores, list):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        msg = f"{what}: answer has no 'scores' list (got {keys})"
        raise ProtocolError(msg, backend=backend)
    if len(scores) != n_ranges:
        msg = (
            f"{what}: expected {n_ranges} scores (one per range), the server returned {len(scores)}"
        )
        raise ProtocolError(msg, backend=backend)
    out = np.empty(n_ranges, dtype=np.float64)
    for i, item in enumerate(scores):
        if not isinstance(item, Mapping):
            msg = f"{what}: score {i} is {type(item).__name__}, expected an object"
            raise ProtocolError(msg, backend=backend)
        index = item.get("range_index", i)
        if index != i or isinstance(index, bool):
            msg = f"{what}: score {i} has range_index {index!r}, expected {i} (range order)"
            raise ProtocolError(msg, backend=backend)
        value = item.get("total_logprob")
        if isinstance(value, bool) or not isinstance(value, int | float):
            msg = f"{what}: score {i} has total_logprob {value!r}, expected a number"
            raise ProtocolError(msg, backend=backend)
        out[i] = float(value)
    return out


class ScoreClient(HTTPBackend):
    """Client of the seed's ``/score`` endpoint (and ``/score/batch``, ``/completions``,
    ``/train``).

    Parameters
    ----------
    base_url
        What the endpoints hang off: ``POST {base_url}/score``. Kept as given (a trailing
        ``/v1`` stays; the embedded server answers both ``/score`` and ``/v1/score``).
    model
        Model name sent in every body.
    batch
        ``"auto"``: use ``/score/batch`` when ``GET /health`` lists ``score_batch`` (probed
        once, on the first :meth:`score_batch`); ``True``: always; ``False``: never.
    batch_size
        Requests per ``/score/batch`` round trip.
    api_key
        Sent as ``authorization: Bearer <key>``; ``None`` reads ``$SCORING_KIT_API_KEY``.
        Never shown in errors, reprs or logs.
    timeout
        Seconds per request (the reference client uses 300 s).
    concurrency
        Pool size and requests in flight in :meth:`score_batch`.
    retry
        :class:`~scoring_kit.backends._retry.RetryPolicy` (default ``RetryPolicy()``).
    transport
        httpx transport replacing the network (tests).

    The last five are the :class:`~scoring_kit.backends._common.HTTPOptions` every HTTP
    backend takes.

    Examples
    --------
    >>> client = ScoreClient("http://127.0.0.1:8000", model="smollm2")
    >>> client
    ScoreClient(base_url='http://127.0.0.1:8000', model='smollm2')
    """

    name = "score"

    @with_http_options
    def __init__(
        self,
        base_url: str,
        *,
        model: str = "default",
        batch: bool | Literal["auto"] = "auto",
        batch_size: int = 16,
        **options: Unpack[HTTPOptions],
    ) -> None:
        if batch not in ("auto", True, False):
            msg = f"batch must be 'auto', True or False, got {batch!r}"
            raise ConfigError(msg)
        if batch_size < 1:
            msg = f"batch_size must be >= 1, got {batch_size}"
            raise ConfigError(msg)
        super().__init__(normalise_url(base_url), model=model, **options)
        self.model: str = model
        self.batch = batch
        self.batch_size = int(batch_size)
        self._batch_supported: bool | None = None if batch == "auto" else bool(batch)
        self.capabilities: frozenset[str] | None = None

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
        """The client :func:`~scoring_kit.backends.auto.make_scorer` builds for ``detection``.

        ``model`` defaults to the one the server reported, else ``"default"``.
        """
        scorer = cls(
            base_url,
            model=model or detection.model or "default",
            api_key=api_key,
            concurrency=concurrency,
            transport=transport,
        )
        scorer.detection = detection
        return scorer

    # -- /score ------------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Total log-probability per range of ``request`` (one ``POST /score``).

        Returns an empty array, without a round trip, when the request has no ranges.

        Raises
        ------
        BackendPromptError
            A range is invalid (checked locally, nothing is sent).
        ScoringAPIError
            The server answered non-2xx, or 2xx with an ``error`` field.
        ProtocolError
            The answer does not hold one number per range.
        BackendUnavailable
            The server could not be reached after the retries.
        """
        if not request.ranges:
            return empty_scores()
        with self._tracking():
            self._check_request(request)
            self.stats.prompt_tokens += len(request.prompt)
            _, data = await self._request_json(
                "POST", self.url("/score"), request.body(self.model), what=_WHAT
            )
            return parse_scores(data, len(request.ranges), backend=self.name)

    async def _score_slot(self, request: ScoreRequest) -> FloatArray | BackendError:
        try:
            return await self.score(request)
        except BackendError as exc:
            return exc

    # -- batches -----------------------------------------------------------------------

    async def batch_available(self) -> bool:
        """Whether :meth:`score_batch` uses ``/score/batch`` (probes ``GET /health`` once)."""
        if self._batch_supported is not None:
            return self._batch_supported
        health = normalise_url(self.base_url, strip_v1=True) + "/health"
        res = await probe(await self._client(), "GET", health, "/health")
        caps: frozenset[str] = frozenset()
        if res.ok and isinstance(res.body, Mapping):
            raw = res.body.get("capabilities")
            if isinstance(raw, list | tuple):
                caps = frozenset(str(c) for c in raw)
        self.capabilities = caps
        self._batch_supported = "score_batch" in caps
        logger.debug(
            "%r: %s; /score/batch %s",
            self,
            self._redact(res.describe()),
            "used" if self._batch_supported else "not offered",
        )
        return self._batch_supported

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Score many requests; each slot holds the totals or the error that request met.

        ``requests[0]`` (the baseline) is sent first and alone. With ``/score/batch`` the
        rest go in chunks of ``batch_size``, up to ``concurrency`` chunks in flight;
        otherwise one ``/score`` each, ``concurrency`` in flight.
        """
        reqs = list(requests)
        if not reqs:
            return []
        if not await self.batch_available():
            return await gather_in_order(self, reqs, concurrency=self.concurrency)
        out: list[FloatArray | BackendError | None] = [None] * len(reqs)
        out[0] = await self._score_slot(reqs[0])
        pending: list[int] = []
        for i in range(1, len(reqs)):
            req = reqs[i]
            if not req.ranges:
                out[i] = empty_scores()
                continue
            try:
                self._check_request(req)
            except BackendPromptError as exc:
                self.stats.calls += 1
                self.stats.failed_calls += 1
                out[i] = exc
                continue
            pending.append(i)
        sem = asyncio.Semaphore(self.concurrency)

        async def run_chunk(idx: list[int]) -> None:
            async with sem:
                results = await self._score_chunk([reqs[i] for i in idx])
            for i, res in zip(idx, results, strict=True):
                out[i] = res

        chunks = [pending[k : k + self.batch_size] for k in range(0, len(pending), self.batch_size)]
        await asyncio.gather(*(run_chunk(c) for c in chunks))
        return [r if r is not None else empty_scores() for r in out]

    async def _score_chunk(self, reqs: list[ScoreRequest]) -> list[FloatArray | BackendError]:
        """One ``/score/batch`` round trip for already-validated requests with ranges."""
        if self._batch_supported is False:  # the endpoint vanished: fall back
            return [await self._score_slot(r) for r in reqs]
        items = []
        for r in reqs:
            item = r.body(self.model)
            del item["model"]
            items.append(item)
        body = {"model": self.model, "requests": items}
        n = len(reqs)
        self.stats.calls += n
        self.stats.prompt_tokens += sum(len(r.prompt) for r in reqs)
        try:
            status, data = await self._request_json(
                "POST", self.url("/score/batch"), body, what=_WHAT
            )
        except ScoringAPIError as exc:
            if exc.status_code in _NO_ENDPOINT and self.batch == "auto":
                logger.info("%r: /score/batch answered %s; using /score", self, exc.status_code)
                self._batch_supported = False
                self.stats.calls -= n
                self.stats.prompt_tokens -= sum(len(r.prompt) for r in reqs)
                return [await self._score_slot(r) for r in reqs]
            self.stats.failed_calls += n
            return [exc] * n
        except BackendError as exc:
            self.stats.failed_calls += n
            return [exc] * n
        results = data.get("results") if isinstance(data, Mapping) else None
        if not isinstance(results, list) or len(results) != n:
            got = len(results) if isinstance(results, list) else "no 'results' list"
            err = ProtocolError(
                f"{_WHAT}: /score/batch expected {n} results (one per request), got {got}",
                backend=self.name,
            )
            self.stats.failed_calls += n
            return [err] * n
        out: list[FloatArray | BackendError] = []
        for k, (req, item) in enumerate(zip(reqs, results, strict=True)):
            try:
                out.append(self._parse_batch_item(item, req, k, status))
            except BackendError as exc:
                self.stats.failed_calls += 1
                out.append(exc)
        return out

    def _parse_batch_item(self, item: Any, req: ScoreRequest, k: int, status: int) -> FloatArray:
        if not isinstance(item, Mapping):
            msg = f"{_WHAT}: /score/batch result {k} is {type(item).__name__}, expected an object"
            raise ProtocolError(msg, backend=self.name)
        if item.get("error") not in (None, "", {}):
            message = self._redact(extract_message(item) or "unknown error")
            code = item.get("status_code", item.get("status"))
            raise ScoringAPIError(
                f"{_WHAT} error: {message}",
                status_code=int_or(code, status),
                message=message,
                backend=self.name,
            )
        return parse_scores(
            item, len(req.ranges), what=f"{_WHAT} (batch result {k})", backend=self.name
        )

    # -- /completions and /train ----------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> str:
        """Generate a continuation with ``POST {base_url}/completions``; ``choices[0].text``."""
        body = completion_body(request, self.model)
        if request.priority is not None:
            body["priority"] = request.priority
        with self._tracking(prompt_tokens=len(request.prompt)):
            _, data = await self._request_json(
                "POST", self.url("/completions"), body, what="completions API"
            )
            return choice_text(data, what="completions API", backend=self.name)

    async def train(self, samples: Sequence[Mapping[str, Any]]) -> str:
        """Send fine-tuning samples to ``POST {base_url}/train``; return the ``job_id``.

        Parameters
        ----------
        samples
            ``[{"context_ids": [...], "continuation_ids": [...]}, ...]``.

        Raises
        ------
        ConfigError
            ``samples`` is empty (a ``ValueError``).
        ProtocolError
            The answer has no ``job_id``.

        Notes
        -----
        Training is not idempotent, so only failures where the server certainly did not act
        (connect errors, 429, 503) are retried.
        """
        if not samples:
            msg = "no samples to train"
            raise ConfigError(msg)
        body = {"training_data": {"samples": [dict(s) for s in samples]}}
        with self._tracking():
            _, data = await self._request_json(
                "POST", self.url("/train"), body, what="train API", idempotent=False
            )
            job = data.get("job_id") if isinstance(data, Mapping) else None
            if isinstance(job, int) and not isinstance(job, bool):
                job = str(job)
            if not isinstance(job, str) or not job:
                keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
                msg = f"train API: answer has no job_id (got {keys})"
                raise ProtocolError(msg, backend=self.name)
            return job
