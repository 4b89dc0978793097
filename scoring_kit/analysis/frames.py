"""Scoring results as tidy polars frames (no plotting, no pandas).

Every frame here has one fixed schema, documented on the function that builds it, so the
charts in :mod:`scoring_kit.analysis.charts` and the exports in
:mod:`scoring_kit.analysis.export` can rely on the column names.
The heatmap's reduction (:func:`heatmap_reduction`, :class:`HeatmapReduction`) lives in
:mod:`scoring_kit.analysis.reduction` and is re-exported here.

Ranks are 0-based. *Heaviest* means the largest memory weight (the row sum of the
divergence matrix, :attr:`MemoryMatrix.memory_weights`); a memory whose ablation failed has
no weight (NaN) and ranks after every memory that succeeded. Failure is never turned into
0.0: in :func:`matrix_frame` the cells of a failed memory keep NaN (as in
:meth:`MemoryMatrix.to_frame`) and carry ``status == "failed"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ..context.model import visible_text
from ..scoring.matrix import MATRIX_COLUMNS
from .reduction import HEATMAP_COLUMNS, HeatmapReduction, heatmap_reduction

if TYPE_CHECKING:
    from ..context.model import ContextState
    from ..scoring.finetune import FinetuneCandidate
    from ..scoring.matrix import MemoryMatrix

__all__ = [
    "CANDIDATE_FRAME_COLUMNS",
    "HEATMAP_COLUMNS",
    "MATRIX_FRAME_COLUMNS",
    "HeatmapReduction",
    "Table",
    "candidates_frame",
    "heatmap_reduction",
    "matrix_frame",
    "matrix_texts",
    "response_frame",
    "snippet_text",
    "table",
    "top_memories",
    "top_memories_per_response",
]

#: Columns of :func:`matrix_frame`: :data:`~scoring_kit.scoring.MATRIX_COLUMNS` plus these.
MATRIX_FRAME_COLUMNS: tuple[str, ...] = (
    *MATRIX_COLUMNS,
    "status",
    "memory_rank",
    "response_rank",
    "memory_weight",
    "response_score",
    "memory_text",
    "response_text",
)

#: Columns of :func:`candidates_frame`.
CANDIDATE_FRAME_COLUMNS: tuple[str, ...] = (
    "entry_idx",
    "divergence",
    "timestamp_ns",
    "response_text",
    "prior_context",
    "alternate_text",
    "alternate_error",
    "context_tokens",
    "continuation_tokens",
)

_WS = re.compile(r"\s+")


def snippet_text(text: str | None, n: int | None = 60) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``n`` characters with ``…``.

    >>> snippet_text("a  long\\nnote about cats", 12)
    'a long note…'
    >>> snippet_text(None)
    ''
    """
    if not text:
        return ""
    flat = _WS.sub(" ", text).strip()
    if n is None or len(flat) <= n:
        return flat
    if n <= 1:
        return "…"[: max(n, 0)]
    return flat[: n - 1].rstrip() + "…"


def _memory_order(weights: np.ndarray) -> np.ndarray:
    """Row positions, heaviest first; NaN weights (failed) last; ties keep the key order."""
    w = np.asarray(weights, dtype=np.float64)
    failed = np.isnan(w)
    # lexsort: last key is primary → failed flag, then -weight, then position.
    return np.lexsort((np.arange(w.size), -np.where(failed, 0.0, w), failed))


def _ranks(order: np.ndarray) -> np.ndarray:
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size, dtype=np.int64)
    return ranks


def _entry_text(ctx: ContextState, e: int) -> str:
    conv = ctx.conversation
    if not 0 <= e < len(conv):
        return ""
    return visible_text(conv[e])


def matrix_texts(
    matrix: MemoryMatrix, ctx: ContextState | None = None
) -> tuple[list[str], list[str]]:
    """Full memory texts (aligned with ``keys``) and response texts (aligned with
    ``entries``): the matrix's own ``memory_texts`` / ``response_texts`` when it carries
    them, else read from ``ctx``, else empty strings."""
    n, m = matrix.shape
    mem = list(getattr(matrix, "memory_texts", ()) or ())
    resp = list(getattr(matrix, "response_texts", ()) or ())
    mem = mem if len(mem) == n else [""] * n
    resp = resp if len(resp) == m else [""] * m
    if ctx is not None:  # texts the matrix does not carry (saved without them) come from ctx
        mem = [t or ctx.memory_text(k) for t, k in zip(mem, matrix.keys, strict=True)]
        resp = [t or _entry_text(ctx, int(e)) for t, e in zip(resp, matrix.entries, strict=True)]
    return mem, resp


