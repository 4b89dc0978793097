"""The ``local`` backend: the embedded :class:`~scoring_kit.engine.engine.Engine` in-process.

No server and no network: requests go straight to the engine in a worker thread
(``asyncio.to_thread``), so the event loop stays free while the model computes. A
``score_batch`` is one :meth:`Engine.score_many` call, which is where the engine's prefix-KV
reuse pays: the baseline and its ablations share their prefixes.

An invalid request (bad span, unknown token id, too long) is reported the way a server would
report it: a :class:`~scoring_kit.ScoringAPIError` with status 400, chained from the engine's
:class:`~scoring_kit.PromptError`, so that ``score_batch`` can put it in the request's slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._exceptions import BackendError, PromptError, ScoringAPIError
from .._types import FloatArray, PathLike
from .base import CompletionRequest, ScoreRequest, ScorerStats

if TYPE_CHECKING:
    from ..engine.engine import Engine, EngineStats
    from .detect import Detection

__all__ = ["LocalScorer"]

_BACKEND = "local"


def _bad_request(message: str) -> ScoringAPIError:
    return ScoringAPIError(
        f"score API HTTP 400: {message}", status_code=400, message=message, backend=_BACKEND
    )


class LocalScorer:
    """A :class:`~scoring_kit.backends.base.Scorer` over an in-process :class:`Engine`.

    Parameters
    ----------
    engine : Engine, optional
        The engine to use; when omitted it is loaded on first use (in a worker thread) with
        ``Engine.load(model_path, device=device)``.
    model_path : path-like, optional
        Model to load when no engine is given (default: the embedded SmolLM2).
    device : str, optional
        Device to load on when no engine is given (default: the engine's choice).

    Attributes
    ----------
    name : str
        ``"local"``.
    stats : ScorerStats
        ``calls`` and ``failed_calls`` count requests; ``prompt_tokens`` the tokens sent;
        ``computed_tokens`` the tokens the engine actually ran (the rest came from its prefix
        cache); ``extra`` holds ``logit_rows``, ``cache_hits_tokens`` and ``engine_seconds``.
    """

    name = _BACKEND
    #: Why this backend was chosen (set by :func:`~scoring_kit.backends.auto.make_scorer`).
    detection: Detection | None = None

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model_path: PathLike | None = None,
        device: str | None = None,
    ) -> None:
        self._engine = engine
        self._model_path = model_path
        self._device = device
        self._load_lock = threading.Lock()
        self.stats = ScorerStats()

    def __repr__(self) -> str:
        what = repr(self._engine) if self._engine is not None else "not loaded"
        return f"LocalScorer({what})"

    # ------------------------------------------------------------------ engine

    @property
    def engine(self) -> Engine:
        """The engine (loaded now, in this thread, if it was not yet)."""
        if self._engine is None:
            with self._load_lock:
                if self._engine is None:
                    from ..engine.engine import Engine

                    self._engine = Engine.load(self._model_path, device=self._device)
        return self._engine

    async def _get_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        return await asyncio.to_thread(lambda: self.engine)

    def _account(self, delta: EngineStats) -> None:
        self.stats.computed_tokens += delta.forward_tokens
        extra = self.stats.extra
        for key, value in (
            ("logit_rows", float(delta.logit_rows)),
            ("cache_hits_tokens", float(delta.cache_hits_tokens)),
            ("engine_seconds", delta.seconds),
        ):
            extra[key] = extra.get(key, 0.0) + value

    @staticmethod
    def _image_error(request: ScoreRequest, engine_name: str | None) -> ScoringAPIError | None:
        if not request.images:
            return None
        model = f" ({engine_name})" if engine_name else ""
        return _bad_request(
            f"the local backend's model{model} is text-only and cannot score images: the "
            f"request carries {len(request.images)} image(s); drop them or use a "
            "multimodal server"
        )

    # ------------------------------------------------------------------ Scorer protocol

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Total log-probability per span of ``request``.

        Raises
        ------
        ScoringAPIError
            Status 400: the request is invalid for the model (chained from the
            :class:`PromptError`) or carries images.
        """
        self.stats.calls += 1
        self.stats.prompt_tokens += len(request.prompt)
        err = self._image_error(request, self._engine.name if self._engine else None)
        if err is not None:
            self.stats.failed_calls += 1
            raise err
        engine = await self._get_engine()
        items = [(request.prompt, request.ranges)]
        results, delta = await asyncio.to_thread(engine.score_many_counted, items)
        self._account(delta)
        out = results[0]
        if isinstance(out, PromptError):
            self.stats.failed_calls += 1
            raise _bad_request(str(out)) from out
        return out

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Score all ``requests`` in one engine call (shared prefixes are computed once).

        Returns
        -------
        list
            Aligned with ``requests``: the totals, or the :class:`ScoringAPIError` (status 400)
            of a request that is invalid or carries images.
        """
        if not requests:
            return []
        self.stats.calls += len(requests)
        self.stats.prompt_tokens += sum(len(r.prompt) for r in requests)
        engine = await self._get_engine()
        out: list[FloatArray | BackendError | None] = [None] * len(requests)
        slots: list[int] = []
        for i, req in enumerate(requests):
            err = self._image_error(req, engine.name)
            if err is not None:
                out[i] = err
            else:
                slots.append(i)
        if slots:
            items = [(requests[i].prompt, requests[i].ranges) for i in slots]
            results, delta = await asyncio.to_thread(engine.score_many_counted, items)
            self._account(delta)
            for i, res in zip(slots, results, strict=True):
                if isinstance(res, PromptError):
                    api = _bad_request(f"request {i}: {res}")
                    api.__cause__ = res
                    out[i] = api
                else:
                    out[i] = res
        final: list[FloatArray | BackendError] = []
        for r in out:
            assert r is not None
            if isinstance(r, BackendError):
                self.stats.failed_calls += 1
            final.append(r)
        return final

    async def complete(self, request: CompletionRequest) -> str:
        """Sample a continuation of ``request.prompt`` and return its text.

        Raises
        ------
        ScoringAPIError
            Status 400: invalid prompt or sampling parameters.
        """
        self.stats.calls += 1
        self.stats.prompt_tokens += len(request.prompt)
        engine = await self._get_engine()
        before = engine.stats.copy()
        try:
            _ids, text = await asyncio.to_thread(
                engine.generate,
                request.prompt,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                stop_token_ids=request.stop_token_ids,
                seed=request.seed,
            )
        except PromptError as exc:
            self.stats.failed_calls += 1
            raise _bad_request(str(exc)) from exc
        # approximate under concurrency: other callers may have run in between
        self.stats.computed_tokens += max(0, engine.stats.forward_tokens - before.forward_tokens)
        return text

    async def aclose(self) -> None:
        """Nothing to release: the engine belongs to whoever made it (or to this scorer)."""
