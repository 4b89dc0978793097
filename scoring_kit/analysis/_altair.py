"""The house style of the kit's Altair charts, and the helpers every chart builder shares.

:func:`_alt` imports Altair (or says which extra installs it) and, on its first call,
registers the house theme :data:`THEME_NAME` with ``alt.theme.register``, enabling it **only**
when the active theme is still Altair's ``"default"``. :func:`_data` embeds a polars frame
inline (NaN → null, datetimes → epoch ms), so charts save and render without Altair's row
limit and without a running kernel.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from .._exceptions import MissingDependencyError

__all__ = ["THEME_NAME"]

#: Name of the house theme registered on the first chart call.
THEME_NAME = "scoring_kit"

_FAILED_COLOR = "#b8b8b8"
_ACCENT = "#d6604d"
_FONT = "Inter, 'Helvetica Neue', Helvetica, Arial, sans-serif"

_theme_registered = False


def _theme() -> Any:
    """The house theme (an ``alt.theme.ThemeConfig``)."""
    return {
        "config": {
            "font": _FONT,
            "view": {"stroke": None, "continuousWidth": 400, "continuousHeight": 240},
            "title": {"fontSize": 14, "anchor": "start", "subtitleColor": "#555",
                      "subtitleFontSize": 11},
            "axis": {"labelFontSize": 11, "titleFontSize": 12, "titleFontWeight": "normal",
                     "gridColor": "#ececec", "domainColor": "#888", "tickColor": "#888"},
            "legend": {"labelFontSize": 11, "titleFontSize": 11},
            "range": {"category": {"scheme": "tableau10"}},
            "bar": {"color": "#4c78a8"},
            "line": {"color": "#4c78a8"},
        }
    }


def _alt() -> Any:
    """Import Altair (or say which extra installs it) and register the house theme once."""
    global _theme_registered
    try:
        import altair as alt
    except ImportError as exc:  # pragma: no cover - altair is a core dependency
        msg = "charts need altair: pip install 'scoring_kit' (altair>=5.4, vl-convert-python)"
        raise MissingDependencyError(msg) from exc
    if not _theme_registered:
        enable = alt.theme.active == "default"
        alt.theme.register(THEME_NAME, enable=enable)(_theme)
        _theme_registered = True
    return alt


def _values(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: NaN/inf → null, datetimes → epoch milliseconds."""
    exprs = []
    for name, dtype in frame.schema.items():
        if dtype.is_float():
            exprs.append(
                pl.when(pl.col(name).is_finite()).then(pl.col(name)).otherwise(None).alias(name)
            )
        elif isinstance(dtype, pl.Datetime):
            exprs.append(pl.col(name).dt.epoch("ms").alias(name))
        elif isinstance(dtype, pl.Date):
            exprs.append(pl.col(name).cast(pl.Datetime("ms")).dt.epoch("ms").alias(name))
    return (frame.with_columns(exprs) if exprs else frame).to_dicts()


def _data(frame: pl.DataFrame) -> dict[str, Any]:
    """Inline data as a plain dict: Altair neither validates nor row-limits it, and
    consolidates it into the spec's top-level ``datasets`` (one copy per distinct frame)."""
    return {"values": _values(frame)}


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))