def _response_texts(matrix: MemoryMatrix, ctx: ContextState | None, n: int | None) -> list[str]:
    return [snippet_text(t, n) for t in matrix_texts(matrix, ctx)[1]]


def _memory_texts(
    matrix: MemoryMatrix, keys: Sequence[str], ctx: ContextState | None, n: int | None
) -> list[str]:
    texts = dict(zip(matrix.keys, matrix_texts(matrix, ctx)[0], strict=True))
    return [snippet_text(texts.get(k, ""), n) for k in keys]


def matrix_frame(
    matrix: MemoryMatrix, ctx: ContextState | None = None, *, snippet: int | None = 60
) -> pl.DataFrame:
    """The long matrix frame with ranks, weights and text snippets.

    One row per (memory, response), memories in key order, responses in column order.

    Parameters
    ----------
    matrix
        The scored matrix, ``(n_memories, n_responses)``.
    ctx
        The context it was scored on: gives the text snippets when the matrix does not
        carry its texts (``memory_texts`` / ``response_texts``; empty strings without both).
    snippet
        Maximum characters of each text snippet (``None``: full text, still on one line).

    Returns
    -------
    pl.DataFrame
        :data:`MATRIX_FRAME_COLUMNS`: ``memory_key`` (str), ``entry_index`` (i64,
        conversation index of the response), ``baseline``, ``without``, ``delta``,
        ``divergence`` (f64; NaN on a failed memory), ``error`` (str or null), ``status``
        (``"ok"`` or ``"failed"``: a failed memory or a NaN cell), ``memory_rank`` (i64,
        0 = heaviest, failed memories last), ``response_rank`` (i64, 0..M-1 in column
        order), ``memory_weight`` (f64, row sum; NaN when failed), ``response_score`` (f64,
        column sum over the memories that succeeded), ``memory_text``, ``response_text``.

    Examples
    --------
    >>> import numpy as np
    >>> from scoring_kit.scoring import MemoryMatrix
    >>> m = MemoryMatrix(["a", "b"], np.array([1, 3]), np.array([-1.0, -2.0]),
    ...                  np.array([[-1.5, -2.0], [np.nan, np.nan]]), [None, "timeout"])
    >>> matrix_frame(m).select("memory_key", "entry_index", "status", "memory_rank").rows()
    [('a', 1, 'ok', 0), ('a', 3, 'ok', 0), ('b', 1, 'failed', 1), ('b', 3, 'failed', 1)]
    """
    n, m = matrix.shape
    base = matrix.to_frame()
    weights = matrix.memory_weights
    mem_rank = _ranks(_memory_order(weights))
    div = matrix.divergence.reshape(-1)
    failed_row = np.repeat(np.asarray([e is not None for e in matrix.errors], dtype=bool), m)
    status = np.where(failed_row | np.isnan(div), "failed", "ok")
    return base.with_columns(
        pl.Series("status", status.tolist(), dtype=pl.String),
        pl.Series("memory_rank", np.repeat(mem_rank, m), dtype=pl.Int64),
        pl.Series("response_rank", np.tile(np.arange(m, dtype=np.int64), n), dtype=pl.Int64),
        pl.Series("memory_weight", np.repeat(weights, m), dtype=pl.Float64, nan_to_null=False),
        pl.Series(
            "response_score", np.tile(matrix.response_scores, n), dtype=pl.Float64,
            nan_to_null=False,
        ),
        pl.Series(
            "memory_text",
            [t for t in _memory_texts(matrix, matrix.keys, ctx, snippet) for _ in range(m)],
            dtype=pl.String,
        ),
        pl.Series("response_text", _response_texts(matrix, ctx, snippet) * n, dtype=pl.String),
    ).select(MATRIX_FRAME_COLUMNS)


def response_frame(
    matrix: MemoryMatrix, ctx: ContextState | None = None, *, snippet: int | None = 60
) -> pl.DataFrame:
    """One row per response: how much it depends on the memories, and on which most.

    Returns
    -------
    pl.DataFrame
        ``response_rank``, ``entry_index``, ``baseline``, ``response_score`` (column sum
        over the memories that succeeded; null when every memory failed), ``top_memory``
        (key of the largest divergence, null when none is above 0), ``top_divergence``,
        ``response_text``.
    """
    n, m = matrix.shape
    div = matrix.divergence
    top_key: list[str | None] = [None] * m
    top_val: list[float | None] = [None] * m
    if n:
        safe = np.where(np.isnan(div), -np.inf, div)
        best = safe.argmax(axis=0)
        for j in range(m):
            v = float(safe[best[j], j])
            if v > 0:
                top_key[j] = matrix.keys[int(best[j])]
                top_val[j] = v
    return pl.DataFrame(
        {
            "response_rank": np.arange(m, dtype=np.int64),
            "entry_index": matrix.entries,
            "baseline": matrix.baseline,
            "response_score": matrix.response_scores,
            "top_memory": top_key,
            "top_divergence": top_val,
            "response_text": _response_texts(matrix, ctx, snippet),
        },
        schema={
            "response_rank": pl.Int64,
            "entry_index": pl.Int64,
            "baseline": pl.Float64,
            "response_score": pl.Float64,
            "top_memory": pl.String,
            "top_divergence": pl.Float64,
            "response_text": pl.String,
        },
        nan_to_null=True,
    )


