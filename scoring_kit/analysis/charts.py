"""Altair charts of scoring results.

Every builder is a pure function of its arguments: it returns a **new** chart each call and
keeps no state besides the theme registration below. The data is embedded inline
(``{"values": [...]}``), already reduced in polars, so the charts save and render without
Altair's row limit and without a running kernel.

Altair is imported inside the builders, not when this module is imported. The first call
of a builder registers the house theme :data:`THEME_NAME` with ``alt.theme.register`` and
enables it **only** when the active theme is still Altair's ``"default"`` (a theme you
enabled yourself is left alone; ``alt.theme.enable("default")`` turns ours off); the theme
and the shared helpers live in :mod:`scoring_kit.analysis._altair`, the heatmap in
:mod:`scoring_kit.analysis.heatmap` (re-exported here).

Charts
------
:func:`heatmap`
    memories × responses, colour = divergence, failed memories grey; optionally linked
    to a bar chart of the memories a clicked response leaned on.
:func:`memory_weights_chart`
    one bar per memory (row sum of the divergence).
:func:`response_dependence_chart`
    total dependence of each response over the conversation index.
:func:`finetune_histogram`
    distribution of finetune divergences with a rule at the threshold (log axis).
:func:`weight_history_chart`
    memory-store weights over time, one line per memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .._exceptions import ScoringError
from ..scoring.finetune import DEFAULT_THRESHOLD, FinetuneCandidate
from ._altair import _ACCENT, THEME_NAME, _alt, _clamp, _data
from .frames import matrix_frame, response_frame
from .heatmap import heatmap

if TYPE_CHECKING:
    import altair as alt

    from ..context.model import ContextState
    from ..scoring.matrix import MemoryMatrix

__all__ = [
    "THEME_NAME",
    "finetune_histogram",
    "heatmap",
    "memory_weights_chart",
    "response_dependence_chart",
    "weight_history_chart",
]

# ── memory weights ───────────────────────────────────────────────


def memory_weights_chart(
    matrix: MemoryMatrix,
    ctx: ContextState | None = None,
    *,
    top: int | None = None,
    snippet: int = 60,
    width: int = 420,
    title: str | None = None,
) -> alt.LayerChart:
    """One horizontal bar per memory: its weight (row sum of the divergence), heaviest on top.

    Failed memories are listed last with a grey ``failed`` label (tooltip: the error).

    Parameters
    ----------
    matrix
        The scored matrix.
    ctx
        Adds the memory text to the tooltips.
    top
        Show only the ``top`` heaviest memories (failed ones are then shown only if room).
    snippet
        Characters of memory text in the tooltips.
    width
        Plot width in pixels (the height follows the number of memories).
    title
        Chart title.
    """
    alt = _alt()
    frame = (
        matrix_frame(matrix, ctx, snippet=snippet)
        .group_by("memory_key", maintain_order=True)
        .agg(
            pl.col("memory_rank").first(),
            pl.col("memory_weight").first().fill_nan(None).alias("weight"),
            pl.col("divergence").fill_nan(None).max().alias("max_divergence"),
            pl.col("memory_text").first(),
            pl.col("error").first(),
            pl.col("status").first(),
        )
        .sort("memory_rank")
        .with_columns(
            pl.when(pl.col("weight").is_null())
            .then(pl.lit("failed: ") + pl.col("error").fill_null("no score"))
            .otherwise(pl.lit(None, dtype=pl.String))
            .alias("failure"),
            pl.when(pl.col("weight").is_null()).then(pl.lit("failed")).otherwise(pl.lit("ok"))
            .alias("status"),
        )
    )
    if top is not None:
        frame = frame.head(max(top, 0))
    keys = frame["memory_key"].to_list()
    data = _data(frame)
    y = alt.Y("memory_key:N", sort=keys, title="memory (heaviest first)")
    bars = (
        alt.Chart()
        .transform_filter("datum.status === 'ok'")
        .mark_bar()
        .encode(
            x=alt.X("weight:Q", title="weight (sum of divergence over responses)"),
            y=y,
            tooltip=[
                alt.Tooltip("memory_key:N", title="memory"),
                alt.Tooltip("memory_text:N", title="memory text"),
                alt.Tooltip("weight:Q", title="weight", format=".4g"),
                alt.Tooltip("max_divergence:Q", title="max divergence", format=".4g"),
            ],
        )
    )
    failed = (
        alt.Chart()
        .transform_filter("datum.status === 'failed'")
        .mark_text(align="left", dx=3, color="#888", fontStyle="italic")
        .encode(
            x=alt.datum(0),
            y=y,
            text=alt.value("failed"),
            tooltip=[
                alt.Tooltip("memory_key:N", title="memory"),
                alt.Tooltip("failure:N", title="status"),
            ],
        )
    )
    return alt.layer(bars, failed, data=data).properties(
        width=width,
        height=_clamp(len(keys) * 18, 40, 1600),
        title=title or "Memory weights",
    )


# ── response dependence ──────────────────────────────────────────


def response_dependence_chart(
    matrix: MemoryMatrix,
    ctx: ContextState | None = None,
    *,
    snippet: int = 60,
    width: int = 560,
    height: int = 220,
    title: str | None = None,
) -> alt.LayerChart:
    """How much each response depends on the memories, over the conversation index.

    Bars at each response's conversation index; the height is the column sum of the
    divergence over the memories that succeeded. Tooltips name the memory it leaned on
    most.

    Parameters
    ----------
    matrix
        The scored matrix.
    ctx
        Adds the response text to the tooltips.
    snippet
        Characters of response text in the tooltips.
    width, height
        Plot size in pixels.
    title
        Chart title.
    """
    alt = _alt()
    frame = response_frame(matrix, ctx, snippet=snippet)
    data = _data(frame)
    base = alt.Chart().encode(
        x=alt.X("entry_index:Q", title="conversation index",
                scale=alt.Scale(zero=False, nice=False, padding=8),
                axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("response_score:Q", title="dependence (sum of divergence)"),
    )
    tips = [
        alt.Tooltip("entry_index:Q", title="response (entry)"),
        alt.Tooltip("response_text:N", title="response text"),
        alt.Tooltip("response_score:Q", title="dependence", format=".4g"),
        alt.Tooltip("baseline:Q", title="baseline logprob", format=".4f"),
        alt.Tooltip("top_memory:N", title="leaned on most"),
        alt.Tooltip("top_divergence:Q", title="its divergence", format=".4g"),
    ]
    line = base.mark_line(opacity=0.5, strokeWidth=1)
    points = base.mark_circle(size=40, opacity=1).encode(tooltip=tips)
    rules = base.mark_rule(opacity=0.6).encode(y2=alt.datum(0))
    return alt.layer(rules, line, points, data=data).properties(
        width=width, height=height, title=title or "Dependence of each response on memories"
    )


# ── finetune histogram ───────────────────────────────────────────


def _divergences(obj: Any) -> np.ndarray:
    """Divergences from candidates, (entry, divergence) pairs, numbers, arrays or frames."""
    if isinstance(obj, pl.DataFrame):
        if "divergence" not in obj.columns:
            msg = f"finetune_histogram: the frame has no 'divergence' column ({obj.columns})"
            raise ScoringError(msg)
        obj = obj["divergence"]
    if isinstance(obj, pl.Series):
        return obj.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float64)
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float64).reshape(-1)
    out: list[float] = []
    for i, item in enumerate(obj):
        if isinstance(item, FinetuneCandidate):
            out.append(float(item.divergence))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(float(item[1]))
        elif isinstance(item, Mapping) and "divergence" in item:
            out.append(float(item["divergence"]))
        elif isinstance(item, int | float | np.floating | np.integer):
            out.append(float(item))
        else:
            msg = (
                f"finetune_histogram: item {i} is a {type(item).__name__}; expected a "
                "FinetuneCandidate, an (entry, divergence) pair or a number"
            )
            raise ScoringError(msg)
    return np.asarray(out, dtype=np.float64)


def _log_bins(pos: np.ndarray, threshold: float, per_decade: int, max_bins: int) -> pl.DataFrame:
    """Counts of ``pos`` (> 0) in log bins whose edges include ``threshold``."""
    k = np.floor(np.log10(pos / threshold) * per_decade + 1e-9).astype(np.int64)
    k_hi = int(k.max())
    k_lo = max(int(k.min()), k_hi - max_bins + 1)
    k = np.maximum(k, k_lo)
    counts = pl.DataFrame({"k": k}).group_by("k").len().sort("k")
    return counts.select(
        (threshold * 10.0 ** (pl.col("k") / per_decade)).alias("bin_start"),
        (threshold * 10.0 ** ((pl.col("k") + 1) / per_decade)).alias("bin_end"),
        pl.col("len").cast(pl.Int64).alias("count"),
    )


def finetune_histogram(
    scores_or_candidates: Iterable[FinetuneCandidate]
    | Iterable[tuple[int, float]]
    | Iterable[float]
    | np.ndarray
    | pl.Series
    | pl.DataFrame,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    log: bool = True,
    bins_per_decade: int = 4,
    bins: int = 30,
    width: int = 520,
    height: int = 220,
    title: str | None = None,
) -> alt.LayerChart:
    """Distribution of finetune divergences with a rule at ``threshold``.

    Binning happens in polars, so any number of scores makes a small chart. With ``log``
    (the default: thresholds are ~1e-7 while divergences reach whole nats) the x axis is
    logarithmic and bin edges are ``threshold * 10**(k / bins_per_decade)``, so the rule
    falls exactly on an edge and every bar is wholly above or below it; zeros cannot be
    drawn on a log axis and are counted in the subtitle instead. NaN scores are ignored.

    Parameters
    ----------
    scores_or_candidates
        :class:`~scoring_kit.scoring.FinetuneCandidate` s, ``(entry, divergence)`` pairs
        (as :func:`~scoring_kit.scoring.score_finetune` returns), plain numbers, an array,
        a series, or a frame with a ``divergence`` column.
    threshold
        The candidate threshold (must be > 0 with ``log``).
    log
        Logarithmic x axis; otherwise ``bins`` equal-width bins from 0.
    bins_per_decade
        Log bins per factor of ten.
    bins
        Linear bins.
    width, height
        Plot size in pixels.
    title
        Chart title.
    """
    alt = _alt()
    d = _divergences(scores_or_candidates)
    d = d[~np.isnan(d)]
    if log and not threshold > 0:
        msg = f"finetune_histogram: a log axis needs threshold > 0, got {threshold!r}"
        raise ScoringError(msg)
    above_n = int(np.sum(d >= threshold))
    sub = [f"{d.size} responses, {above_n} at or above the threshold {threshold:g}"]
    if log:
        pos = d[d > 0]
        zeros = int(d.size - pos.size)
        if zeros:
            sub.append(f"{zeros} with divergence ≤ 0 not shown (log axis)")
        counts = (
            _log_bins(pos, threshold, max(bins_per_decade, 1), 160)
            if pos.size
            else pl.DataFrame(
                schema={"bin_start": pl.Float64, "bin_end": pl.Float64, "count": pl.Int64}
            )
        )
    else:
        hi = float(max(d.max() if d.size else 0.0, threshold)) or 1.0
        n_bins = max(bins, 1)
        step = hi / n_bins
        idx = np.clip(np.floor(d / step), 0, n_bins - 1).astype(np.int64)
        counts = (
            pl.DataFrame({"k": idx}, schema={"k": pl.Int64})
            .group_by("k")
            .len()
            .sort("k")
            .select(
                (pl.col("k") * step).alias("bin_start"),
                ((pl.col("k") + 1) * step).alias("bin_end"),
                pl.col("len").cast(pl.Int64).alias("count"),
            )
        )
    counts = counts.with_columns(
        pl.when(pl.col("bin_start") >= threshold)
        .then(pl.lit("candidate (≥ threshold)"))
        .otherwise(pl.lit("below threshold"))
        .alias("side")
    )
    # The domain always holds the threshold, so its rule is drawn on the axis even when
    # every response is on one side of it.
    lo = min([threshold, *counts["bin_start"].to_list()])
    hi = max([threshold, *counts["bin_end"].to_list()])
    if log:
        step = 10.0 ** (1 / max(bins_per_decade, 1))
        x_scale = alt.Scale(type="log", domain=[lo / step, hi * step], nice=False)
    else:
        x_scale = alt.Scale(zero=True, domain=[0, hi])
    max_count = int(counts["count"].max() or 0) if counts.height else 0  # type: ignore[arg-type]
    bars = (
        alt.Chart(_data(counts))
        .mark_rect(stroke="white", strokeWidth=0.5)
        .encode(
            x=alt.X("bin_start:Q", title="divergence (nats)", scale=x_scale,
                    axis=alt.Axis(format=".0e" if log else ".3g")),
            x2="bin_end:Q",
            y=alt.Y("count:Q", title="responses",
                    scale=alt.Scale(domain=[0, max(max_count, 1)]),
                    axis=alt.Axis(tickMinStep=1, format="d",
                                  tickCount=min(max(max_count, 1), 10))),
            y2=alt.datum(0),
            color=alt.Color(
                "side:N",
                title=None,
                scale=alt.Scale(
                    domain=["below threshold", "candidate (≥ threshold)"],
                    range=["#9ecae1", _ACCENT],
                ),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=[
                alt.Tooltip("bin_start:Q", title="from", format=".3g"),
                alt.Tooltip("bin_end:Q", title="to", format=".3g"),
                alt.Tooltip("count:Q", title="responses"),
            ],
        )
    )
    thr = alt.Chart(_data(pl.DataFrame({"threshold": [float(threshold)]})))
    rule = thr.mark_rule(color="black", strokeDash=[4, 3]).encode(x="threshold:Q")
    label = thr.mark_text(align="left", dx=4, dy=-4, baseline="bottom", fontSize=10).encode(
        x="threshold:Q", y=alt.value(0), text=alt.value(f"threshold {threshold:g}")
    )
    return alt.layer(bars, rule, label).properties(
        width=width,
        height=height,
        title=alt.Title(title or "Finetune divergence", subtitle=sub),
    )


# ── memory-store history ─────────────────────────────────────────


def weight_history_chart(
    store_frame: pl.DataFrame,
    *,
    keys: Sequence[str] | None = None,
    top: int | None = 10,
    width: int = 560,
    height: int = 240,
    title: str | None = None,
) -> alt.LayerChart:
    """Memory weights over time, one line per memory (from ``MemoryStore.to_frame()``).

    Parameters
    ----------
    store_frame
        Columns ``key``, ``time`` (unix s) or ``scored_at`` (datetime), ``score``,
        ``weight``; one row per scoring of a memory.
    keys
        Memories to draw (default: the ``top`` ones by latest weight).
    top
        Without ``keys``: how many memories to draw, highest latest weight first
        (``None``: all).
    width, height
        Plot size in pixels.
    title
        Chart title.
    """
    alt = _alt()
    missing = [c for c in ("key", "weight") if c not in store_frame.columns]
    if "scored_at" not in store_frame.columns and "time" not in store_frame.columns:
        missing.append("time or scored_at")
    if missing:
        msg = (
            f"weight_history_chart: the frame lacks {', '.join(missing)}; "
            "pass MemoryStore.to_frame()"
        )
        raise ScoringError(msg)
    f = store_frame
    if "scored_at" not in f.columns:
        f = f.with_columns(pl.from_epoch("time", time_unit="s").alias("scored_at"))
    if "score" not in f.columns:
        f = f.with_columns(pl.lit(None, dtype=pl.Float64).alias("score"))
    f = f.select("key", "scored_at", "score", "weight").sort("key", "scored_at")
    if keys is not None:
        f = f.filter(pl.col("key").is_in(list(keys)))
        order = [k for k in keys if k in set(f["key"].to_list())]
    else:
        latest = (
            f.group_by("key").agg(pl.col("weight").last())
            .sort(["weight", "key"], descending=[True, False])
        )
        order = latest["key"].to_list()
        if top is not None:
            order = order[: max(top, 0)]
        f = f.filter(pl.col("key").is_in(order))
    data = _data(f)
    enc = {
        "x": alt.X("scored_at:T", title="scored at"),
        "y": alt.Y("weight:Q", title="weight", scale=alt.Scale(domain=[0, 1])),
        "color": alt.Color("key:N", title="memory", sort=order),
    }
    line = alt.Chart().mark_line().encode(**enc)
    pts = alt.Chart().mark_point(filled=True, size=30).encode(
        **enc,
        tooltip=[
            alt.Tooltip("key:N", title="memory"),
            alt.Tooltip("scored_at:T", title="scored at", format="%Y-%m-%d %H:%M:%S"),
            alt.Tooltip("score:Q", title="score", format=".4g"),
            alt.Tooltip("weight:Q", title="weight", format=".4g"),
        ],
    )
    return alt.layer(line, pts, data=data).properties(
        width=width, height=height, title=title or "Memory weight history"
    )
