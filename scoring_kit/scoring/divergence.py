"""Pure numpy: divergence, deltas, weights and the memory-weight update rule.

Shapes: ``baseline`` is ``(M,)`` (one total log-prob per response), ``without`` is ``(M,)``
or ``(N, M)`` (one row per ablated memory). A failed row is all-NaN and stays NaN through
every function here: failure is never turned into 0.0 ("unimportant").
"""

from __future__ import annotations

import numpy as np

from .._exceptions import ConfigError
from .._types import FloatArray

__all__ = [
    "DEFAULT_INITIAL_WEIGHT",
    "KEEP_THRESHOLD",
    "WEIGHT_MAX",
    "WEIGHT_MIN",
    "column_scores",
    "delta",
    "divergence",
    "ewma_weight",
    "row_weights",
]

#: A full-matrix cell is attached to a response when its divergence is above this.
KEEP_THRESHOLD = 0.01
WEIGHT_MIN = 0.01
WEIGHT_MAX = 1.0
#: Weight a memory is assumed to have before its first score (not specified upstream).
DEFAULT_INITIAL_WEIGHT = 0.5


def _align(baseline: FloatArray, without: FloatArray) -> FloatArray:
    """Pad ``without`` on the last axis with ``baseline`` where it is shorter.

    The reference counts a response missing from the ablated result as no divergence.
    """
    b = np.asarray(baseline, dtype=np.float64)
    w = np.asarray(without, dtype=np.float64)
    m = b.shape[-1]
    if w.shape[-1] == m:
        return w
    if w.shape[-1] > m:
        return w[..., :m]
    pad_shape = (*w.shape[:-1], m - w.shape[-1])
    pad = np.broadcast_to(b[w.shape[-1] :], pad_shape)
    return np.concatenate([w, pad], axis=-1)


def delta(baseline: FloatArray, without: FloatArray) -> FloatArray:
    """Signed ``baseline - without``; shape of ``without`` (rows broadcast).

    >>> delta(np.array([-1.0, -2.0]), np.array([[-3.0, -1.5]]))
    array([[ 2. , -0.5]])
    """
    b = np.asarray(baseline, dtype=np.float64)
    return b - _align(b, without)


def divergence(baseline: FloatArray, without: FloatArray) -> FloatArray:
    """``max(baseline - without, 0)`` per response; NaN where ``without`` is NaN.

    >>> divergence(np.array([-1.0, -2.0]), np.array([[-3.0, -1.5], [np.nan, np.nan]]))
    array([[ 2.,  0.],
           [nan, nan]])
    """
    d = delta(baseline, without)
    return np.where(np.isnan(d), np.nan, np.maximum(d, 0.0))


def row_weights(div: FloatArray) -> FloatArray:
    """Per-memory weight: the row sum (NaN for a failed row). Shape ``(N,)``."""
    return np.asarray(div, dtype=np.float64).sum(axis=-1)


def column_scores(div: FloatArray) -> FloatArray:
    """Per-response total dependence: column sum over the rows that succeeded.

    A column is NaN only when every row failed. Shape ``(M,)``.
    """
    d = np.asarray(div, dtype=np.float64)
    if d.ndim == 1:
        return d.copy()
    ok = ~np.isnan(d).all(axis=1)
    if not ok.any():
        return np.full(d.shape[1], np.nan)
    return np.nansum(d[ok], axis=0)


def ewma_weight(old: float, score: float) -> float:
    """The upstream weight update: fast up, slow down, clamped to ``[0.01, 1.0]``.

    ``alpha = 0.5 if score > old else 0.1``; ``new = alpha * score + (1 - alpha) * old``.

    >>> ewma_weight(0.2, 1.0), ewma_weight(0.6, 0.0)
    (0.6, 0.54)
    """
    if np.isnan(score):
        msg = "cannot update a memory weight with a NaN score (the scoring failed)"
        raise ConfigError(msg)
    alpha = 0.5 if score > old else 0.1
    new = alpha * score + (1.0 - alpha) * old
    return float(min(max(new, WEIGHT_MIN), WEIGHT_MAX))
