"""The windowed mode replayed on an exact matrix: what its settings would return, at no model cost.

On a causal model the windowed mode's cells inside a memory's window *are* the exact
leave-one-out cells (the context before them is the same), and every cell after it is
estimated as no divergence. So one exact matrix answers, for any ``window`` / ``restated`` /
``refine``, which matrix the windowed mode would return and what it would spend — a
researcher with an exact run of a conversation can choose the settings for the next hundred
conversations without scoring them twice. :func:`replay_windowed` returns that matrix,
labelled ``method="windowed"``, ``approximate=True``, ``meta["replayed"] = True``, with the
same ``meta`` as a live run plus the tokens it would compute on a prefix-caching engine.

The replay is exact up to the scorer's numerical noise (a live run batches differently); a
row that failed in the exact run is failed in the replay too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._exceptions import ScoringError
from .._types import IntArray
from ..context.model import ContextState, WirePrompt, skip_key
from .approx import DEFAULT_WINDOW, _heaviest_open_rows, window_spans
from .memory_matrix import MemoryMatrix

__all__ = ["replay_windowed"]


def replay_windowed(
    exact: MemoryMatrix,
    ctx: ContextState,
    *,
    window: int = DEFAULT_WINDOW,
    restated: float | None = None,
    refine: int = 0,
) -> MemoryMatrix:
    """The matrix :func:`~scoring_kit.scoring.approx.score_memories_windowed` would return.

    Parameters
    ----------
    exact
        An exact (``approximate=False``) matrix of ``ctx``: the same responses, and keys
        that are memories of ``ctx``.
    ctx
        The conversation ``exact`` was scored on.
    window, restated, refine
        As for the windowed mode.

    Returns
    -------
    MemoryMatrix
        ``method="windowed"``, ``approximate=True``; ``meta`` as a live run's (``window``,
        ``restated``, ``extended``, ``window_entries``, ``refine``, ``refined``,
        ``estimated_cells``, ``calls``, ``exact_calls``, ``prompt_tokens_sent``,
        ``exact_prompt_tokens``) plus ``replayed: True``, ``computed_tokens`` (the baseline
        and, per ablation, its tokens from the first one that differs from the baseline: what
        a prefix-caching engine computes) and ``exact_computed_tokens`` (the same for the
        exact run).
    """
    if exact.approximate:
        raise ScoringError(f"replay needs an exact matrix; this one is approximate "
                           f"(method {exact.method!r})")
    if refine < 0:
        raise ScoringError(f"refine must be a count >= 0, got {refine}")
    base = ctx.wire_prompt()
    entries = np.asarray(base.entries, dtype=np.int64)
    if not np.array_equal(entries, exact.entries):
        raise ScoringError(
            f"the exact matrix is not of this conversation: its {len(exact.entries)} responses "
            f"(entries {_head(exact.entries)}) differ from the conversation's {len(entries)} "
            f"(entries {_head(entries)})")
    keys = list(exact.keys)
    spans, extended = window_spans(ctx, keys, window=window, restated=restated)
    without = exact.without.copy()
    errors = list(exact.errors)
    asked: list[int] = []
    for i, k in enumerate(keys):
        pos, end = spans[k]
        if np.any((entries >= pos) & (entries < end)):
            asked.append(i)
        later = entries >= end
        if errors[i] is None:
            without[i, later] = exact.baseline[later]  # estimated: no divergence
    refined = _heaviest_open_rows(exact.baseline, without, errors,
                                  [bool((entries >= spans[k][1]).any()) for k in keys], refine)
    # what the live run sends: the baseline, each window, then each refined row whole
    calls = [base, *(_ablated(ctx, keys[i], spans[keys[i]][1]) for i in asked),
             *(_ablated(ctx, keys[i], None) for i in refined)]
    n_conv = len(ctx.conversation)
    for i in refined:
        without[i] = exact.without[i]
        spans[keys[i]] = (spans[keys[i]][0], n_conv)
    full = [_ablated(ctx, k, None) for k in keys]
    meta: dict[str, Any] = {
        "window": window,
        "restated": restated,
        "extended": extended,
        "window_entries": {k: list(v) for k, v in spans.items()},
        "refine": refine,
        "refined": [keys[i] for i in refined],
        "estimated_cells": int(sum(np.count_nonzero(entries >= spans[k][1]) for k in keys)),
        "calls": len(calls),
        "exact_calls": len(keys) + 1,
        "prompt_tokens_sent": int(sum(len(p) for p in calls)),
        "exact_prompt_tokens": int(len(base) + sum(len(p) for p in full)),
        "computed_tokens": int(len(base) + sum(_suffix(base, p) for p in calls[1:])),
        "exact_computed_tokens": int(len(base) + sum(_suffix(base, p) for p in full)),
        "replayed": True,
        "replayed_from": {k: v for k, v in exact.meta.items() if k in ("model", "backend")},
    }
    return MemoryMatrix(keys=exact.keys, entries=exact.entries, baseline=exact.baseline,
                        without=without, errors=tuple(errors), method="windowed",
                        approximate=True, meta=meta, memory_texts=exact.memory_texts,
                        response_texts=exact.response_texts)


def _ablated(ctx: ContextState, key: str, end: int | None) -> WirePrompt:
    """The prompt without ``key``, truncated after conversation entry ``end - 1`` (None: whole)."""
    entries = range(0, end) if end is not None else None
    return ctx.wire_prompt(entries, skip=skip_key(key))


def _suffix(base: WirePrompt, prompt: WirePrompt) -> int:
    """Tokens of ``prompt`` from the first one that differs from ``base``."""
    a, b = base.tokens, prompt.tokens
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(len(b) - (diff[0] if len(diff) else n))


def _head(entries: IntArray | Sequence[int], n: int = 4) -> str:
    vals = [int(e) for e in entries[:n]]
    return ", ".join(map(str, vals)) + (", ..." if len(entries) > n else "")
