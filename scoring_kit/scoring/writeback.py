"""Per-response memory scores written back onto the context, as the seed does.

The seed's full-matrix flow (``score_memories``) writes each memory's row onto the live
assistant nodes as soon as it is scored: a cell above 0.01 is set under the memory's key, a
cell at or below it removes the key. A failed call gives the seed a row of zeros, so a failed
memory's stale values are removed too; here a failed row is NaN and is treated the same way.

Contexts are immutable, so the "live context" is a :class:`LiveContext`: a holder whose
``context`` is replaced by an updated copy after every row. Pass one to
:func:`~scoring_kit.scoring.ascore_memories` as ``write_back=``; the background
:class:`~scoring_kit.scoring.MemoryScoringTask` does so on every full run. The scores are
saved with the context by :func:`~scoring_kit.context.io.save_context` (``memory_scores`` on
each assistant line of the tokenized format).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._types import FloatArray
from ..context.model import ContextState
from .divergence import KEEP_THRESHOLD

if TYPE_CHECKING:
    from .memory_matrix import MemoryMatrix

__all__ = ["LiveContext", "apply_matrix", "write_row"]


def write_row(
    ctx: ContextState,
    key: str,
    entries: Sequence[int],
    row: FloatArray | Sequence[float],
    *,
    threshold: float = KEEP_THRESHOLD,
) -> ContextState:
    """A copy of ``ctx`` with memory ``key``'s divergence ``row`` written onto the responses.

    ``row[j]`` belongs to conversation entry ``entries[j]``. A value above ``threshold``
    (0.01) is set, anything else — at or below it, or NaN (a failed call) — removes ``key``
    from that response's ``memory_scores``. Entries that are not assistant messages of
    ``ctx`` are left alone (as the seed skips indices past the conversation).
    """
    values = np.asarray(row, dtype=np.float64)
    conv = ctx.conversation
    updates: dict[int, dict[str, float]] = {}
    for e, v in zip(entries, values.tolist(), strict=True):
        if not 0 <= e < len(conv) or not conv[e].is_branch:
            continue
        scores = dict(updates.get(e, conv[e].memory_scores))
        if v > threshold:  # NaN compares False: removed
            scores[key] = float(v)
        else:
            scores.pop(key, None)
        updates[e] = scores
    return ctx.with_memory_scores(updates) if updates else ctx


def apply_matrix(
    ctx: ContextState, matrix: MemoryMatrix, *, threshold: float = KEEP_THRESHOLD
) -> ContextState:
    """Every row of ``matrix`` written onto ``ctx`` with :func:`write_row` (failed rows
    remove their key)."""
    div = matrix.divergence
    entries = matrix.entries.tolist()
    for i, key in enumerate(matrix.keys):
        ctx = write_row(ctx, key, entries, div[i], threshold=threshold)
    return ctx


class LiveContext:
    """A context that the full-matrix flow updates row by row (the seed's live AST).

    Read :attr:`context` at any time, during a run too: it holds every row finished so far.
    """

    def __init__(self, ctx: ContextState, *, threshold: float = KEEP_THRESHOLD) -> None:
        self.context = ctx
        self.threshold = threshold
        #: rows written so far
        self.rows = 0

    def row(self, key: str, entries: Sequence[int], row: FloatArray | Sequence[float]) -> None:
        """Write one memory's row (NaN for a failed memory)."""
        self.context = write_row(self.context, key, entries, row, threshold=self.threshold)
        self.rows += 1

    def matrix(self, matrix: MemoryMatrix) -> None:
        """Write every row of ``matrix`` (rows a resumed run took from its checkpoint too)."""
        self.context = apply_matrix(self.context, matrix, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"LiveContext({self.rows} rows written, {self.context.summary()})"