def top_memories(
    matrix: MemoryMatrix,
    k: int | None = 10,
    *,
    ctx: ContextState | None = None,
    snippet: int | None = 60,
    threshold: float = 0.01,
) -> pl.DataFrame:
    """The ``k`` heaviest memories (failed memories are left out: they have no weight).

    Parameters
    ----------
    matrix
        The scored matrix.
    k
        How many to keep (``None``: all that succeeded).
    ctx
        Gives ``memory_text`` when the matrix carries no texts (empty without both).
    snippet
        Maximum characters of ``memory_text``.
    threshold
        ``responses_above`` counts the responses whose divergence is above this.

    Returns
    -------
    pl.DataFrame
        ``memory_rank``, ``memory_key``, ``weight`` (row sum), ``max_divergence``,
        ``peak_entry`` (conversation index of the largest divergence),
        ``responses_above``, ``memory_text``; heaviest first.

    Examples
    --------
    >>> import numpy as np
    >>> from scoring_kit.scoring import MemoryMatrix
    >>> m = MemoryMatrix(["a", "b", "c"], np.array([1, 3]), np.array([-1.0, -2.0]),
    ...                  np.array([[-1.5, -2.0], [-3.0, -2.5], [np.nan, np.nan]]),
    ...                  [None, None, "boom"])
    >>> top_memories(m, 5).select("memory_key", "weight").rows()
    [('b', 2.5), ('a', 0.5)]
    """
    m = matrix.shape[1]
    weights = matrix.memory_weights
    order = [int(i) for i in _memory_order(weights) if not np.isnan(weights[i])]
    if k is not None:
        order = order[: max(k, 0)]
    div = matrix.divergence
    rows_max: list[float] = []
    peaks: list[int | None] = []
    above: list[int] = []
    for i in order:
        row = div[i]
        if m:
            j = int(np.nanargmax(row)) if not np.isnan(row).all() else 0
            rows_max.append(float(row[j]))
            peaks.append(int(matrix.entries[j]))
        else:
            rows_max.append(0.0)
            peaks.append(None)
        above.append(int(np.sum(row > threshold)))
    keys = [matrix.keys[i] for i in order]
    return pl.DataFrame(
        {
            "memory_rank": list(range(len(order))),
            "memory_key": keys,
            "weight": [float(weights[i]) for i in order],
            "max_divergence": rows_max,
            "peak_entry": peaks,
            "responses_above": above,
            "memory_text": _memory_texts(matrix, keys, ctx, snippet),
        },
        schema={
            "memory_rank": pl.Int64,
            "memory_key": pl.String,
            "weight": pl.Float64,
            "max_divergence": pl.Float64,
            "peak_entry": pl.Int64,
            "responses_above": pl.Int64,
            "memory_text": pl.String,
        },
    )


