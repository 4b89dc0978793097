"""The heatmap's reduction: a matrix frame shrunk to what a browser can draw.

:func:`heatmap_reduction` keeps the heaviest memories and bins consecutive responses (the
maximum divergence per bin, so a strong dependence is never averaged away), and says in a
:class:`HeatmapReduction` what it dropped. :mod:`scoring_kit.analysis.frames` re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .._exceptions import ScoringError

__all__ = ["HEATMAP_COLUMNS", "HeatmapReduction", "heatmap_reduction"]

#: Columns of :attr:`HeatmapReduction.frame` (one row per kept memory × response bin).
HEATMAP_COLUMNS: tuple[str, ...] = (
    "memory_key",
    "memory_rank",
    "memory_weight",
    "memory_text",
    "status",
    "error",
    "failure",
    "response_bin",
    "entry_index",
    "entry_last",
    "n_responses",
    "peak_entry",
    "baseline",
    "response_text",
    "divergence",
)


@dataclass(frozen=True, slots=True)
class HeatmapReduction:
    """What :func:`heatmap_reduction` kept and what it dropped.

    Attributes
    ----------
    frame
        The reduced frame (:data:`HEATMAP_COLUMNS`), one row per kept memory × bin.
    memories_total, memories_kept
        Memories in the input and in ``frame``.
    dropped_memories
        Keys left out (the lightest; failed memories rank last, so they go first).
    responses_total
        Responses (columns) in the input.
    response_bins
        Columns in ``frame``; equal to ``responses_total`` when nothing was binned.
    responses_per_bin
        Most responses aggregated into one bin (1 when nothing was binned).
    """

    frame: pl.DataFrame
    memories_total: int
    memories_kept: int
    dropped_memories: tuple[str, ...]
    responses_total: int
    response_bins: int
    responses_per_bin: int

    @property
    def reduced(self) -> bool:
        """True when memories were dropped or responses binned."""
        return bool(self.dropped_memories) or self.responses_per_bin > 1

    @property
    def marks(self) -> int:
        """Cells the heatmap will draw."""
        return self.frame.height

    def summary(self) -> str:
        """One line for a chart subtitle ('' when nothing was reduced)."""
        parts = []
        if self.dropped_memories:
            parts.append(
                f"heaviest {self.memories_kept} of {self.memories_total} memories"
                f" ({len(self.dropped_memories)} lighter dropped)"
            )
        if self.responses_per_bin > 1:
            parts.append(
                f"{self.responses_total} responses in {self.response_bins} bins of "
                f"≤{self.responses_per_bin} (max divergence per bin)"
            )
        return "; ".join(parts)


_REQUIRED = ("memory_key", "entry_index", "divergence", "memory_rank", "response_rank")


def heatmap_reduction(
    frame: pl.DataFrame,
    *,
    max_memories: int = 60,
    max_responses: int = 200,
    max_marks: int = 5000,
) -> HeatmapReduction:
    """Shrink a :func:`matrix_frame` to what a browser can draw, and say what was dropped.

    Memories: the ``max_memories`` heaviest (lowest ``memory_rank``) are kept; the rest are
    dropped. Responses: when there are more columns than
    ``min(max_responses, max_marks // kept_memories)``, consecutive responses (in column
    order) are put into that many equal-count bins and each cell becomes the **maximum**
    divergence over its bin (so a strong dependence is never averaged away). A bin's
    ``entry_index`` is its first response's, ``entry_last`` its last, and ``peak_entry``,
    ``baseline`` and ``response_text`` belong to the response with the largest divergence
    in the cell. A cell whose responses all failed stays ``status == "failed"`` with a null
    divergence. The result has at most ``max(max_marks, kept_memories)`` rows.

    Parameters
    ----------
    frame
        A :func:`matrix_frame` (needs at least ``memory_key``, ``entry_index``,
        ``divergence``, ``memory_rank`` and ``response_rank``).
    max_memories, max_responses
        Most rows and columns to draw.
    max_marks
        Most cells to draw.

    Raises
    ------
    ScoringError
        ``frame`` lacks a required column, or a limit is below 1.
    """
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        msg = (
            f"heatmap_reduction: the frame lacks column(s) {', '.join(missing)}; "
            "pass matrix_frame(matrix)"
        )
        raise ScoringError(msg)
    for name, val in (("max_memories", max_memories), ("max_responses", max_responses),
                      ("max_marks", max_marks)):
        if val < 1:
            msg = f"heatmap_reduction: {name} must be at least 1, got {val}"
            raise ScoringError(msg)
    f = frame
    for col, default in (
        ("memory_weight", pl.lit(None, dtype=pl.Float64)),
        ("memory_text", pl.lit("")),
        ("response_text", pl.lit("")),
        ("error", pl.lit(None, dtype=pl.String)),
        ("baseline", pl.lit(None, dtype=pl.Float64)),
    ):
        if col not in f.columns:
            f = f.with_columns(default.alias(col))
    f = f.with_columns(
        pl.col("divergence").cast(pl.Float64).fill_nan(None),
        pl.col("memory_weight").cast(pl.Float64).fill_nan(None),
    )
    mems = f.group_by("memory_key").agg(pl.col("memory_rank").min()).sort(
        "memory_rank", "memory_key"
    )
    kept = mems.head(max_memories).with_row_index("new_rank")
    dropped = tuple(mems["memory_key"].to_list()[max_memories:])
    n_kept = kept.height
    cols = f.select("response_rank").unique().sort("response_rank")
    n_resp = cols.height
    bins = max(1, min(max_responses, max_marks // max(n_kept, 1), n_resp))
    cols = cols.with_columns(
        ((pl.int_range(pl.len(), dtype=pl.Int64) * bins) // max(n_resp, 1)).alias(
            "response_bin"
        )
    )
    per_bin = cols.group_by("response_bin").len()["len"].max() if n_resp else 0
    per_bin = per_bin if isinstance(per_bin, int) else 0
    by_div = pl.col("divergence")

    def at_peak(col: str) -> pl.Expr:
        return pl.col(col).sort_by(by_div, descending=True, nulls_last=True).first()

    reduced = (
        f.join(kept.select("memory_key", "new_rank"), on="memory_key", how="inner")
        .join(cols, on="response_rank", how="inner")
        .sort("new_rank", "response_rank")
        .group_by("new_rank", "response_bin", maintain_order=True)
        .agg(
            pl.col("memory_key").first(),
            pl.col("memory_weight").first(),
            pl.col("memory_text").first(),
            pl.col("error").drop_nulls().first(),
            pl.col("entry_index").min().alias("entry_index"),
            pl.col("entry_index").max().alias("entry_last"),
            pl.len().cast(pl.Int64).alias("n_responses"),
            at_peak("entry_index").alias("peak_entry"),
            at_peak("baseline"),
            at_peak("response_text"),
            by_div.max(),
        )
        .with_columns(
            pl.col("new_rank").cast(pl.Int64).alias("memory_rank"),
            pl.when(pl.col("divergence").is_null())
            .then(pl.lit("failed"))
            .otherwise(pl.lit("ok"))
            .alias("status"),
        )
        .with_columns(
            pl.when(pl.col("status") == "failed")
            .then(pl.lit("failed: ") + pl.col("error").fill_null("no score"))
            .otherwise(pl.lit(None, dtype=pl.String))
            .alias("failure"),
        )
        .select(HEATMAP_COLUMNS)
    )
    return HeatmapReduction(
        frame=reduced,
        memories_total=mems.height,
        memories_kept=n_kept,
        dropped_memories=dropped,
        responses_total=n_resp,
        response_bins=bins if n_resp else 0,
        responses_per_bin=max(per_bin, 1),
    )
