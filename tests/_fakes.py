"""Model-free stand-ins for the seed-behaviour and format tests: a character tokenizer and a
scorer whose answers follow from the prompt alone (no engine, no server, no network).

:class:`PrefixScorer` scores each span as ``-10 + 0.01 * (tokens before the span)``, so
removing a node of ``t`` tokens lowers every later response by ``0.01 * t``: the divergence
of a memory on a response is ``0.01 * tokens(memory)`` when the memory precedes it, else 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from scoring_kit._exceptions import BackendError, ScoringAPIError
from scoring_kit._types import FloatArray
from scoring_kit.backends.base import CompletionRequest, ScoreRequest, ScorerStats


class CharTokenizer:
    """One token per character (ids 2..257); ``<|im_start|>`` = 0, ``<|im_end|>`` = 1."""

    name = "char-test"
    vocab_size = 258
    im_start_id = 0
    im_end_id = 1

    def encode(self, text: str) -> list[int]:
        return [2 + (ord(c) % 256) for c in text]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        out = []
        for t in ids:
            if t < 2:
                if not skip_special_tokens:
                    out.append("<|im_start|>" if t == 0 else "<|im_end|>")
            else:
                out.append(chr(t - 2))
        return "".join(out)


class PrefixScorer:
    """A deterministic scorer (see the module docstring); counts calls, can fail prompts."""

    name = "fake"

    def __init__(self, fail: Callable[[ScoreRequest], bool] | None = None) -> None:
        self.stats = ScorerStats()
        self.requests: list[ScoreRequest] = []
        self.fail = fail

    async def score(self, request: ScoreRequest) -> FloatArray:
        self.requests.append(request)
        self.stats.calls += 1
        if self.fail is not None and self.fail(request):
            raise ScoringAPIError("score API HTTP 500: told to fail", status_code=500,
                                  message="told to fail")
        return np.asarray([-10.0 + 0.01 * s for s, _ in request.ranges], dtype=np.float64)

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        out: list[FloatArray | BackendError] = []
        for r in requests:
            try:
                out.append(await self.score(r))
            except BackendError as exc:
                out.append(exc)
        return out

    async def complete(self, request: CompletionRequest) -> str:
        return "alternate"

    async def aclose(self) -> None:
        return None
