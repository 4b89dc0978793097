"""What every protocol handler shares: the served engine, its worker, and the request body.

:class:`Service` binds one engine (see :class:`ServedEngine`) to one
:class:`~scoring_kit.server.worker.EngineWorker`; the protocol modules
(``protocol_score``, ``protocol_openai``, ``protocol_sglang``, ``protocol_train``) are
functions ``handler(service, request)`` over it, and :mod:`~scoring_kit.server.app` routes to
them. This module also turns the engine's numbers into JSON ones (no ``NaN``, no ``inf``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from .._exceptions import PromptError, ScoringError
from .._types import FloatArray, Span
from ..wire import VLLM_NEG_INF
from ._fields import RequestError, type_name
from .params import ModelLimits
from .worker import EngineWorker

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..context.tokenizer import Tokenizer
    from .trainqueue import TrainQueue

__all__ = [
    "MAX_BODY_BYTES",
    "NEG_INF_TOTAL",
    "ServedEngine",
    "Service",
    "engine_top_k",
    "prompt_token_logprobs",
    "span_total",
    "token_logprob",
]

#: Default request-body limit (bytes).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: What a span total of ``-inf`` is sent as (JSON has no infinity).
NEG_INF_TOTAL = -sys.float_info.max


class ServedEngine(Protocol):
    """What the server needs from an engine (:class:`~scoring_kit.engine.engine.Engine`).

    ``score`` and ``score_many`` must check each request with
    :func:`~scoring_kit.wire.validate_score_request` (``score`` raises the
    :class:`~scoring_kit.PromptError`, ``score_many`` returns it in the item's slot): the
    server parses only JSON types and shapes and relies on that one check.
    """

    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def device(self) -> str: ...

    def score(self, prompt: Sequence[int], ranges: Sequence[Span]) -> FloatArray: ...

    def score_many(
        self, items: Sequence[tuple[Sequence[int], Sequence[Span]]]
    ) -> list[FloatArray | PromptError]: ...

    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> tuple[list[int], str]: ...


def prompt_token_logprobs(
    engine: ServedEngine, prompt: Sequence[int], *, start: int = 1
) -> FloatArray:
    """``log P(prompt[t] | prompt[:t])`` for every ``t`` in ``[max(start, 1), len(prompt))``.

    One ``engine.score`` call with single-token spans ``[t, t + 1)``: one prefill, logits at
    the scored rows only. Needs nothing beyond the engine contract.

    Parameters
    ----------
    engine
        The engine (called on the current thread).
    prompt
        Token ids.
    start
        First position wanted; position 0 has no prediction, so ``start < 1`` means 1.

    Returns
    -------
    FloatArray
        Shape ``(len(prompt) - max(start, 1),)`` (empty when there is nothing to score).
    """
    first = max(int(start), 1)
    if len(prompt) <= first:
        return np.empty(0, dtype=np.float64)
    ranges = [(t, t + 1) for t in range(first, len(prompt))]
    return np.asarray(engine.score(prompt, ranges), dtype=np.float64)


def span_total(x: float) -> float:
    """A span total as sent: ``-inf`` → :data:`NEG_INF_TOTAL`; ``NaN`` is an engine fault."""
    if math.isnan(x):
        msg = "the engine returned NaN for a span total"
        raise ScoringError(msg)
    return NEG_INF_TOTAL if x == -math.inf else float(x)


def token_logprob(x: float) -> float:
    """A token logprob as sent: ``-inf`` → vLLM's ``-9999.0``; ``NaN`` is an engine fault."""
    if math.isnan(x):
        msg = "the engine returned NaN for a token log-probability"
        raise ScoringError(msg)
    return VLLM_NEG_INF if x == -math.inf else float(x)


def engine_top_k(value: int) -> int:
    """Map the OpenAI/vLLM/SGLang "no top-k" values (-1, 0) to the engine's 0."""
    return 0 if value <= 0 else value


class Service:
    """One engine, its worker, the server limits and the (lazily created) train queue."""

    def __init__(
        self,
        engine: ServedEngine,
        *,
        worker: EngineWorker,
        max_body_bytes: int,
        train_dir: Path | None,
    ) -> None:
        self.engine = engine
        self.worker = worker
        self.max_body_bytes = max_body_bytes
        self.train_dir = train_dir
        self._train_queue: TrainQueue | None = None
        self.limits = ModelLimits(str(engine.name), int(engine.vocab_size), int(engine.max_len))

    @property
    def name(self) -> str:
        return self.limits.name

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object (``413`` past ``max_body_bytes``, ``400`` if not JSON)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, f"invalid Content-Length header {declared!r}") from None
            if size > limit:
                raise RequestError(
                    413,
                    f"request body is {size} bytes, larger than the limit of {limit} bytes "
                    "(max_body_bytes)",
                )
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise RequestError(
                    413,
                    f"request body exceeds the limit of {limit} bytes (max_body_bytes): "
                    f"{len(buf)} bytes received so far",
                )
        return _json_object(bytes(buf))

    def decoder(self, *, skip_special_tokens: bool = False) -> Callable[[int], str]:
        """Decode one token id at a time, caching each (call on the worker thread)."""
        cache: dict[int, str] = {}
        tok = self.engine.tokenizer

        def one(tid: int) -> str:
            s = cache.get(tid)
            if s is None:
                s = cache[tid] = tok.decode([tid], skip_special_tokens=skip_special_tokens)
            return s

        return one

    def train_queue(self) -> TrainQueue:
        """The ``/train`` queue, created on first use (a server nobody trains touches no folder)."""
        if self._train_queue is None:
            from .trainqueue import TrainQueue, default_train_dir

            self._train_queue = TrainQueue(self.train_dir or default_train_dir())
        return self._train_queue


def _json_object(buf: bytes) -> dict[str, Any]:
    if not buf.strip():
        raise RequestError(400, "request body is empty: expected a JSON object")
    try:
        value = orjson.loads(buf)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON body ({len(buf)} bytes): {exc}") from None
    if not isinstance(value, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type_name(value)}")
    return value
