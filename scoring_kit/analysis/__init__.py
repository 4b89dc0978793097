"""Analysis: results as polars frames, Altair charts, and exports.

Importing this package does not import Altair: the chart builders import it when first
called (and then register the house theme, see :mod:`scoring_kit.analysis.charts`).
"""

from __future__ import annotations

from .charts import (
    THEME_NAME,
    finetune_histogram,
    heatmap,
    memory_weights_chart,
    response_dependence_chart,
    weight_history_chart,
)
from .export import (
    CANDIDATE_SCHEMA,
    CHART_FORMATS,
    MATRIX_FORMATS,
    chat_messages,
    export_candidates,
    export_matrix,
    parse_prior_context,
    read_candidates,
    read_chat,
    read_matrix_frame,
    save_chart,
    validate_chat_record,
)
from .frames import (
    CANDIDATE_FRAME_COLUMNS,
    HEATMAP_COLUMNS,
    MATRIX_FRAME_COLUMNS,
    HeatmapReduction,
    Table,
    candidates_frame,
    heatmap_reduction,
    matrix_frame,
    matrix_texts,
    response_frame,
    snippet_text,
    table,
    top_memories,
    top_memories_per_response,
)
from .notebook import RENDERER, HeatmapExplorer, chart_html, enable_notebook, heatmap_explorer

__all__ = [
    "CANDIDATE_FRAME_COLUMNS",
    "CANDIDATE_SCHEMA",
    "CHART_FORMATS",
    "HEATMAP_COLUMNS",
    "MATRIX_FORMATS",
    "MATRIX_FRAME_COLUMNS",
    "RENDERER",
    "THEME_NAME",
    "HeatmapExplorer",
    "HeatmapReduction",
    "Table",
    "candidates_frame",
    "chart_html",
    "chat_messages",
    "enable_notebook",
    "export_candidates",
    "export_matrix",
    "finetune_histogram",
    "heatmap",
    "heatmap_explorer",
    "heatmap_reduction",
    "matrix_frame",
    "matrix_texts",
    "memory_weights_chart",
    "parse_prior_context",
    "read_candidates",
    "read_chat",
    "read_matrix_frame",
    "response_dependence_chart",
    "response_frame",
    "save_chart",
    "snippet_text",
    "table",
    "top_memories",
    "top_memories_per_response",
    "validate_chat_record",
    "weight_history_chart",
]


def __dir__() -> list[str]:
    return sorted(__all__)
