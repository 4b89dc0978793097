"""The prefix-sharing plan of :meth:`Engine.score_many`: plain numpy, no torch.

Given the items of one call (and the prefixes kept from earlier calls), this module decides

* how long the common prefix of every pair is (:func:`lcp`, :func:`lcp_matrix`);
* in which order the items run and which of them others extend (:func:`order_jobs`: the
  item the others would reuse the most from — the leave-one-out baseline — first);
* which computed prefix each item reuses and which rows it must still compute
  (:func:`best_source`, :func:`plan_job`);
* how the items extending one prefix are grouped (:func:`group_plans`) and packed into
  batched passes within the token budgets (:func:`batches`);
* which prefixes are kept for the next call (:func:`keep_between_calls`).

The forward code (``forward.py``) carries the plans out; it alone imports torch. A computed
prefix's KV is opaque here (:attr:`Cached.kv`): the plan only reads its tokens, its length and
the log-probabilities it knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._types import FloatArray, IntArray, Span

__all__ = [
    "FULLY_REUSED",
    "NO_SOURCE",
    "Cached",
    "Job",
    "JobOrder",
    "Plan",
    "batches",
    "best_source",
    "gain",
    "group_plans",
    "keep_between_calls",
    "lcp",
    "lcp_matrix",
    "make_job",
    "order_jobs",
    "plan_job",
    "span_positions",
    "totals",
]

#: group key of plans that reuse every log-probability they need (nothing to compute)
FULLY_REUSED = -2
#: group key of plans that compute from scratch (no source prefix)
NO_SOURCE = -1


@dataclass(slots=True)
class Job:
    """One valid ``score_many`` item, prepared."""

    slot: int
    tokens: IntArray
    spans: list[Span]
    #: scored positions t (sorted); the hidden row needed for t is t - 1
    targets: IntArray
    #: tokens that must be forwarded: [0, need) gives the hidden rows 0 .. need - 1
    need: int


@dataclass(slots=True)
class Cached:
    """A computed prefix: its tokens, its KV and the log-probabilities it knows."""

    tokens: IntArray
    #: per-layer (key, value) tensors; opaque to the plan (the forward code's business)
    kv: Any
    kv_len: int
    #: lp[t] = log P(tokens[t] | tokens[:t]) where known, NaN elsewhere; len(tokens) + 1 long
    lp: FloatArray


@dataclass(slots=True)
class Plan:
    """How one job is computed from a source: reuse ``r`` KV rows, compute rows ``rows``."""

    job: Job
    source: Cached | None
    reuse: int
    lp: FloatArray
    #: scored positions t whose log-probability must be computed (hidden row t - 1 >= reuse)
    compute: IntArray
    #: forward tokens [reuse, end)
    end: int


@dataclass(frozen=True, slots=True)
class JobOrder:
    """The order the jobs of one call run in, and which of them other jobs extend."""

    #: job indices, the hub (the job others reuse the most from) first
    order: list[int]
    #: per job: whether its KV is kept for later jobs of this call (it runs in phase 1)
    is_parent: list[bool]
    #: the hub's index (``order[0]``)
    top: int


def lcp(a: IntArray, b: IntArray) -> int:
    """Length of the longest common prefix of two id arrays (vectorised)."""
    m = min(a.shape[0], b.shape[0])
    if m == 0:
        return 0
    neq = a[:m] != b[:m]
    i = int(np.argmax(neq))
    return i if bool(neq[i]) else m


def lcp_matrix(arrays: Sequence[IntArray]) -> IntArray:
    """Pairwise longest-common-prefix lengths, ``O(n log n · L + n²)``.

    Sorts the sequences lexicographically; then ``lcp(s_i, s_j)`` for ``i < j`` in sorted order
    is the minimum of the adjacent LCPs between them. The diagonal holds each array's length.
    """
    n = len(arrays)
    out = np.zeros((n, n), dtype=np.int64)
    if n == 0:
        return out
    keys = [np.ascontiguousarray(a, dtype=">u4").tobytes() for a in arrays]
    order = sorted(range(n), key=keys.__getitem__)
    adj = np.array(
        [lcp(arrays[order[k]], arrays[order[k + 1]]) for k in range(n - 1)], dtype=np.int64
    )
    srt = np.zeros((n, n), dtype=np.int64)
    for k in range(n):
        srt[k, k] = arrays[order[k]].shape[0]
        if k < n - 1:
            srt[k, k + 1 :] = np.minimum.accumulate(adj[k:])
    srt = np.triu(srt) + np.triu(srt, 1).T
    idx = np.asarray(order)
    out[np.ix_(idx, idx)] = srt
    return out


def span_positions(spans: Sequence[Span]) -> IntArray:
    """Every position ``t`` of the half-open spans, in order."""
    if not spans:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans])


def totals(lp: FloatArray, spans: Sequence[Span]) -> FloatArray:
    """The sum of ``lp`` over each span (float64, one per span)."""
    return np.array([float(np.sum(lp[a:b])) for a, b in spans], dtype=np.float64)


def make_job(slot: int, tokens: IntArray, spans: list[Span]) -> Job:
    """The job of a validated item with at least one span."""
    targets = span_positions(spans)
    return Job(slot, tokens, spans, targets, int(targets[-1]))


def order_jobs(
    jobs: Sequence[Job], persisted: Sequence[Cached], *, hub_cache_tokens: int
) -> JobOrder:
    """Order the jobs of one call and mark the ones that others extend.

    The hub — the job whose prefix the others (and the kept prefixes) would reuse the most —
    runs first; ties go to the longer job, then to the earlier one. A job is a parent when a
    later job (in that order) extends it more than anything seen before it. The hub is a
    parent too when ``hub_cache_tokens > 0`` and its prefix fits in that many tokens (its KV
    is then kept for the next call).

    ``jobs`` must not be empty.
    """
    n = len(jobs)
    arrays = [j.tokens for j in jobs] + [c.tokens for c in persisted]
    needs = np.array([j.need for j in jobs] + [c.kv_len for c in persisted], dtype=np.int64)
    m = lcp_matrix(arrays)
    usable = np.minimum(np.minimum(m, needs[:, None]), needs[None, :])
    np.fill_diagonal(usable, 0)
    # hubness: how much the others would reuse from an item
    hub = usable.sum(axis=0)
    order = sorted(range(n), key=lambda i: (-int(hub[i]), -int(needs[i]), i))
    # parents: the earlier item (or kept prefix) that each item extends the most
    seen: list[int] = list(range(n, n + len(persisted)))
    children = np.zeros(n + len(persisted), dtype=np.int64)
    for i in order:
        if seen:
            cand = np.asarray(seen)
            gains = usable[i, cand]
            best = int(np.argmax(gains))
            if gains[best] > 0:
                children[cand[best]] += 1
        seen.append(i)
    top = order[0]
    is_parent = [bool(children[i] > 0) for i in range(n)]
    if hub_cache_tokens > 0 and jobs[top].need <= hub_cache_tokens:
        is_parent[top] = True
    return JobOrder(order, is_parent, top)


def gain(job: Job, source: Cached) -> int:
    """How many of ``job``'s forward tokens ``source``'s KV would save."""
    p = lcp(job.tokens, source.tokens)
    return min(p, source.kv_len, job.need)


def best_source(job: Job, retained: Sequence[Cached]) -> Cached | None:
    """The retained prefix that saves ``job`` the most (the first such), or None."""
    best: Cached | None = None
    best_gain = 0
    for c in retained:
        g = gain(job, c)
        if g > best_gain:
            best, best_gain = c, g
    return best


def plan_job(job: Job, source: Cached | None) -> Plan:
    """Decide how much of ``source`` ``job`` reuses and which rows it computes."""
    lp = np.full(job.tokens.shape[0] + 1, np.nan, dtype=np.float64)
    t = job.targets
    if source is None:
        return Plan(job, None, 0, lp, t, job.need)
    p = lcp(job.tokens, source.tokens)
    # log-probs known in the shared prefix are valid for this job too
    known_len = min(p, source.lp.shape[0])
    lp[:known_len] = source.lp[:known_len]
    reusable = (t < p) & ~np.isnan(lp[t])
    compute = t[~reusable]
    if compute.size == 0:
        return Plan(job, source, 0, lp, compute, 0)
    reuse = int(min(p, source.kv_len, int(compute[0]) - 1))
    return Plan(job, source if reuse > 0 else None, max(reuse, 0), lp, compute, int(compute[-1]))


def group_plans(plans: Sequence[Plan]) -> dict[int, list[Plan]]:
    """Group plans by the prefix they extend (first-seen order, stable within a group).

    Keys: ``id(source)``, :data:`NO_SOURCE` for plans computed from scratch, and
    :data:`FULLY_REUSED` for plans with nothing to compute.
    """
    groups: dict[int, list[Plan]] = {}
    for plan in plans:
        if plan.compute.size == 0 or plan.source is None:
            key = NO_SOURCE if plan.compute.size else FULLY_REUSED
        else:
            key = id(plan.source)
        groups.setdefault(key, []).append(plan)
    return groups


def batches(
    plans: list[Plan], *, batch_tokens: int, max_batch: int, batch_kv_tokens: int
) -> list[list[Plan]]:
    """Pack plans extending the same prefix into passes within the token budgets.

    Longest suffix first; a pass grows while it stays within ``max_batch`` rows,
    ``batch_tokens`` padded suffix tokens and ``batch_kv_tokens`` KV rows. ``batch_tokens``
    or ``max_batch`` of 1 or less runs each plan alone (in the given order).
    """
    if batch_tokens <= 1 or max_batch <= 1 or len(plans) == 1:
        return [[p] for p in plans]
    plans = sorted(plans, key=lambda p: -(p.end - p.reuse))
    out: list[list[Plan]] = []
    cur: list[Plan] = []
    for p in plans:
        trial = [*cur, p]
        longest = max(q.end - q.reuse for q in trial)
        prefix = max(q.reuse for q in trial)
        fits = (
            len(trial) <= max_batch
            and len(trial) * longest <= batch_tokens
            and len(trial) * (prefix + longest) <= batch_kv_tokens
        )
        if cur and not fits:
            out.append(cur)
            cur = [p]
        else:
            cur = trial
    if cur:
        out.append(cur)
    return out


def keep_between_calls(
    candidates: Sequence[Cached], *, max_tokens: int, max_entries: int
) -> list[Cached]:
    """The prefixes kept for the next call, from ``candidates`` in priority order.

    Duplicates (by identity) are skipped, and so is any prefix that would take the kept KV
    past ``max_tokens``; at most ``max_entries`` are kept.
    """
    keep_list: list[Cached] = []
    for c in candidates:
        if any(k is c for k in keep_list):
            continue
        if sum(k.kv_len for k in keep_list) + c.kv_len > max_tokens:
            continue
        if len(keep_list) < max_entries:
            keep_list.append(c)
    return keep_list
