"""Approximate memory matrices for large N: hierarchical ablation, optionally on a proxy.

Exact leave-one-out needs N + 1 prompts. The hierarchical mode (AttriBoT's idea, applied to
memories) first removes *groups* of adjacent memories, one prompt per group, and descends —
one prompt per member — only into the groups whose removal mattered. Rows of memories in
groups it did not descend into are *estimated* as no divergence; the result says which rows
those are, is labelled ``approximate``, and records the prompts and tokens it spent against
what the exact run would spend.

With a ``proxy`` scorer (a cheaper model of the same tokenizer), the whole hierarchical
search runs on the proxy and only the memories it found are re-scored exactly on the target
(AttriBoT's proxy pruning + rescoring).

The windowed mode is the seed's own approximation (its single and incremental modes score a
window of responses after a memory) applied to the whole matrix: memory ``i`` is removed from
the prompt *truncated after the* ``window``-*th response following its first appearance*. A
causal model's scores for the responses inside that window are then exactly the leave-one-out
cells (the full context before them is unchanged), at the cost of the window's tokens only;
cells after the window are estimated as no divergence and listed in ``meta``. It trades
long-range dependence (an identity memory that shapes an answer far later) for cost; it is
most useful when memories are retrieved just before the answers that use them, as in a
running agent. ``restated=`` adds a text-only screen for the long-range case
(:mod:`scoring_kit.scoring.restated`): a memory's window is extended through the later
responses that restate its content, so those cells are exact too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._exceptions import ScoringError
from .._sync import sync_twin
from .._types import FloatArray
from ..backends.base import DEFAULT_PRIORITY, Scorer
from ..context.model import ContextState, Node, WirePrompt, memory_key, skip_key
from .ablation import Ablation, ascore_ablations, scorer_meta
from .divergence import divergence
from .matrix import MemoryMatrix, ascore_memories, texts_of
from .restated import restatement_matrix
from .windows import _first_position, nth_response_end

__all__ = [
    "DEFAULT_WINDOW",
    "ascore_memories_hierarchical",
    "ascore_memories_windowed",
    "score_memories_hierarchical",
    "score_memories_windowed",
    "signed_weights",
    "top_k_recall",
    "top_k_sign_agreement",
    "top_k_weight_share",
    "window_spans",
]

#: Responses after a memory's first appearance that the windowed mode scores exactly.
DEFAULT_WINDOW = 4


def _skip_keys(keys: Sequence[str]) -> Any:
    wanted = frozenset(keys)

    def skip(node: Node) -> bool:
        k = memory_key(node)
        return k is not None and k in wanted

    return skip


def _ablation_lengths(ctx: ContextState, base: WirePrompt, keys: Sequence[str]) -> dict[str, int]:
    """Prompt length of each single-memory ablation of ``base``, read off its node spans
    (removing a memory removes exactly the top-level nodes that hold its key)."""
    removed = dict.fromkeys(keys, 0)
    for s in base.spans:
        k = memory_key(ctx.section(s.section)[s.index])
        if k is not None and k in removed:
            removed[k] += s.end - s.start
    return {k: len(base) - r for k, r in removed.items()}


def _split(keys: list[str], parts: int) -> list[list[str]]:
    """``keys`` cut into ``parts`` contiguous, nearly equal groups (no empty ones)."""
    parts = max(1, min(parts, len(keys)))
    bounds = np.linspace(0, len(keys), parts + 1).round().astype(int)
    return [keys[a:b] for a, b in itertools.pairwise(bounds.tolist()) if b > a]


async def _hierarchical(
    ctx: ContextState,
    scorer: Scorer,
    keys: list[str],
    *,
    group_size: int,
    descend_threshold: float,
    top_groups: int,
    branching: int,
    priority: int | None,
) -> tuple[MemoryMatrix, dict[str, Any]]:
    base_wp = ctx.wire_prompt()
    base_req = base_wp.request(priority=priority)
    baseline_out = (await scorer.score_batch([base_req]))[0]
    if isinstance(baseline_out, BaseException):
        raise baseline_out
    baseline: FloatArray = baseline_out
    m = baseline.shape[0]
    without = np.repeat(baseline[None, :], len(keys), axis=0)  # estimated: no divergence
    errors: list[str | None] = [None] * len(keys)
    exact_rows: set[str] = set()
    top = _split(keys, math.ceil(len(keys) / group_size))
    level, calls, depth = top, 1, 0
    tested: list[list[str]] = []
    while level:
        depth += 1
        reqs = [ctx.wire_prompt(skip=_skip_keys(g)).request(priority=priority) for g in level]
        _, outs = await ascore_ablations(scorer, reqs, sizes=m, lead=[base_req])
        calls += len(level)
        tested += level
        divs = np.full((len(level), m), np.nan)
        for gi, out in enumerate(outs):
            if out.ok:
                divs[gi] = divergence(baseline, out.scores)
        go = set(np.flatnonzero(np.isnan(divs).any(axis=1)).tolist())  # failed: look closer
        filled = np.nan_to_num(divs, nan=0.0)
        if m:
            go |= set(np.flatnonzero(filled.max(axis=1) > descend_threshold).tolist())
            for j in range(m if top_groups > 0 else 0):
                for g in np.argsort(-filled[:, j], kind="stable")[:top_groups]:
                    if filled[g, j] > 0.01:
                        go.add(int(g))
        nxt: list[list[str]] = []
        for gi, g in enumerate(level):
            if len(g) == 1:  # a singleton ablation is the exact leave-one-out row
                i = keys.index(g[0])
                exact_rows.add(g[0])
                without[i], errors[i] = outs[gi].scores, outs[gi].error
            elif gi in go:
                nxt += _split(g, branching)
        level = nxt
    estimated = [k for k in keys if k not in exact_rows]
    info = {
        "groups": top,
        "tested_groups": tested,
        "depth": depth,
        "estimated_keys": estimated,
        "calls": calls,
        "exact_calls": len(keys) + 1,
    }
    memory_texts, response_texts = texts_of(ctx, keys, base_wp.entries)
    mat = MemoryMatrix(
        keys=tuple(keys),
        entries=np.asarray(base_wp.entries, dtype=np.int64),
        baseline=baseline,
        without=without,
        errors=tuple(errors),
        method="hierarchical",
        approximate=True,
        meta=info,
        memory_texts=memory_texts,
        response_texts=response_texts,
    )
    return mat, info


async def ascore_memories_hierarchical(
    ctx: ContextState,
    scorer: Scorer,
    *,
    group_size: int | None = None,
    descend_threshold: float = 0.5,
    top_groups: int = 0,
    branching: int = 2,
    proxy: Scorer | None = None,
    keys: Sequence[str] | None = None,
    priority: int | None = DEFAULT_PRIORITY,
) -> MemoryMatrix:
    """Approximate N×M matrix by hierarchical ablation (see the module docstring).

    Parameters
    ----------
    group_size
        Adjacent memories per top-level group (default ``ceil(sqrt(N))``).
    descend_threshold
        Descend into a group whose removal changes some response by more than this (nats).
    top_groups
        Also descend into each response's ``top_groups`` most important groups (0: only
        the threshold decides).
    branching
        A descended group is split into this many parts, down to single memories (whose
        ablation is the exact leave-one-out row).
    proxy
        Run the search on this cheaper scorer and re-score the found memories exactly on
        ``scorer``.

    Returns
    -------
    MemoryMatrix
        ``method="hierarchical"`` (or ``"hierarchical+proxy"``), ``approximate=True``;
        ``meta`` holds the groups, which were descended, the estimated keys, and the calls
        and prompt tokens spent against the exact run (``exact_calls``,
        ``exact_prompt_tokens``).
    """
    mem_keys = list(keys) if keys is not None else ctx.memory_keys()
    if not mem_keys or not ctx.response_indices():
        return await ascore_memories(ctx, scorer, keys=mem_keys, progress=False)
    gs = group_size or max(1, math.ceil(math.sqrt(len(mem_keys))))
    if gs < 1:
        raise ScoringError(f"group_size must be >= 1, got {gs}")
    base_wp = ctx.wire_prompt()
    base_len = len(base_wp)
    ablated_len = _ablation_lengths(ctx, base_wp, mem_keys)
    exact_tokens = base_len + sum(ablated_len.values())
    search = proxy if proxy is not None else scorer
    before = _computed(search) + (_computed(scorer) if proxy is not None else 0)
    mat, info = await _hierarchical(
        ctx, search, mem_keys, group_size=gs, descend_threshold=descend_threshold,
        top_groups=top_groups, branching=branching, priority=priority,
    )
    sent = base_len + sum(len(ctx.wire_prompt(skip=_skip_keys(g))) for g in info["tested_groups"])
    found = [k for k in mem_keys if k not in info["estimated_keys"]]
    if proxy is not None:
        # keep only memories the proxy saw matter, then re-score them exactly on the target
        div = mat.divergence
        picked = [k for i, k in enumerate(mem_keys)
                  if k in found and np.nan_to_num(div[i], nan=1.0).max() > 0.0]
        exact = await ascore_memories(ctx, scorer, keys=picked or mem_keys[:1], progress=False)
        without = np.repeat(exact.baseline[None, :], len(mem_keys), axis=0)
        errors: list[str | None] = [None] * len(mem_keys)
        for k in exact.keys:
            i = mem_keys.index(k)
            without[i] = exact.without[exact.keys.index(k)]
            errors[i] = exact.errors[exact.keys.index(k)]
        info["estimated_keys"] = [k for k in mem_keys if k not in exact.keys]
        info["calls"] += exact.shape[0] + 1
        info["proxy_search_calls"] = info["calls"] - exact.shape[0] - 1
        sent += base_len + sum(ablated_len[k] for k in exact.keys)
        mat = MemoryMatrix(
            keys=tuple(mem_keys), entries=exact.entries, baseline=exact.baseline,
            without=without, errors=tuple(errors), method="hierarchical+proxy",
            approximate=True, meta=info, memory_texts=mat.memory_texts,
            response_texts=exact.response_texts,
        )
    return dataclasses.replace(mat, meta={
        **info,
        "prompt_tokens_sent": int(sent),
        "exact_prompt_tokens": int(exact_tokens),
        "computed_tokens": _computed(search)
        + (_computed(scorer) if proxy is not None else 0)
        - before,
        "group_size": gs,
        "descend_threshold": descend_threshold,
        **scorer_meta(scorer),
    })


def window_spans(
    ctx: ContextState,
    keys: Sequence[str],
    *,
    window: int = DEFAULT_WINDOW,
    restated: float | None = None,
) -> tuple[dict[str, tuple[int, int]], dict[str, list[int]]]:
    """The conversation span each memory's windowed ablation scores, before any refinement.

    Returns ``(spans, extended)``: per key the half-open conversation span ``(pos, end)``
    from its first position (identity memories: 0) through the ``window``-th response at or
    after it — extended, with ``restated``, through the last later response restating that
    share of its content — and, per extended key, the restating responses' entries.
    """
    if window < 1:
        raise ScoringError(f"window must be >= 1 response, got {window}")
    if restated is not None and not 0.0 < restated <= 1.0:
        raise ScoringError(f"restated must be a share in (0, 1], got {restated}")
    shares, share_entries = restatement_matrix(ctx, keys) if restated is not None else (None, [])
    spans: dict[str, tuple[int, int]] = {}
    extended: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        pos = _first_position(ctx, k)
        if pos is None:
            raise ScoringError(f"memory {k!r} is not in the context")
        end, _ = nth_response_end(ctx.conversation, pos, window)
        if shares is not None and restated is not None:
            far = [e for e, share in zip(share_entries, shares[i], strict=True)
                   if e >= end and share >= restated]
            if far:
                extended[k] = far
                end = far[-1] + 1
        spans[k] = (pos, end)
    return spans, extended


async def ascore_memories_windowed(
    ctx: ContextState,
    scorer: Scorer,
    *,
    window: int = DEFAULT_WINDOW,
    restated: float | None = None,
    refine: int = 0,
    keys: Sequence[str] | None = None,
    priority: int | None = DEFAULT_PRIORITY,
) -> MemoryMatrix:
    """Approximate N×M matrix: exact cells for the ``window`` responses after each memory.

    Memory ``i`` is ablated from the prompt truncated after the ``window``-th assistant
    response at or after its first position (identity memories: conversation entry 0); those
    responses' cells equal the exact leave-one-out cells (and so do those of the responses
    before it, which cannot depend on it), every later cell is estimated as no divergence.
    One baseline call plus one shorter call per memory (none for a memory that no response
    follows). A failed call is a NaN row with its error, as in the exact matrix.

    ``restated`` (a share in (0, 1]) adds a text-only screen for long-range use: a memory's
    window is extended through every later response that restates at least that share of
    its content words (IDF-weighted, :func:`~scoring_kit.scoring.restated.restatement`),
    so those cells — and the ones in between, which the longer prompt scores anyway — are
    exact too. It costs the longer prompts, no extra call; 0.5 is a reasonable start.

    ``refine`` (a count) spends a second round on the rows that matter most: the ``refine``
    memories with the largest windowed weight (row sum) whose window stopped before the last
    response are ablated again over the whole conversation, so their rows are exact. The
    ranking of the heaviest memories — what a top-``k`` reader uses — is then exact among
    those the window found, at ``refine`` full-suffix calls whatever N is. It cannot find a
    memory whose window shows nothing (``restated`` is the screen for that).

    Returns
    -------
    MemoryMatrix
        ``method="windowed"``, ``approximate=True``; ``meta`` holds ``window``,
        ``restated``, ``refine`` and the ``refined`` keys, per key the half-open conversation
        ``window_entries`` it scored, the ``extended`` keys with the restating responses'
        entries, ``estimated_cells``, the calls and prompt tokens spent against the exact run.
    """
    if refine < 0:
        raise ScoringError(f"refine must be a count >= 0, got {refine}")
    mem_keys = list(keys) if keys is not None else ctx.memory_keys()
    spans, extended = window_spans(ctx, mem_keys, window=window, restated=restated)
    base_wp = ctx.wire_prompt()
    entries = np.asarray(base_wp.entries, dtype=np.int64)
    col = {int(e): j for j, e in enumerate(base_wp.entries)}
    reqs = [base_wp.request(priority=priority)]
    asked: list[tuple[int, list[int]]] = []  # (row, columns its prompt scores)
    for i, k in enumerate(mem_keys):
        pos, end = spans[k]
        if any(pos <= e < end for e in col):
            sub = ctx.wire_prompt(range(0, end), skip=skip_key(k))
            reqs.append(sub.request(priority=priority))
            asked.append((i, [col[int(e)] for e in sub.entries]))
    (head,), outs = await ascore_ablations(
        scorer, reqs[1:], sizes=[len(cols) for _, cols in asked], lead=reqs[:1]
    )
    if isinstance(head, BaseException):
        raise head
    baseline: FloatArray = head
    without = np.repeat(baseline[None, :], len(mem_keys), axis=0)
    errors: list[str | None] = [None] * len(mem_keys)
    for (i, cols), out in zip(asked, outs, strict=True):
        _put_row(without, errors, i, cols, out)
    n_conv = len(ctx.conversation)
    refined = _heaviest_open_rows(
        baseline, without, errors, [bool((entries >= spans[k][1]).any()) for k in mem_keys],
        refine,
    )
    sent = sum(len(r.prompt) for r in reqs)
    if refined:
        full = [ctx.wire_prompt(skip=skip_key(mem_keys[i])).request(priority=priority)
                for i in refined]
        _, again = await ascore_ablations(scorer, full, sizes=len(base_wp.entries))
        sent += sum(len(r.prompt) for r in full)
        for i, out in zip(refined, again, strict=True):
            _put_row(without, errors, i, slice(None), out)
            spans[mem_keys[i]] = (spans[mem_keys[i]][0], n_conv)
    # a response before a memory cannot depend on it: those cells are exact (no divergence)
    # whether or not they were sent; only the cells after a memory's window are estimated
    estimated = int(sum(np.count_nonzero(entries >= spans[k][1]) for k in mem_keys))
    exact_tokens = len(base_wp) + sum(_ablation_lengths(ctx, base_wp, mem_keys).values())
    meta = {
        "window": window,
        "restated": restated,
        "extended": extended,
        "window_entries": {k: list(v) for k, v in spans.items()},
        "refine": refine,
        "refined": [mem_keys[i] for i in refined],
        "estimated_cells": estimated,
        "calls": len(reqs) + len(refined),
        "exact_calls": len(mem_keys) + 1,
        "prompt_tokens_sent": int(sent),
        "exact_prompt_tokens": int(exact_tokens),
        **scorer_meta(scorer),
    }
    memory_texts, response_texts = texts_of(ctx, mem_keys, base_wp.entries)
    return MemoryMatrix(keys=tuple(mem_keys), entries=entries, baseline=baseline,
                        without=without, errors=tuple(errors), method="windowed",
                        approximate=True, meta=meta, memory_texts=memory_texts,
                        response_texts=response_texts)


score_memories_windowed = sync_twin(ascore_memories_windowed, "score_memories_windowed")


def _put_row(
    without: FloatArray,
    errors: list[str | None],
    i: int,
    cols: list[int] | slice,
    out: Ablation,
) -> None:
    """Row ``i`` of ``without`` gets an ablation's scores at ``cols``; a failed call makes the
    whole row NaN and keeps its error (as in the exact matrix)."""
    if out.ok:
        without[i, cols] = out.scores
    else:
        without[i], errors[i] = np.nan, out.error


def _heaviest_open_rows(
    baseline: FloatArray,
    without: FloatArray,
    errors: Sequence[str | None],
    open_rows: Sequence[bool],
    count: int,
) -> list[int]:
    """The ``count`` rows with the largest windowed weight (row sum of the divergence) that
    succeeded and whose window left later responses unscored; heaviest first (ties, such as
    rows whose window showed nothing: the earlier row, whose suffix is the longest)."""
    if count <= 0 or not len(open_rows):
        return []
    weights = np.nan_to_num(divergence(baseline, without), nan=0.0).sum(axis=1)
    order = np.argsort(-weights, kind="stable")
    picked = [int(i) for i in order if open_rows[i] and errors[i] is None]
    return picked[:count]


def top_k_recall(exact: MemoryMatrix, approx: MemoryMatrix, k: int = 5, *,
                 signed: bool = False) -> tuple[float, float]:
    """How well ``approx`` finds what ``exact`` finds: ``(overall, per_response)``.

    A top-``k`` set holds the ``k`` heaviest memories whose value is above 0.01 (a memory
    that matters nowhere is never "found"); NaN counts as 0. ``overall``: the share of the
    exact matrix's top ``k`` by memory weight that is in the approximate matrix's.
    ``per_response``: the same per response column, averaged over the responses whose
    exact set is not empty (1.0 when none is).

    ``signed=True`` ranks both matrices' memories by their *signed* row sums
    (``delta.sum(axis=1)``: a response a memory's removal made more likely counts against
    it) instead of by the divergence's; ``per_response`` is the same either way (a cell's
    top-``k`` set only holds positive cells).
    """
    _check_pair(exact, approx, k)
    weights = signed_weights if signed else (lambda m: m.memory_weights)
    top_e = _top_set(weights(exact), k)
    overall = len(top_e & _top_set(weights(approx), k)) / len(top_e) if top_e else 1.0
    per: list[float] = []
    for j in range(exact.shape[1]):
        relevant = _top_set(exact.divergence[:, j], k)
        if relevant:
            per.append(len(relevant & _top_set(approx.divergence[:, j], k)) / len(relevant))
    return overall, float(np.mean(per)) if per else 1.0


def top_k_weight_share(exact: MemoryMatrix, approx: MemoryMatrix, k: int = 5) -> float:
    """How much of the exact top ``k``'s weight the approximate top ``k`` holds, by exact weight.

    ``sum(exact weight of approx's top k) / sum(exact weight of exact's top k)`` (top sets as
    in :func:`top_k_recall`; NaN counts as 0; 1.0 when the exact set is empty). Recall counts
    a swap of the ``k``-th and ``k+1``-th memory as a miss however close their weights are;
    this says what the swap cost: 0.99 with a recall of 0.8 means the memory picked instead
    weighs within 1 % of the one it displaced.
    """
    _check_pair(exact, approx, k)
    ew = np.nan_to_num(exact.memory_weights)
    want = float(ew[list(_top_set(ew, k))].sum())
    got = float(ew[list(_top_set(approx.memory_weights, k))].sum())
    return got / want if want > 0 else 1.0


def signed_weights(matrix: MemoryMatrix) -> FloatArray:
    """Row sums of the signed ``baseline - without``, ``(N,)`` (a NaN cell counts as 0).

    The divergence clips each cell at 0, so a memory whose removal shifts many later
    responses' log-probabilities a little either way gathers weight from the positive half
    of those shifts alone; the signed sum nets them out.
    """
    return np.asarray(np.nansum(matrix.delta, axis=1), dtype=np.float64)


def top_k_sign_agreement(matrix: MemoryMatrix, k: int = 5) -> float:
    """The share of ``matrix``'s top ``k`` by memory weight that is also its top ``k`` by
    :func:`signed_weights` (top sets as in :func:`top_k_recall`; 1.0 when the first is
    empty).

    Below 1.0, a place in the top ``k`` is decided by the clipped positive half of small
    shifts rather than by net effect — an approximate matrix that misses that place (it
    estimates the far cells as no divergence) has missed noise, not a dependence; compare
    ``top_k_recall(..., signed=True)``.
    """
    if k < 1:
        raise ScoringError(f"k must be >= 1, got {k}")
    top = _top_set(matrix.memory_weights, k)
    return len(top & _top_set(signed_weights(matrix), k)) / len(top) if top else 1.0


def _top_set(values: FloatArray, k: int) -> set[int]:
    """The ``k`` largest entries above 0.01 (NaN counts as 0): a top-``k`` set."""
    v = np.nan_to_num(values)
    return {int(i) for i in np.argsort(-v, kind="stable")[:k] if v[i] > 0.01}


def _check_pair(exact: MemoryMatrix, approx: MemoryMatrix, k: int) -> None:
    if exact.keys != approx.keys or exact.shape != approx.shape:
        msg = (f"matrices differ in shape or keys: exact {exact.shape}, approximate "
               f"{approx.shape}")
        raise ScoringError(msg)
    if k < 1:
        raise ScoringError(f"k must be >= 1, got {k}")


def _computed(scorer: Scorer) -> int:
    stats = getattr(scorer, "stats", None)
    return int(getattr(stats, "computed_tokens", 0) or 0)


score_memories_hierarchical = sync_twin(ascore_memories_hierarchical,
                                        "score_memories_hierarchical")
