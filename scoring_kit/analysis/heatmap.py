"""The heatmap chart: memories × responses, colour = divergence, optionally linked to bars.

Built as one layered Vega-Lite spec from the frames of :mod:`scoring_kit.analysis.frames`
(reduced for large matrices); the house theme and inline data come from
:mod:`scoring_kit.analysis._altair`. :mod:`scoring_kit.analysis.charts` re-exports
:func:`heatmap` beside the other chart builders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import polars as pl

from ._altair import _ACCENT, _FAILED_COLOR, _alt, _clamp, _data
from .frames import matrix_frame
from .reduction import heatmap_reduction

if TYPE_CHECKING:
    import altair as alt

    from ..context.model import ContextState
    from ..scoring.matrix import MemoryMatrix

__all__ = ["heatmap"]


def heatmap(
    matrix: MemoryMatrix,
    ctx: ContextState | None = None,
    *,
    interactive: bool = False,
    max_memories: int = 60,
    max_responses: int = 200,
    max_marks: int = 5000,
    snippet: int = 60,
    color_scale: Literal["linear", "sqrt", "symlog", "log"] = "sqrt",
    bar_top: int = 20,
    width: int | None = None,
    height: int | None = None,
    title: str | None = None,
) -> alt.LayerChart | alt.VConcatChart:
    """Memories (rows, heaviest on top) × responses (columns), colour = divergence.

    Failed memories are drawn grey with a ``failed: <error>`` tooltip. Large matrices are
    reduced with :func:`~scoring_kit.analysis.reduction.heatmap_reduction` (heaviest
    ``max_memories`` kept, responses binned to at most ``max_marks`` cells, max per bin);
    the subtitle then says what was dropped.

    Parameters
    ----------
    matrix
        The scored matrix, ``(n_memories, n_responses)``.
    ctx
        The context it was scored on: adds memory and response text to the tooltips.
    interactive
        Also draw a bar chart of the memories the selected response leaned on: click a
        column (shift-click adds more, double-click clears) and the bars show each memory's
        max divergence over the selection. The initial selection is the response that
        depends on memories most. Returns the two charts stacked.
    max_memories, max_responses, max_marks
        Reduction limits (see :func:`~scoring_kit.analysis.reduction.heatmap_reduction`).
    snippet
        Characters of text in the tooltips.
    color_scale
        Vega-Lite scale type of the colour (``"sqrt"`` keeps small divergences visible).
    bar_top
        With ``interactive``: most memories in the linked bar chart (largest first).
    width, height
        Plot size in pixels (default: from the number of columns and rows).
    title
        Chart title.

    Returns
    -------
    alt.LayerChart | alt.VConcatChart
        The heatmap (a layer of the scored and the failed cells), or with ``interactive``
        the heatmap above the linked bar chart (the selection parameter is ``"response"``
        on ``entry_index``).

    Examples
    --------
    >>> heatmap(matrix, ctx, interactive=True).save("heatmap.html")  # doctest: +SKIP
    """
    alt = _alt()
    red = heatmap_reduction(
        matrix_frame(matrix, ctx, snippet=snippet),
        max_memories=max_memories,
        max_responses=max_responses,
        max_marks=max_marks,
    )
    frame = red.frame
    keys = (
        frame.select("memory_key", "memory_rank").unique().sort("memory_rank")["memory_key"]
        .to_list()
    )
    binned = red.responses_per_bin > 1
    # Cells big enough to read and click: up to 34 × 26 px on small matrices, shrinking to
    # fit ~1100 × 900 px; past that (≥ 200 columns) the output scrolls sideways.
    step_x = _clamp(1100 // max(red.response_bins, 1), 6, 34)
    step_y = _clamp(900 // max(len(keys), 1), 12, 26)
    w = width if width is not None else max(red.response_bins * step_x, 120)
    h = height if height is not None else max(len(keys) * step_y, 40)
    subtitle = [s for s in (red.summary(), "grey: ablation failed" if
                            frame.filter(pl.col("status") == "failed").height else "") if s]
    x_title = "response (first conversation index of bin)" if binned else (
        "response (conversation index)")
    data = _data(frame)
    x = alt.X("entry_index:O", title=x_title,
              axis=alt.Axis(labelOverlap=True, labelAngle=0, labelFontSize=12))
    y = alt.Y("memory_key:N", sort=keys, title="memory (heaviest first)",
              axis=alt.Axis(labelFontSize=12, labelLimit=220))
    base = alt.Chart().encode(x=x, y=y)
    tips = [
        alt.Tooltip("memory_key:N", title="memory"),
        alt.Tooltip("memory_text:N", title="memory text"),
        alt.Tooltip("entry_index:O", title="response (entry)"),
        alt.Tooltip("response_text:N", title="response text"),
        alt.Tooltip("baseline:Q", title="baseline logprob", format=".4f"),
        alt.Tooltip("divergence:Q", title="divergence", format=".4g"),
    ]
    if binned:
        tips[2:2] = [
            alt.Tooltip("entry_last:O", title="bin ends at entry"),
            alt.Tooltip("n_responses:Q", title="responses in bin"),
            alt.Tooltip("peak_entry:O", title="peak at entry"),
        ]
    cells = (
        base.mark_rect()
        .transform_filter("datum.status === 'ok'")
        .encode(
            color=alt.Color(
                "divergence:Q",
                title="divergence",
                scale=alt.Scale(type=color_scale, scheme="yellowgreenblue",
                                zero=color_scale != "log"),
            ),
            tooltip=tips,
        )
    )
    failed = (
        base.mark_rect(color=_FAILED_COLOR)
        .transform_filter("datum.status === 'failed'")
        .encode(
            tooltip=[
                alt.Tooltip("memory_key:N", title="memory"),
                alt.Tooltip("memory_text:N", title="memory text"),
                alt.Tooltip("entry_index:O", title="response (entry)"),
                alt.Tooltip("failure:N", title="status"),
            ]
        )
    )
    chart_title = alt.Title(title or "Which memories each response depends on",
                            subtitle=subtitle or alt.Undefined)
    if not interactive:
        return alt.layer(cells, failed, data=data).properties(
            width=w, height=h, title=chart_title
        )

    sel = alt.selection_point(
        name="response", fields=["entry_index"], on="click", clear="dblclick"
    )
    mem_sel = alt.selection_point(
        name="memory", fields=["memory_key"], on="click", clear="dblclick"
    )
    # Full opacity until a column is selected (an empty selection counts as all).
    cells = cells.add_params(sel, mem_sel).encode(
        opacity=alt.when(sel).then(alt.value(1.0)).otherwise(alt.value(0.35))
    )
    top = alt.layer(cells, failed, data=data).properties(width=w, height=h, title=chart_title)
    ok = frame.filter(pl.col("status") == "ok")["divergence"].drop_nulls()
    x_max = float(ok.max()) if ok.len() and float(ok.max()) > 0 else 1.0  # type: ignore[arg-type]
    n_bar = min(len(keys), max(bar_top, 1))
    bar_h = max(n_bar * 20, 60)
    leaned = (
        alt.Chart()
        .transform_filter(sel)
        .transform_filter("datum.status === 'ok' && datum.divergence > 0")
        .transform_aggregate(
            divergence="max(divergence)",
            memory_text="min(memory_text)",
            groupby=["memory_key"],
        )
        .transform_window(
            bar_rank="row_number()", sort=[alt.SortField("divergence", order="descending")]
        )
        .transform_filter(f"datum.bar_rank <= {max(bar_top, 1)}")
        .mark_bar(color=_ACCENT, size=14)
        .encode(
            # a fixed domain and no stack: an empty selection draws no "Infinite extent"
            x=alt.X("divergence:Q", title="max divergence over the selected response(s)",
                    stack=None, scale=alt.Scale(domain=[0, x_max])),
            y=alt.Y("memory_key:N", sort="-x", title="memory",
                    axis=alt.Axis(labelFontSize=12, labelLimit=220)),
            tooltip=[
                alt.Tooltip("memory_key:N", title="memory"),
                alt.Tooltip("memory_text:N", title="memory text"),
                alt.Tooltip("divergence:Q", title="divergence", format=".4g"),
            ],
        )
    )
    # One row per selected column set: how many of its cells are above 0. Zero → say so.
    nothing = (
        alt.Chart()
        .transform_filter(sel)
        .transform_calculate(hit="datum.status === 'ok' && datum.divergence > 0 ? 1 : 0")
        .transform_aggregate(hits="sum(hit)")
        .transform_filter("datum.hits === 0")
        .mark_text(align="left", baseline="middle", fontSize=13, color="#555",
                   fontStyle="italic")
        .encode(
            x=alt.value(4),
            y=alt.value(bar_h / 2),
            text=alt.value("The selected response leaned on no memory "
                           "(removing any one did not lower its log-probability)."),
        )
    )
    bars = alt.layer(leaned, nothing, data=data).properties(
        width=max(w, 420),
        height=bar_h,
        title=alt.Title(
            f"Memories the selected response leaned on (top {max(bar_top, 1)})",
            subtitle="click a column (shift-click adds, double-click clears); "
                     "nothing selected: max over all responses",
        ),
    )
    return alt.vconcat(top, bars)
