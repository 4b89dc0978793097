"""Windowed flows: single-memory importance (reference v1) and incremental scoring (v2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._exceptions import ScoringError
from .._sync import sync_twin
from .._types import FloatArray
from ..backends.base import DEFAULT_PRIORITY, Scorer
from ..context.model import ContextState, Node, is_assistant, memory_key, skip_key
from .ablation import ascore_ablations, describe_error
from .divergence import divergence
from .store import MemoryStore

__all__ = [
    "DEFAULT_MAX_AGE_SECS",
    "DEFAULT_RESPONSE_WINDOW",
    "SINGLE_RESPONSE_WINDOW",
    "TOKEN_CUTOFF_PERCENT",
    "IncrementalResult",
    "ascore_divergence",
    "ascore_memories_incremental",
    "ascore_memory",
    "nth_response_end",
    "score_memories_incremental",
    "score_memory",
]

log = logging.getLogger(__name__)

SINGLE_RESPONSE_WINDOW = 50
DEFAULT_RESPONSE_WINDOW = 100
DEFAULT_MAX_AGE_SECS = 3600
TOKEN_CUTOFF_PERCENT = 60


def nth_response_end(entries: Sequence[Node], start: int, n: int) -> tuple[int, bool]:
    """Index after the n-th assistant response at or after ``start``.

    Returns ``(end, True)`` when n responses were found, else ``(len(entries), False)``.
    """
    count = 0
    for i in range(start, len(entries)):
        if is_assistant(entries[i]):
            count += 1
            if count >= n:
                return i + 1, True
    return len(entries), False


async def ascore_divergence(
    ctx: ContextState,
    scorer: Scorer,
    entries: range,
    skip: Callable[[Node], bool],
    *,
    priority: int | None = DEFAULT_PRIORITY,
) -> tuple[FloatArray, FloatArray, tuple[int, ...]]:
    """Baseline and ablated scores of ``entries``; returns (divergence, baseline, entries).

    Both prompts go to the scorer in one batch (baseline first). A failure raises.
    """
    base = ctx.wire_prompt(entries)
    without = ctx.wire_prompt(entries, skip)
    (b,), (w,) = await ascore_ablations(
        scorer, [without.request(priority=priority)], sizes=len(base.entries),
        lead=[base.request(priority=priority)],
    )
    if isinstance(b, BaseException):
        raise b
    if w.exc is not None:
        raise w.exc
    if w.error is not None:
        raise ScoringError(w.error)
    return divergence(b, w.scores), b, base.entries


def _first_position(ctx: ContextState, key: str) -> int | None:
    """Identity memories score at position 0; conversation memories at their index."""
    if any(memory_key(n) == key for n in ctx.identity):
        return 0
    for i, n in enumerate(ctx.conversation):
        if memory_key(n) == key:
            return i
    return None


async def ascore_memory(
    ctx: ContextState,
    key: str,
    scorer: Scorer,
    *,
    response_window: int = SINGLE_RESPONSE_WINDOW,
    priority: int | None = DEFAULT_PRIORITY,
) -> float:
    """Importance of one memory: summed divergence over the responses after it (v1).

    Scores the window from the memory's first position in the conversation through the
    next ``response_window`` (50) assistant responses, with and without the memory. Returns
    0.0 without a call when the memory is not in the conversation or no response follows
    it, as the seed does. Like the seed, only the conversation is searched: a key held only
    by an identity memory scores 0.0 (identity memories are never "surfaced" at a point of
    the conversation; :func:`ascore_memories_incremental` scores them from position 0 and
    the full matrix scores them on every response).
    """
    pos = next((i for i, n in enumerate(ctx.conversation) if memory_key(n) == key), None)
    if pos is None:
        return 0.0
    end, _ = nth_response_end(ctx.conversation, pos, response_window)
    if not any(is_assistant(n) for n in ctx.conversation[pos:end]):
        return 0.0
    divs, _, _ = await ascore_divergence(
        ctx, scorer, range(pos, end), skip_key(key), priority=priority
    )
    return float(np.sum(divs))


@dataclass(slots=True)
class IncrementalResult:
    """What an incremental run did, memory by memory."""

    scored: list[tuple[str, float]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_due: list[str] = field(default_factory=list)
    total_tokens: int = 0
    token_cutoff: int = 0

    @property
    def n_scored(self) -> int:
        return len(self.scored)


OnScore = Callable[[str, float], Awaitable[None] | None]


async def ascore_memories_incremental(
    ctx: ContextState,
    scorer: Scorer,
    store: MemoryStore,
    *,
    max_age_secs: int = DEFAULT_MAX_AGE_SECS,
    response_window: int = DEFAULT_RESPONSE_WINDOW,
    now: int | None = None,
    on_score: OnScore | None = None,
    priority: int | None = DEFAULT_PRIORITY,
    progress: bool = True,
) -> IncrementalResult:
    """Score the memories that are due, oldest ``last_scored`` first (reference v2).

    Candidates: identity memories (position 0) and conversation memories (first position),
    deduplicated by key, whose ``now - last_scored >= max_age_secs``. Skipped: memories
    past the first 60% of the conversation by tokens, and memories with no assistant
    response in their window. A memory's score is the max divergence over its window of
    ``response_window`` responses; each score updates the store (EWMA, ``last_scored``) and
    is reported through ``on_score`` as soon as it is known. Failures are recorded, never
    stored as scores.
    """
    if not isinstance(store, MemoryStore):
        raise ScoringError("store must be a MemoryStore")
    ts_now = int(time.time()) if now is None else int(now)
    res = IncrementalResult()
    seen: set[str] = set()
    candidates: list[tuple[int, str, int]] = []
    pairs = [(0, n) for n in ctx.identity] + list(enumerate(ctx.conversation))
    for pos, node in pairs:
        key = memory_key(node)
        if key is None or key in seen:
            continue
        seen.add(key)
        last = store.last_scored(key)
        if ts_now - last >= max_age_secs:
            candidates.append((pos, key, last))
        else:
            res.not_due.append(key)
    candidates.sort(key=lambda c: c[2])  # stable: oldest first
    entries = ctx.conversation
    total = sum(n.tokens for n in entries)
    cutoff = total * TOKEN_CUTOFF_PERCENT // 100
    cumulative = np.cumsum([n.tokens for n in entries]).tolist() if entries else []
    res.total_tokens, res.token_cutoff = total, cutoff
    log.info("[scoring] total_tokens=%d, cutoff=%d, %d candidates", total, cutoff, len(candidates))
    bar: Any = None
    if progress and candidates:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(candidates), desc="incremental scoring", unit="memory", leave=True)
    try:
        for pos, key, _ in candidates:
            cum = cumulative[pos] if pos < len(cumulative) else total
            if cum > cutoff:
                res.skipped.append((key, f"tokens {cum}/{cutoff} past the 60% cutoff"))
                if bar is not None:
                    bar.update(1)
                continue
            end, _ = nth_response_end(entries, pos, response_window)
            if not any(is_assistant(n) for n in entries[pos:end]):
                res.skipped.append((key, f"no assistant response in range {pos}..{end}"))
                if bar is not None:
                    bar.update(1)
                continue
            try:
                divs, _, _ = await ascore_divergence(
                    ctx, scorer, range(pos, end),
                    skip_key(key), priority=priority,
                )
            except Exception as exc:  # a failure is recorded, the run goes on
                log.warning("[scoring] %s FAILED: %s", key, exc)
                res.failed.append((key, describe_error(exc)))
            else:
                if divs.size == 0 or np.isnan(divs).any():
                    res.failed.append((key, "scorer returned no usable scores"))
                else:
                    score = float(np.max(divs))
                    store.update(key, score, now=ts_now)
                    res.scored.append((key, score))
                    if on_score is not None:
                        maybe = on_score(key, score)
                        if maybe is not None:
                            await maybe
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return res


score_memory = sync_twin(ascore_memory, "score_memory")


score_memories_incremental = sync_twin(ascore_memories_incremental,
                                       "score_memories_incremental")
