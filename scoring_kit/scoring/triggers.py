"""Background triggers for notebooks (the reference's ``MindTriggered`` semantics).

- :class:`MemoryScoringTask`: ``trigger()`` / ``trigger_full()`` start a run only when none
  is in flight (no-op if running); incremental and full share one in-flight handle.
- :class:`FinetuneScoringTask`: ``trigger()`` aborts any run in flight and starts afresh,
  clearing the previous candidates.

Both run as asyncio tasks on the caller's loop (a Jupyter kernel has one) and expose
``in_flight``, ``progress`` and their latest results for a notebook to read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Scorer
from ..context.model import ContextState
from .finetune import FinetuneCandidate, FinetuneStats, TrainedArg, iter_finetune_candidates
from .matrix import MemoryMatrix, ascore_memories
from .store import MemoryStore
from .windows import IncrementalResult, ascore_memories_incremental
from .writeback import LiveContext

__all__ = ["FinetuneScoringTask", "MemoryScoringTask", "TaskState"]


@dataclass(slots=True)
class TaskState:
    in_flight: bool = False
    progress: str = ""
    error: str | None = None
    runs: int = 0
    log: list[str] = field(default_factory=list)


class _Handle:
    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        self.task = asyncio.get_running_loop().create_task(coro)
        return self.task

    async def abort(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class MemoryScoringTask:
    """Incremental (``trigger``) and full-matrix (``trigger_full``) scoring, one at a time.

    A full run writes each memory's per-response scores onto a copy of the context as the
    row finishes (:mod:`~scoring_kit.scoring.writeback`): :attr:`live` holds it during the
    run, :attr:`last_context` after it (save it with ``save_context`` to keep the scores).
    """

    def __init__(self, scorer: Scorer, store: MemoryStore | None = None) -> None:
        self.scorer = scorer
        self.store = store or MemoryStore()
        self.state = TaskState()
        self.last_incremental: IncrementalResult | None = None
        self.last_matrix: MemoryMatrix | None = None
        #: the context of the running (or last) full run, updated row by row
        self.live: LiveContext | None = None
        #: the last finished full run's context with its ``memory_scores`` written
        self.last_context: ContextState | None = None
        self._handle = _Handle()

    @property
    def in_flight(self) -> bool:
        return self._handle.running

    def trigger(self, ctx: ContextState, **kwargs: Any) -> asyncio.Task[Any] | None:
        """Start incremental scoring unless a run is in flight (then return None)."""
        if self._handle.running:
            return None
        return self._handle.start(self._incremental(ctx, **kwargs))

    def trigger_full(self, ctx: ContextState, **kwargs: Any) -> asyncio.Task[Any] | None:
        """Start the full matrix unless a run is in flight (then return None)."""
        if self._handle.running:
            return None
        return self._handle.start(self._full(ctx, **kwargs))

    async def wait(self) -> None:
        if self._handle.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._handle.task)

    async def _incremental(self, ctx: ContextState, **kwargs: Any) -> IncrementalResult:
        st = self.state
        st.in_flight, st.error, st.progress = True, None, "scoring: starting"
        try:

            def on_score(key: str, score: float) -> None:
                st.progress = f"scoring: {key} -> {score:.3f}"
                st.log.append(st.progress)

            kwargs.setdefault("progress", False)
            res = await ascore_memories_incremental(
                ctx, self.scorer, self.store, on_score=on_score, **kwargs
            )
            self.last_incremental = res
            st.progress = f"scored {res.n_scored}, skipped {len(res.skipped)}"
            return res
        except Exception as exc:
            st.error = str(exc)
            raise
        finally:
            st.in_flight = False
            st.runs += 1

    async def _full(self, ctx: ContextState, **kwargs: Any) -> MemoryMatrix:
        st = self.state
        st.in_flight, st.error, st.progress = True, None, "scoring: baseline"
        total = len(ctx.memory_keys())
        done = 0

        def on_row(key: str, row: Any, err: str | None) -> None:
            nonlocal done
            done += 1
            st.progress = f"scoring: {done}/{total} {key}" + (" FAILED" if err else "")

        try:
            kwargs.setdefault("progress", False)
            self.live = kwargs.setdefault("write_back", LiveContext(ctx))
            m = await ascore_memories(ctx, self.scorer, on_row=on_row, **kwargs)
            self.last_matrix = m
            self.last_context = self.live.context
            return m
        except Exception as exc:
            st.error = str(exc)
            raise
        finally:
            st.in_flight = False
            st.runs += 1


class FinetuneScoringTask:
    """Finetune scoring; ``trigger()`` aborts the run in flight and starts a fresh one.

    ``trained``: ``None`` (default) skips the responses in the default :class:`TrainedSet`,
    a :class:`TrainedSet` those in that file, ``False`` none (see
    :data:`~scoring_kit.scoring.finetune.TrainedArg`).
    """

    def __init__(self, scorer: Scorer, trained: TrainedArg = None) -> None:
        self.scorer = scorer
        self.trained = trained
        self.state = TaskState()
        self.candidates: list[FinetuneCandidate] = []
        self.last_run: FinetuneStats | None = None
        self._handle = _Handle()

    @property
    def in_flight(self) -> bool:
        return self._handle.running

    async def trigger(self, ctx: ContextState, **kwargs: Any) -> asyncio.Task[Any]:
        """Abort any run in flight, clear candidates, start afresh; returns the new task."""
        await self._handle.abort()
        self.candidates = []
        return self._handle.start(self._run(ctx, **kwargs))

    async def wait(self) -> None:
        if self._handle.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._handle.task)

    async def _run(self, ctx: ContextState, **kwargs: Any) -> FinetuneStats | None:
        st = self.state
        st.in_flight, st.error, st.progress = True, None, "finetune: scoring..."
        stats: list[FinetuneStats] = []
        try:
            async for c in iter_finetune_candidates(
                ctx, self.scorer, trained=self.trained, stats_out=stats, **kwargs
            ):
                self.candidates.append(c)
                st.progress = f"finetune: {len(self.candidates)} candidates"
        except asyncio.CancelledError:
            st.progress = "finetune: aborted"
            raise
        except Exception as exc:
            st.error = str(exc)
        finally:
            st.in_flight = False
            st.runs += 1
            if stats:
                self.last_run = stats[-1]
        return self.last_run
