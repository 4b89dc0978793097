"""The scorer interface every backend implements.

A scorer takes token ids plus half-open ``[start, end)`` spans and returns, per span, the
teacher-forced total log-probability ``sum(log P(prompt[t] | prompt[:t]) for t in span)``
as a float64 numpy array aligned with the spans. Backends: ``score`` (the seed's patched
``/score``), ``vllm`` (stock ``/v1/completions`` + ``prompt_logprobs``), ``sglang``
(``/generate`` + ``input_token_logprobs``) and ``local`` (the embedded engine in-process).

The interface is async. ``score_batch`` scores many prompts; a backend may do it in one
round trip or with bounded concurrency, and the first request is sent first so that a
server-side prefix cache is warm for the rest. It returns, per request, either the totals or
the :class:`~scoring_kit.BackendError` that request ended in, so one failure never loses
the others.

The request records themselves live in :mod:`scoring_kit.wire` (re-exported here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .._exceptions import BackendError
from .._types import FloatArray
from ..wire import (
    DEFAULT_PRIORITY,
    CompletionRequest,
    ScoreRequest,
    WireImage,
    validate_score_request,
)

__all__ = [
    "DEFAULT_PRIORITY",
    "CompletionRequest",
    "ScoreRequest",
    "Scorer",
    "ScorerStats",
    "WireImage",
    "gather_in_order",
    "validate_score_request",
]

@dataclass(slots=True)
class ScorerStats:
    """What a scorer has spent so far (for progress and benchmarks)."""

    calls: int = 0
    failed_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    #: tokens actually pushed through the model (known for the local engine only)
    computed_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """What the scoring flows need from a backend."""

    #: backend name: "score", "vllm", "sglang" or "local"
    name: str
    stats: ScorerStats

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Total log-probability per span, shape ``(len(request.ranges),)``."""
        ...

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Score many requests; a failed request yields its error in its slot."""
        ...

    async def complete(self, request: CompletionRequest) -> str:
        """Generate a continuation of ``request.prompt`` and return its text."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads or models held by the scorer."""
        ...


async def gather_in_order(
    scorer: Scorer,
    requests: Sequence[ScoreRequest],
    *,
    concurrency: int,
) -> list[FloatArray | BackendError]:
    """Default ``score_batch``: first request alone (warms a prefix cache), rest bounded."""
    if not requests:
        return []
    out: list[FloatArray | BackendError] = [None] * len(requests)  # type: ignore[list-item]

    async def one(i: int) -> None:
        try:
            out[i] = await scorer.score(requests[i])
        except BackendError as exc:
            out[i] = exc

    await one(0)
    sem = asyncio.Semaphore(max(1, concurrency))

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(1, len(requests))))
    return out
