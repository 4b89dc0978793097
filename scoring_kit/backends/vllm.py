"""``VLLMScorer``: span totals from a stock vLLM server (backend name ``"vllm"``).

One ``POST /v1/completions`` per prompt::

    {"model": m, "prompt": [ids], "max_tokens": 1, "temperature": 0,
     "prompt_logprobs": 0, "stream": false}

``choices[0].prompt_logprobs`` is a list aligned with the prompt (entry 0 is ``null``);
entry ``t`` maps token ids (as strings) to ``{"logprob", "rank", "decoded_token"}`` and
always holds the prompt token itself. The total of span ``[a, b)`` is
``sum(prompt_logprobs[t][str(prompt[t])]["logprob"] for t in range(a, b))``.

Notes
-----
* vLLM clamps ``-inf`` to ``-9999.0`` before sending; this scorer turns any value
  ``<= -9999.0`` back into ``-inf``, so a span holding an impossible token totals ``-inf``.
* vLLM never reads its prefix cache for a request that asks for prompt logprobs, and it
  materialises vocabulary-sized logits for the prompt positions of a whole prefill chunk;
  long prompts cost a full prefill each and can run the GPU out of memory (lower
  ``--max-num-batched-tokens``). A :class:`CostWarning` says so once per scorer. The seed's
  ``/score`` (backend ``"score"``) avoids both.
* With ``max_tokens: 1`` a prompt may have at most ``max_model_len - 1`` tokens; longer ones
  are refused locally with a :class:`~scoring_kit.backends._common.BackendPromptError`.
* ``priority`` is sent only when non-zero; a server that answers 400 naming ``priority``
  (vLLM 0.8 V1: "V1 does not support priority yet") gets the request again without it, and
  never again after that.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Unpack

import numpy as np

from .._exceptions import CostWarning, ProtocolError, ScoringAPIError
from .._types import FloatArray
from ..wire import VLLM_NEG_INF
from ._common import BackendPromptError, HTTPOptions, StockHTTPBackend, with_http_options
from ._util import choice_text, completion_body, empty_scores, logprob_value
from .base import CompletionRequest, ScoreRequest, gather_in_order

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._exceptions import BackendError

__all__ = ["VLLM_NEG_INF", "CostWarning", "VLLMScorer", "sum_prompt_logprobs"]

logger = logging.getLogger("scoring_kit.backends.vllm")

_WHAT = "vllm /v1/completions"


def sum_prompt_logprobs(
    prompt_logprobs: Any,
    prompt: Sequence[int],
    ranges: Sequence[tuple[int, int]],
    *,
    what: str = _WHAT,
) -> FloatArray:
    """Span totals from vLLM's ``choices[0].prompt_logprobs``.

    Parameters
    ----------
    prompt_logprobs
        The decoded list: ``None`` first, then one ``{token_id_str: {"logprob": ...}}`` map
        per prompt position.
    prompt
        The token ids that were sent.
    ranges
        Half-open spans, each ``1 <= start < end <= len(prompt)``.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(len(ranges),)``; ``-9999.0`` entries count as ``-inf``.

    Raises
    ------
    ProtocolError
        The list is missing, has a length other than ``len(prompt)``, or an entry that is
        read lacks the prompt token (the answer is not aligned with the prompt).

    Examples
    --------
    >>> pl = [None, {"7": {"logprob": -1.0}}, {"9": {"logprob": -0.5}, "3": {"logprob": -0.1}}]
    >>> sum_prompt_logprobs(pl, [5, 7, 9], [(1, 3)])
    array([-1.5])
    """
    if prompt_logprobs is None:
        msg = (
            f"{what}: answer has no choices[0].prompt_logprobs; the server ignored "
            "'prompt_logprobs' (is it vLLM?)"
        )
        raise ProtocolError(msg, backend="vllm")
    if not isinstance(prompt_logprobs, list):
        msg = f"{what}: prompt_logprobs is {type(prompt_logprobs).__name__}, expected a list"
        raise ProtocolError(msg, backend="vllm")
    n = len(prompt)
    if len(prompt_logprobs) != n:
        msg = (
            f"{what}: expected {n} prompt_logprobs entries (one per prompt token), "
            f"the server returned {len(prompt_logprobs)}"
        )
        raise ProtocolError(msg, backend="vllm")
    out = np.empty(len(ranges), dtype=np.float64)
    for k, (a, b) in enumerate(ranges):
        total = 0.0
        for t in range(a, b):
            entry = prompt_logprobs[t]
            token = int(prompt[t])
            if not isinstance(entry, Mapping):
                msg = (
                    f"{what}: prompt_logprobs[{t}] is {type(entry).__name__}, expected a "
                    f"map holding prompt token {token}"
                )
                raise ProtocolError(msg, backend="vllm")
            item = entry.get(str(token))
            if item is None:
                keys = list(entry)[:5]
                msg = (
                    f"{what}: prompt_logprobs[{t}] has no entry for prompt token {token} "
                    f"(keys {keys}): the answer is not aligned with the prompt"
                )
                raise ProtocolError(msg, backend="vllm")
            value = item.get("logprob") if isinstance(item, Mapping) else item
            lp = logprob_value(value)
            if lp is None:
                msg = f"{what}: prompt_logprobs[{t}][{token!r}] logprob is {value!r}, not a number"
                raise ProtocolError(msg, backend="vllm")
            total += lp
        out[k] = total
    return out


class VLLMScorer(StockHTTPBackend):
    """Scorer over a stock vLLM OpenAI-compatible server (``prompt_logprobs``).

    Parameters
    ----------
    base_url
        Server root, with or without a trailing ``/v1``.
    model
        Served model name; ``None`` takes the first model of ``GET /v1/models``.
    api_key
        Bearer token (``--api-key`` of ``vllm serve``); ``None`` reads
        ``$SCORING_KIT_API_KEY``.
    timeout, concurrency, retry, transport
        As for :class:`~scoring_kit.backends.http.ScoreClient`.
    max_model_len
        The model's context; ``None`` reads it from ``GET /v1/models`` once.
    warn
        Emit the :class:`CostWarning` on first use.
    """

    name = "vllm"

    @with_http_options
    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        max_model_len: int | None = None,
        warn: bool = True,
        **options: Unpack[HTTPOptions],
    ) -> None:
        super().__init__(base_url, model=model, max_model_len=max_model_len, **options)
        self._models_read = model is not None and max_model_len is not None
        self._send_priority = True
        self._warned = not warn

    # -- model info --------------------------------------------------------------------

    async def _ensure_model(self) -> None:
        """Read model id and ``max_model_len`` from ``GET /v1/models`` (once)."""
        if self._models_read:
            return
        try:
            _, data = await self._request_json(
                "GET", self.url("/v1/models"), what="vllm /v1/models"
            )
        except (ScoringAPIError, ProtocolError) as exc:
            if self.model is None:
                raise
            logger.info("%r: cannot read max_model_len (%s); not checking lengths", self, exc)
            self._models_read = True
            return
        cards = data.get("data") if isinstance(data, Mapping) else None
        cards = [c for c in cards if isinstance(c, Mapping)] if isinstance(cards, list) else []
        if not cards and self.model is None:
            msg = "vllm /v1/models: the server lists no model; pass model=... explicitly"
            raise ProtocolError(msg, backend=self.name)
        if self.model is None:
            self.model = str(cards[0].get("id"))
        card = next((c for c in cards if c.get("id") == self.model), None)
        if card is not None and self.max_model_len is None:
            mml = card.get("max_model_len")
            if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0:
                self.max_model_len = mml
        self._models_read = True

    def _warn_cost(self) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            "vllm backend: prompt_logprobs requests never read vLLM's prefix cache (every "
            "scoring call pays a full prefill) and materialise vocabulary-sized logits per "
            "prompt token of a prefill chunk, which can run the GPU out of memory on long "
            "prompts; lower --max-num-batched-tokens if it does, or serve the /score "
            "endpoint (backend='score')",
            CostWarning,
            stacklevel=3,
        )

    # -- requests ----------------------------------------------------------------------

    async def _post_completions(self, body: dict[str, Any], priority: int | None) -> Any:
        send = bool(priority) and self._send_priority
        if send:
            body["priority"] = priority
        try:
            _, data = await self._request_json(
                "POST", self.url("/v1/completions"), body, what=_WHAT
            )
        except ScoringAPIError as exc:
            if not (send and exc.status_code == 400 and "priority" in exc.message.lower()):
                raise
            self._send_priority = False
            logger.warning(
                "%r: server rejects 'priority' (%s); sending requests without it", self, exc.message
            )
            body.pop("priority", None)
            _, data = await self._request_json(
                "POST", self.url("/v1/completions"), body, what=_WHAT
            )
        return data

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Total log-probability per range of ``request`` (one ``POST /v1/completions``).

        Raises
        ------
        BackendPromptError
            Invalid span, or a prompt longer than ``max_model_len - 1`` tokens.
        ScoringAPIError, ProtocolError, BackendUnavailable
            As for :meth:`ScoreClient.score`.
        """
        if not request.ranges:
            return empty_scores()
        with self._tracking():
            await self._ensure_model()
            n = len(request.prompt)
            if self.max_model_len is not None and n > self.max_model_len - 1:
                limit = self.max_model_len - 1
                msg = (
                    f"vllm: prompt has {n} tokens, but model {self.model!r} has max_model_len "
                    f"{self.max_model_len}; a prompt_logprobs request generates 1 token, so at "
                    f"most {limit} prompt tokens can be scored"
                )
                raise BackendPromptError(msg, backend=self.name, limit=limit, actual=n)
            self._check_request(request)
            self._warn_cost()
            self.stats.prompt_tokens += n
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": list(request.prompt),
                "max_tokens": 1,
                "temperature": 0,
                "prompt_logprobs": 0,
                "stream": False,
            }
            data = await self._post_completions(body, request.priority)
            try:
                choice = data["choices"][0]
            except (KeyError, IndexError, TypeError):
                choice = None
            if not isinstance(choice, Mapping):
                msg = f"{_WHAT}: answer has no choices[0]"
                raise ProtocolError(msg, backend=self.name)
            return sum_prompt_logprobs(
                choice.get("prompt_logprobs"), request.prompt, request.ranges
            )

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Baseline first, then the rest with ``concurrency`` requests in flight."""
        return await gather_in_order(self, requests, concurrency=self.concurrency)

    async def complete(self, request: CompletionRequest) -> str:
        """Generate with ``POST /v1/completions``; return ``choices[0].text``."""
        with self._tracking(prompt_tokens=len(request.prompt)):
            await self._ensure_model()
            body = completion_body(request, self.model)
            body["stream"] = False
            data = await self._post_completions(body, request.priority)
            return choice_text(data, what=_WHAT, backend=self.name)
