"""``SGLangScorer``: span totals from a stock SGLang server (backend name ``"sglang"``).

One ``POST /generate`` per prompt covers all of its spans::

    {"input_ids": [ids], "sampling_params": {"max_new_tokens": 0, "temperature": 0},
     "return_logprob": true, "logprob_start_len": s}

with ``s = first_span_start - 1``. ``meta_info.input_token_logprobs`` then has
``len(input_ids) - s`` entries ``[logprob | null, token_id, text | null]``; entry ``j``
(``j >= 1``) scores ``input_ids[s + j]`` given everything before it, and entry 0 is
``[null, input_ids[s], null]`` (listed, not scored). Tokens before ``s`` may come from
SGLang's radix cache, so shared prefixes are cheap.

Notes
-----
* ``max_new_tokens: 0`` makes the request prefill-only (SGLang ≥ 0.3); the scorer needs no
  generated token.
* ``priority`` is not sent: SGLang ignores it unless started with
  ``--enable-priority-scheduling``, and may answer 503 when it is disabled.
* Every token id is checked against the prompt; a mismatch or a ``null`` logprob at a
  scored position is a :class:`~scoring_kit.ProtocolError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._exceptions import ProtocolError, ScoringAPIError
from .._types import FloatArray
from ._common import StockHTTPBackend
from ._util import empty_scores, int_or
from .base import CompletionRequest, ScoreRequest, gather_in_order

if TYPE_CHECKING:
    from .._exceptions import BackendError

__all__ = ["SGLangScorer", "sum_input_token_logprobs"]

logger = logging.getLogger("scoring_kit.backends.sglang")

_WHAT = "sglang /generate"


def sum_input_token_logprobs(
    input_token_logprobs: Any,
    prompt: Sequence[int],
    ranges: Sequence[tuple[int, int]],
    logprob_start_len: int,
    *,
    what: str = _WHAT,
) -> FloatArray:
    """Span totals from SGLang's ``meta_info.input_token_logprobs``.

    Parameters
    ----------
    input_token_logprobs
        ``[[logprob | None, token_id, text | None], ...]``, ``len(prompt) - s`` entries.
    prompt
        The ``input_ids`` that were sent.
    ranges
        Half-open spans with ``start >= s + 1``.
    logprob_start_len
        ``s``, as sent.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(len(ranges),)``.

    Raises
    ------
    ProtocolError
        Wrong length, an entry that is not ``[lp, id, text]``, a token id other than the
        prompt's, or a ``null`` logprob at a scored position.

    Examples
    --------
    >>> itl = [[None, 5, None], [-1.0, 7, None], [-0.5, 9, None]]
    >>> sum_input_token_logprobs(itl, [5, 7, 9], [(1, 3)], 0)
    array([-1.5])
    """
    s = logprob_start_len
    n = len(prompt)
    if not isinstance(input_token_logprobs, list):
        msg = (
            f"{what}: answer has no meta_info.input_token_logprobs list (got "
            f"{type(input_token_logprobs).__name__}); the server ignored return_logprob"
        )
        raise ProtocolError(msg, backend="sglang")
    if len(input_token_logprobs) != n - s:
        msg = (
            f"{what}: expected {n - s} input_token_logprobs entries (prompt of {n} tokens, "
            f"logprob_start_len {s}), the server returned {len(input_token_logprobs)}"
        )
        raise ProtocolError(msg, backend="sglang")

    def entry(j: int) -> tuple[Any, int]:
        e = input_token_logprobs[j]
        if not isinstance(e, list | tuple) or len(e) < 2:
            msg = f"{what}: input_token_logprobs[{j}] is {e!r}, expected [logprob, token_id, text]"
            raise ProtocolError(msg, backend="sglang")
        token = int(prompt[s + j])
        if e[1] != token or isinstance(e[1], bool):
            msg = (
                f"{what}: input_token_logprobs[{j}] is for token {e[1]!r}, but prompt[{s + j}] "
                f"is {token}: the answer is not aligned with the prompt"
            )
            raise ProtocolError(msg, backend="sglang")
        return e[0], token

    entry(0)
    out = np.empty(len(ranges), dtype=np.float64)
    for k, (a, b) in enumerate(ranges):
        total = 0.0
        for t in range(a, b):
            value, token = entry(t - s)
            if isinstance(value, bool) or not isinstance(value, int | float):
                msg = (
                    f"{what}: input_token_logprobs[{t - s}] (prompt position {t}, token "
                    f"{token}) has logprob {value!r}, expected a number"
                )
                raise ProtocolError(msg, backend="sglang")
            total += float(value)
        out[k] = total
    return out


class SGLangScorer(StockHTTPBackend):
    """Scorer over a stock SGLang server (``/generate`` with ``input_token_logprobs``).

    Parameters
    ----------
    base_url
        Server root (a trailing ``/v1`` is dropped).
    model
        Informational only: ``/generate`` serves the loaded model.
    api_key, timeout, concurrency, retry, transport
        As for :class:`~scoring_kit.backends.http.ScoreClient`.
    max_model_len
        The model's context, checked locally when known.
    """

    name = "sglang"

    def _meta(self, data: Any) -> Mapping[str, Any]:
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        meta = data.get("meta_info") if isinstance(data, Mapping) else None
        if not isinstance(meta, Mapping):
            msg = f"{_WHAT}: answer has no meta_info object"
            raise ProtocolError(msg, backend=self.name)
        reason = meta.get("finish_reason")
        if isinstance(reason, Mapping) and reason.get("type") == "abort":
            message = self._redact(str(reason.get("message") or "request aborted"))
            code = reason.get("status_code")
            raise ScoringAPIError(
                f"{_WHAT} error: {message}",
                status_code=int_or(code, 200),
                message=message,
                backend=self.name,
            )
        return meta

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Total log-probability per range of ``request`` (one ``POST /generate``).

        Raises
        ------
        BackendPromptError
            Invalid span, or a prompt longer than ``max_model_len`` when known.
        ScoringAPIError, ProtocolError, BackendUnavailable
            As for :meth:`ScoreClient.score`.
        """
        if not request.ranges:
            return empty_scores()
        with self._tracking():
            self._check_request(request, max_len=self.max_model_len)
            self.stats.prompt_tokens += len(request.prompt)
            start = request.ranges[0][0] - 1
            body: dict[str, Any] = {
                "input_ids": list(request.prompt),
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "logprob_start_len": start,
            }
            _, data = await self._request_json("POST", self.url("/generate"), body, what=_WHAT)
            meta = self._meta(data)
            return sum_input_token_logprobs(
                meta.get("input_token_logprobs"), request.prompt, request.ranges, start
            )

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Baseline first (fills the radix cache), then the rest, ``concurrency`` in flight."""
        return await gather_in_order(self, requests, concurrency=self.concurrency)

    async def complete(self, request: CompletionRequest) -> str:
        """Generate with ``POST /generate``; return the ``text`` field.

        ``seed`` goes in as ``sampling_params.sampling_seed``; ``top_k <= 0`` as ``-1``
        (SGLang's "disabled").
        """
        params: dict[str, Any] = {
            "max_new_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k if request.top_k > 0 else -1,
            "stop_token_ids": list(request.stop_token_ids),
            "skip_special_tokens": False,
        }
        if request.seed is not None:
            params["sampling_seed"] = request.seed
        body = {"input_ids": list(request.prompt), "sampling_params": params}
        with self._tracking(prompt_tokens=len(request.prompt)):
            _, data = await self._request_json("POST", self.url("/generate"), body, what=_WHAT)
            if isinstance(data, list) and len(data) == 1:
                data = data[0]
            if isinstance(data, Mapping) and isinstance(data.get("meta_info"), Mapping):
                self._meta(data)  # raises on an aborted request
            text = data.get("text") if isinstance(data, Mapping) else None
            if not isinstance(text, str):
                msg = f"{_WHAT}: answer has no 'text' string"
                raise ProtocolError(msg, backend=self.name)
            return text
