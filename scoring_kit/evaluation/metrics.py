"""Ranking metrics for attribution against gold evidence (pure numpy).

``scores`` is one value per memory (higher = more important); ``gold`` is the index of the
gold memory, or a sequence of indices when several memories are gold.

**Ties are broken pessimistically**: a gold memory tied with others is ranked *after* all of
them (``rank = 1 + #{scores > s} + #{other scores == s}``). A method that cannot separate
memories (all zeros, e.g. a clamped divergence that is 0 everywhere) therefore gets no
credit, instead of the ``1/#ties`` chance credit an optimistic or random tie-break would
give. A NaN score (a failed ablation) counts as ``-inf``: below every real score and tied
with the other NaNs.

The chance levels for ``K`` memories and one gold memory: ``hit@k = min(k, K)/K``,
``MRR = H_K / K`` (``H_K`` the K-th harmonic number), see :func:`random_baseline`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._exceptions import ScoringError

__all__ = [
    "expected_hit_at_k",
    "expected_reciprocal_rank",
    "gold_rank",
    "hit_at_k",
    "random_baseline",
    "recall_at_k",
    "reciprocal_rank",
]

ArrayLike = npt.ArrayLike


def _prep(scores: ArrayLike, gold: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ScoringError("cannot rank an empty score vector")
    g = np.atleast_1d(np.asarray(gold, dtype=np.int64)).reshape(-1)
    if g.size == 0:
        raise ScoringError("no gold index given")
    bad = g[(g < 0) | (g >= s.size)]
    if bad.size:
        msg = f"gold index {int(bad[0])} is out of range for {s.size} scores"
        raise ScoringError(msg)
    return np.where(np.isnan(s), -np.inf, s), np.unique(g)


def _ranks(s: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Pessimistic 1-based rank of each gold index (among *all* memories)."""
    out = np.empty(g.size, dtype=np.int64)
    for j, i in enumerate(g.tolist()):
        above = int(np.count_nonzero(s > s[i]))
        ties = int(np.count_nonzero(s == s[i])) - 1
        out[j] = 1 + above + ties
    return out


def gold_rank(scores: ArrayLike, gold_index: int) -> int:
    """1-based rank of the gold memory, ties broken pessimistically.

    >>> gold_rank([0.1, 0.5, 0.5], 1)  # tied with memory 2: ranked after it
    2
    """
    s, g = _prep(scores, gold_index)
    if g.size != 1:
        raise ScoringError(f"gold_rank takes one gold index, got {g.size}")
    return int(_ranks(s, g)[0])


def hit_at_k(scores: ArrayLike, gold_index: int | Sequence[int], k: int) -> float:
    """1.0 if a gold memory is among the top ``k``, else 0.0 (pessimistic ties).

    >>> hit_at_k([0.2, 0.9, 0.1], 1, 1), hit_at_k([0.2, 0.9, 0.1], 0, 1)
    (1.0, 0.0)
    """
    if k < 1:
        raise ScoringError(f"k must be >= 1, got {k}")
    s, g = _prep(scores, gold_index)
    return float((_ranks(s, g) <= k).any())


def recall_at_k(scores: ArrayLike, gold: int | Sequence[int], k: int) -> float:
    """Fraction of the gold memories in the top ``k`` (= hit@k for one gold memory).

    >>> recall_at_k([0.3, 0.9, 0.1, 0.5], [0, 2], 2)
    0.0
    >>> recall_at_k([0.3, 0.9, 0.1, 0.5], [1, 3], 2)
    1.0
    """
    if k < 1:
        raise ScoringError(f"k must be >= 1, got {k}")
    s, g = _prep(scores, gold)
    # rank each gold memory against the non-gold ones only, so golds do not push each
    # other out; ties with non-gold memories stay pessimistic
    others = np.ones(s.size, dtype=bool)
    others[g] = False
    hits = 0
    for i in g.tolist():
        rank = 1 + int(np.count_nonzero(s[others] >= s[i]))
        # other gold memories strictly above this one still take top-k slots
        rank += int(np.count_nonzero(s[g] > s[i]))
        hits += rank <= k
    return hits / g.size


def reciprocal_rank(scores: ArrayLike, gold_index: int | Sequence[int]) -> float:
    """``1 / rank`` of the best-ranked gold memory (pessimistic ties).

    >>> reciprocal_rank([0.2, 0.9, 0.1], 0)
    0.5
    >>> reciprocal_rank([0.0, 0.0, 0.0], 0)  # all tied: ranked last
    0.3333333333333333
    """
    s, g = _prep(scores, gold_index)
    return 1.0 / float(_ranks(s, g).min())


def expected_hit_at_k(k_memories: int, k: int) -> float:
    """Chance hit@k (and recall@k) with one gold memory among ``k_memories``."""
    if k_memories < 1 or k < 1:
        raise ScoringError(f"need k_memories >= 1 and k >= 1, got {k_memories} and {k}")
    return min(k, k_memories) / k_memories


def expected_reciprocal_rank(k_memories: int) -> float:
    """Chance MRR with one gold memory among ``k_memories``: ``H_K / K``."""
    if k_memories < 1:
        raise ScoringError(f"need k_memories >= 1, got {k_memories}")
    return float(np.sum(1.0 / np.arange(1, k_memories + 1)) / k_memories)


def random_baseline(k_memories: int) -> dict[str, float]:
    """Chance levels of the summary metrics for ``k_memories`` memories, one gold.

    >>> random_baseline(4)
    {'hit@1': 0.25, 'recall@3': 0.75, 'MRR': 0.5208333333333333}
    """
    return {
        "hit@1": expected_hit_at_k(k_memories, 1),
        "recall@3": expected_hit_at_k(k_memories, 3),
        "MRR": expected_reciprocal_rank(k_memories),
    }
