"""Charts in Jupyter without a network, and a heatmap whose clicks drive Python.

Call :func:`enable_notebook` once (the notebooks do it in their first code cell). It
registers and enables the Altair renderer :data:`RENDERER`, which displays every chart as
self-contained HTML: the Vega, Vega-Lite and vega-embed JavaScript comes from vl-convert
(no CDN) and runs inside a function scope, so any number of charts share one page (Altair's
own ``template="inline"`` declares the bundle's names globally, and the second chart on a
page fails with ``Identifier '…' has already been declared``). The same output renders
live in JupyterLab, Notebook 7 and VS Code, in a saved notebook reopened later (Lab trusts
notebooks it saved), and in ``jupyter nbconvert --to html``.

:func:`heatmap_explorer` is the one view that needs the kernel: Altair's
:class:`altair.JupyterChart` widget (anywidget) with the JavaScript bundled offline
(``JupyterChart.enable_offline()``, again from vl-convert) and an ``ipywidgets.Output``
table beside it that an observer of ``chart.selections`` rewrites on every click.
"""

from __future__ import annotations

import functools
import html
import json
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from .._exceptions import MissingDependencyError
from ._altair import _alt
from .heatmap import heatmap

if TYPE_CHECKING:
    from ..context.model import ContextState
    from ..scoring.matrix import MemoryMatrix

__all__ = ["RENDERER", "HeatmapExplorer", "chart_html", "enable_notebook", "heatmap_explorer"]

#: Name of the Altair renderer that :func:`enable_notebook` enables.
RENDERER = "scoring_kit"


@functools.cache
def _bundle() -> str:
    """vega + vega-lite + vega-embed as one classic script (from vl-convert, no network)."""
    import vl_convert as vlc
    from altair.utils._importers import vl_version_for_vl_convert

    bundle: Any = vlc.javascript_bundle
    return str(bundle(vl_version=vl_version_for_vl_convert()))