def top_memories_per_response(
    matrix: MemoryMatrix,
    k: int = 3,
    *,
    threshold: float = 0.0,
    ctx: ContextState | None = None,
    snippet: int | None = None,
) -> pl.DataFrame:
    """For every response, the ``k`` memories it leaned on most.

    Only cells with a divergence above ``threshold`` count (failed cells never do), so a
    response that depends on no memory has no rows.

    Returns
    -------
    pl.DataFrame
        ``response_rank``, ``entry_index``, ``rank`` (0 = largest divergence),
        ``memory_key``, ``divergence``, ``share`` (the cell over the response's column
        sum), ``response_text``, ``memory_text`` (the matrix's texts, else ``ctx``'s; cut
        to ``snippet`` characters unless ``None``); sorted by response, then rank.

    Examples
    --------
    >>> import numpy as np
    >>> from scoring_kit.scoring import MemoryMatrix
    >>> m = MemoryMatrix(["a", "b"], np.array([1, 3]), np.array([-1.0, -2.0]),
    ...                  np.array([[-1.5, -2.0], [-3.0, -2.5]]), [None, None])
    >>> top_memories_per_response(m, 1).select("entry_index", "memory_key").rows()
    [(1, 'b'), (3, 'b')]
    """
    mem_texts, resp_texts = matrix_texts(matrix, ctx)
    texts = pl.DataFrame(
        {"memory_key": matrix.keys, "memory_text": [snippet_text(t, snippet) for t in mem_texts]},
        schema={"memory_key": pl.String, "memory_text": pl.String},
    ).unique("memory_key", keep="first", maintain_order=True)
    resp = pl.DataFrame(
        {"response_rank": np.arange(matrix.shape[1], dtype=np.int64),
         "response_text": [snippet_text(t, snippet) for t in resp_texts]},
        schema={"response_rank": pl.Int64, "response_text": pl.String},
    )
    frame = (
        matrix.to_frame()
        .with_columns(
            pl.Series("response_rank", np.tile(np.arange(matrix.shape[1]), matrix.shape[0]),
                      dtype=pl.Int64),
            pl.col("divergence").fill_nan(None),
        )
        .with_columns(
            (pl.col("divergence") / pl.col("divergence").sum().over("response_rank"))
            .alias("share")
        )
        .filter(pl.col("divergence") > threshold)
    )
    return (
        frame.sort(
            ["response_rank", "divergence", "memory_key"],
            descending=[False, True, False],
        )
        .with_columns(pl.int_range(pl.len()).over("response_rank").cast(pl.Int64).alias("rank"))
        .filter(pl.col("rank") < k)
        .join(resp, on="response_rank", how="left", maintain_order="left")
        .join(texts, on="memory_key", how="left", maintain_order="left")
        .select("response_rank", "entry_index", "rank", "memory_key", "divergence", "share",
                "response_text", "memory_text")
    )


class Table:
    """A frame shown whole in a notebook: every row, full texts wrapped (no ``…`` cuts).

    Polars' own notebook view cuts strings and hides middle rows; review tables need the
    text. ``Table(frame).frame`` is the frame itself.
    """

    def __init__(self, frame: pl.DataFrame, *, float_format: str = ".4g") -> None:
        self.frame = frame
        self.float_format = float_format

    def _cell(self, value: object) -> str:
        import html

        if value is None:
            return "<span style='color:#999'>null</span>"
        if isinstance(value, float):
            return format(value, self.float_format)
        return html.escape(str(value))

    def _repr_html_(self) -> str:
        import html

        # inline styles: a notebook's own table rules (right-aligned cells) come later
        style = ("style='text-align:left;vertical-align:top;white-space:pre-wrap;"
                 "max-width:38em;padding:3px 8px'")
        head = "".join(f"<th {style}>{html.escape(c)}</th>" for c in self.frame.columns)
        body = "".join(
            "<tr>" + "".join(f"<td {style}>{self._cell(v)}</td>" for v in row) + "</tr>"
            for row in self.frame.iter_rows()
        )
        return (
            f"<table class='sk-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table><p style='color:#666'>{self.frame.height} rows</p>"
        )

    def __repr__(self) -> str:
        with pl.Config(fmt_str_lengths=200, tbl_rows=-1, tbl_width_chars=200):
            return repr(self.frame)


def table(frame: pl.DataFrame) -> Table:
    """``frame`` for reading in a notebook: all rows, full texts wrapped (see :class:`Table`)."""
    return Table(frame)


def candidates_frame(candidates: Iterable[FinetuneCandidate]) -> pl.DataFrame:
    """Finetune candidates as a frame, one row each, in the order given.

    Returns
    -------
    pl.DataFrame
        :data:`CANDIDATE_FRAME_COLUMNS`: the candidate's scalar fields plus
        ``context_tokens`` and ``continuation_tokens`` (token counts; the id lists
        themselves stay in the JSONL export).
    """
    cands = list(candidates)
    return pl.DataFrame(
        {
            "entry_idx": [c.entry_idx for c in cands],
            "divergence": [c.divergence for c in cands],
            "timestamp_ns": [c.timestamp_ns for c in cands],
            "response_text": [c.response_text for c in cands],
            "prior_context": [c.prior_context for c in cands],
            "alternate_text": [c.alternate_text for c in cands],
            "alternate_error": [c.alternate_error for c in cands],
            "context_tokens": [len(c.context_ids) for c in cands],
            "continuation_tokens": [len(c.continuation_ids) for c in cands],
        },
        schema={
            "entry_idx": pl.Int64,
            "divergence": pl.Float64,
            "timestamp_ns": pl.Int64,
            "response_text": pl.String,
            "prior_context": pl.String,
            "alternate_text": pl.String,
            "alternate_error": pl.String,
            "context_tokens": pl.Int64,
            "continuation_tokens": pl.Int64,
        },
    )