def _script_json(obj: Any) -> str:
    """JSON safe inside ``<script>`` (``<``, ``>``, ``&`` escaped)."""
    text = json.dumps(obj, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def chart_html(spec: dict[str, Any], *, renderer: str = "svg") -> str:
    """A self-contained HTML fragment that draws the Vega-Lite ``spec`` offline.

    The bundle is evaluated inside a function (nothing but ``window.vegaEmbed``,
    ``window.vega`` and ``window.vegaLite`` leaks), and only when no earlier output on the
    page defined them, so many charts on one page work; each fragment still carries the
    bundle, so it renders alone (an output whose neighbours were cleared, an export).
    """
    div_id = f"sk-vis-{uuid.uuid4().hex}"
    opts = {"renderer": renderer, "actions": False, "mode": "vega-lite"}
    return (
        f'<div id="{div_id}" class="scoring-kit-chart"></div>\n'
        "<script>\n"
        "(function () {\n"
        "  if (typeof window.vegaEmbed === 'function') { return; }\n"
        f"{_bundle()}\n"
        "}());\n"
        "(function () {\n"
        f"  var el = document.getElementById({json.dumps(div_id)});\n"
        f"  window.vegaEmbed(el, {_script_json(spec)}, {json.dumps(opts)})\n"
        "    .catch(function (err) {\n"
        "      el.textContent = 'chart failed: ' + err;\n"
        "      console.error(err);\n"
        "    });\n"
        "}());\n"
        "</script>"
    )


def _render(spec: dict[str, Any], **metadata: Any) -> dict[str, str]:
    embed = metadata.get("embed_options") or {}
    return {
        "text/html": chart_html(spec, renderer=str(embed.get("renderer", "svg"))),
        "text/plain": "<scoring_kit chart: run the cell to draw it>",
    }


def enable_notebook(*, quiet: bool = True) -> None:
    """Draw every Altair chart offline from here on, and keep loading noise out of cells.

    Registers and enables the Altair renderer :data:`RENDERER` (see the module docstring;
    ``alt.renderers.enable("default")`` goes back to Altair's). With ``quiet`` the
    transformers / huggingface_hub progress bars and info logs are switched off (the kit's
    own warnings, for example :class:`~scoring_kit.CostWarning`, are untouched).
    Calling it again is harmless.
    """
    alt = _alt()
    if RENDERER not in alt.renderers.names():
        alt.renderers.register(RENDERER, _render)
    alt.renderers.enable(RENDERER)
    if quiet:
        _quiet_libraries()


def _quiet_libraries() -> None:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the engine extra is optional
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover
        return
    disable_progress_bars()


# ── the heatmap explorer (needs the kernel) ──────────────────────


def _selected(selection: Any, field: str) -> list[Any]:
    """Values of ``field`` in an Altair ``PointSelection`` (``[]`` when nothing is)."""
    value = getattr(selection, "value", None) or []
    return [v[field] for v in value if isinstance(v, dict) and field in v]


class HeatmapExplorer:
    """The interactive heatmap as a widget, with a table that follows the selection.

    Click a response column: the table beside the chart lists the memories that response
    leaned on (divergence, key, full text) under the response's text, and the clicked
    memory is marked. ``explorer.chart.selections.response`` and ``.memory`` are Altair
    ``PointSelection`` s readable from Python; :attr:`selected_entries` and
    :attr:`selected_memories` give their values. Displaying the explorer shows both.

    Attributes
    ----------
    chart
        The :class:`altair.JupyterChart` (offline JavaScript).
    table
        The ``ipywidgets.Output`` that the observer rewrites.
    widget
        ``ipywidgets.HBox(chart, table)``: what the notebook displays.
    """

    def __init__(
        self, matrix: MemoryMatrix, ctx: ContextState | None = None, **heatmap_kwargs: Any
    ) -> None:
        try:
            import ipywidgets as widgets
        except ImportError as exc:
            msg = (
                "heatmap_explorer needs ipywidgets and anywidget: "
                "pip install 'scoring_kit[notebooks]'"
            )
            raise MissingDependencyError(msg) from exc
        alt = _alt()
        alt.JupyterChart.enable_offline()
        self.matrix = matrix
        self.ctx = ctx
        self._heatmap_kwargs = dict(heatmap_kwargs)
        spec = heatmap(matrix, ctx, interactive=True, **heatmap_kwargs)
        self.chart = alt.JupyterChart(spec, embed_options={"renderer": "svg", "actions": False})
        self.table = widgets.Output(layout=widgets.Layout(min_width="320px", max_width="560px",
                                                          padding="0 0 0 12px"))
        self.widget = widgets.HBox([self.chart, self.table])
        self.chart.selections.observe(self._on_select, names=["response", "memory"])
        self._show()

    @property
    def selected_entries(self) -> list[int]:
        """Conversation indexes of the selected response column(s)."""
        return [int(v) for v in _selected(getattr(self.chart.selections, "response", None),
                                          "entry_index")]

    @property
    def selected_memories(self) -> list[str]:
        """Keys of the clicked memory row(s)."""
        return [str(v) for v in _selected(getattr(self.chart.selections, "memory", None),
                                          "memory_key")]

    def _on_select(self, _change: Any) -> None:
        self._show()

    def table_html(self) -> str:
        """The linked table for the current selection, as HTML."""
        return _leaned_on_html(self.matrix, self.selected_entries, self.selected_memories,
                               self.ctx)

    def _show(self) -> None:
        from IPython.display import HTML

        self.table.clear_output(wait=True)
        with self.table:
            from IPython.display import display

            display(HTML(self.table_html()))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The widget, plus a static fallback (the chart and the table as HTML) for
        viewers without the widget's state, such as ``nbconvert --to html``."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        static = heatmap(self.matrix, self.ctx, interactive=True, **self._heatmap_kwargs)
        bundle["text/html"] = (
            "<div style='display:flex;gap:12px;align-items:flex-start'><div>"
            f"{chart_html(static.to_dict())}</div><div>{self.table_html()}</div></div>"
        )
        return bundle


def heatmap_explorer(
    matrix: MemoryMatrix, ctx: ContextState | None = None, **heatmap_kwargs: Any
) -> HeatmapExplorer:
    """:class:`HeatmapExplorer` of ``matrix`` (keyword arguments go to :func:`heatmap`)."""
    return HeatmapExplorer(matrix, ctx, **heatmap_kwargs)


def _texts(matrix: MemoryMatrix, ctx: ContextState | None) -> tuple[list[str], list[str]]:
    from .frames import matrix_texts

    return matrix_texts(matrix, ctx)


def _leaned_on_html(
    matrix: MemoryMatrix,
    entries: list[int],
    memories: list[str],
    ctx: ContextState | None,
) -> str:
    mem_texts, resp_texts = _texts(matrix, ctx)
    esc = html.escape
    # inline styles: Lab's own table rules (right-aligned cells) come later in the page
    cell = "style='text-align:left;vertical-align:top;padding:2px 6px;white-space:normal'"
    style = ""
    if not entries:
        return (f"{style}<div class='sk-leaned'><b>No response selected.</b> "
                "Click a column of the heatmap to list the memories that response leaned on."
                "</div>")
    parts = [style, "<div class='sk-leaned'>"]
    div = matrix.divergence
    for entry in entries:
        hits = np.flatnonzero(matrix.entries == entry)
        if hits.size == 0:
            parts.append(f"<p>Response {entry} is not in this matrix.</p>")
            continue
        j = int(hits[0])
        parts.append(f"<p><b>Response {entry}</b>: {esc(resp_texts[j])}</p>")
        col = div[:, j]
        order = [int(i) for i in np.argsort(-np.nan_to_num(col, nan=-1.0), kind="stable")
                 if np.isfinite(col[i]) and col[i] > 0]
        if not order:
            parts.append("<p><i>This response leaned on no memory: removing any one of them "
                         "did not lower its log-probability.</i></p>")
            continue
        rows = "".join(
            "<tr" + (" style='background:#fdebd0'" if matrix.keys[i] in memories else "") + ">"
            f"<td {cell}>{col[i]:.4g}</td><td {cell}>{esc(matrix.keys[i])}</td>"
            f"<td {cell}>{esc(mem_texts[i])}</td></tr>"
            for i in order
        )
        parts.append(
            f"<table><thead><tr><th {cell}>divergence</th><th {cell}>memory</th>"
            f"<th {cell}>memory text</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    parts.append("</div>")
    return "".join(parts)
