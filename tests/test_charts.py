"""Frames and charts: data content, reduction budget, PNG/SVG rendering through vl-convert."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from scoring_kit._exceptions import ExportError, ScoringError
from scoring_kit.analysis import (
    HEATMAP_COLUMNS,
    MATRIX_FRAME_COLUMNS,
    candidates_frame,
    finetune_histogram,
    heatmap,
    heatmap_reduction,
    matrix_frame,
    memory_weights_chart,
    response_dependence_chart,
    save_chart,
    top_memories,
    top_memories_per_response,
    weight_history_chart,
)
from scoring_kit.context.model import ContextState, Node
from scoring_kit.scoring import FinetuneCandidate, MemoryMatrix

ERR = "score API HTTP 503: overloaded"


def _mem(key: str, text: str, ids: tuple[int, ...]) -> Node:
    return Node("memory", ids, text=text, key=key, role="system")


def _reply(text: str, ids: tuple[int, ...], ts: int) -> Node:
    return Node(
        "assistant", (1, *ids, 2), children=(Node("text", ids, text=text),), timestamp_ns=ts
    )


@pytest.fixture
def ctx() -> ContextState:
    conv = (
        _mem("cats", "Alice has two cats,\n  Mia and Leo.", (10, 11)),
        _mem("oslo", "Carol lives in Oslo.", (12, 13)),
        Node("user", (1, 20, 2), text="What are Alice's cats called?"),
        _reply("Mia and Leo.", (21, 22), 1_700_000_000_000_000_000),
        _mem("age", "Bob turned 40 in May.", (14, 15)),
        Node("user", (1, 23, 2), text="Where does Carol live?"),
        _reply("In Oslo, " + "really " * 20 + "nice.", (24,), 1_700_000_001_000_000_000),
        Node("user", (1, 25, 2), text="And Bob?"),
        _reply("He is 40.", (26, 27), 1_700_000_002_000_000_000),
    )
    return ContextState(
        system=(Node("system", (1, 5, 2), text="You are helpful."),),
        identity=(_mem("self", "I am the assistant.", (6, 7)),),
        conversation=conv,
    )


@pytest.fixture
def matrix() -> MemoryMatrix:
    """4 memories × 3 responses (entries 3, 6, 8); ``age`` failed (NaN row + error)."""
    baseline = np.array([-2.0, -5.0, -3.0])
    without = np.array(
        [
            [-2.1, -5.0, -3.0],  # self: 0.1
            [-4.0, -5.5, -3.0],  # cats: 2.0 + 0.5 (heaviest)
            [-2.0, -7.0, -2.5],  # oslo: 2.0 (and a negative delta → 0)
            [np.nan, np.nan, np.nan],  # age: failed
        ]
    )
    return MemoryMatrix(
        keys=["self", "cats", "oslo", "age"],
        entries=np.array([3, 6, 8]),
        baseline=baseline,
        without=without,
        errors=[None, None, None, ERR],
    )


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _svg_size(text: str) -> tuple[float, float]:
    m = re.search(r'<svg[^>]*\swidth="([\d.]+)"[^>]*\sheight="([\d.]+)"', text)
    assert m, text[:200]
    return float(m.group(1)), float(m.group(2))


def _datasets(chart: Any) -> list[list[dict[str, Any]]]:
    return list(chart.to_dict()["datasets"].values())


def _render(chart: Any, tmp_path: Path, name: str) -> tuple[tuple[int, int], tuple[float, float]]:
    """Render to SVG at scale 1 and PNG at scale 2; return both sizes."""
    png = save_chart(chart, tmp_path / f"{name}.png", scale=2.0)
    svg = save_chart(chart, tmp_path / f"{name}.svg")
    data = png.read_bytes()
    assert len(data) > 1000
    return _png_size(data), _svg_size(svg.read_text())


def _assert_scaled(png: tuple[int, int], svg: tuple[float, float], min_w: int, min_h: int) -> None:
    assert abs(png[0] - 2 * svg[0]) <= 2 and abs(png[1] - 2 * svg[1]) <= 2, (png, svg)
    # the plot area alone is min_w × min_h; axes, titles and legends only add to it
    assert svg[0] >= min_w and svg[1] >= min_h, (svg, min_w, min_h)


# ── frames ───────────────────────────────────────────────────────


def test_matrix_frame_ranks_texts_and_failures(matrix: MemoryMatrix, ctx: ContextState) -> None:
    f = matrix_frame(matrix, ctx, snippet=20)
    assert f.columns == list(MATRIX_FRAME_COLUMNS)
    assert f.height == 12
    ranks = dict(f.select("memory_key", "memory_rank").unique().iter_rows())
    assert ranks == {"cats": 0, "oslo": 1, "self": 2, "age": 3}
    assert f["response_rank"].to_list() == [0, 1, 2] * 4
    age = f.filter(pl.col("memory_key") == "age")
    assert age["status"].to_list() == ["failed"] * 3
    assert age["error"].to_list() == [ERR] * 3
    assert age["divergence"].is_nan().all()
    assert (f.filter(pl.col("memory_key") != "age")["status"] == "ok").all()
    cats = f.filter(pl.col("memory_key") == "cats")
    assert cats["memory_text"][0] == "Alice has two cats,…"  # one line, cut to 20
    assert cats["response_text"].to_list()[0] == "Mia and Leo."
    assert len(cats["response_text"][1]) == 20 and cats["response_text"][1].endswith("…")
    np.testing.assert_allclose(cats["divergence"].to_numpy(), [2.0, 0.5, 0.0])
    np.testing.assert_allclose(cats["memory_weight"].to_numpy(), [2.5] * 3)
    # without a context the snippets are empty, the numbers identical
    bare = matrix_frame(matrix)
    assert (bare["memory_text"] == "").all() and (bare["response_text"] == "").all()
    assert bare.drop("memory_text", "response_text").equals(
        f.drop("memory_text", "response_text"), null_equal=True
    )


def test_top_memories_and_per_response(matrix: MemoryMatrix, ctx: ContextState) -> None:
    top = top_memories(matrix, 2, ctx=ctx)
    assert top.select("memory_key", "weight", "peak_entry").rows() == [
        ("cats", 2.5, 3),
        ("oslo", 2.0, 6),
    ]
    assert top_memories(matrix, None)["memory_key"].to_list() == ["cats", "oslo", "self"]
    per = top_memories_per_response(matrix, 2)
    assert per.select("entry_index", "rank", "memory_key").rows() == [
        (3, 0, "cats"),
        (3, 1, "self"),
        (6, 0, "oslo"),
        (6, 1, "cats"),
    ]
    np.testing.assert_allclose(per["share"].to_numpy()[:2], [2.0 / 2.1, 0.1 / 2.1])
    # response 8 leaned on nothing: no rows
    assert 8 not in per["entry_index"].to_list()


def test_candidates_frame() -> None:
    cands = [
        FinetuneCandidate(5, 0.25, "resp", "user: q", (1, 2, 3), (4, 5), 123, None, "boom"),
        FinetuneCandidate(9, 1e-6, "r2", "", (), (7,), 456, "alt", None),
    ]
    f = candidates_frame(cands)
    assert f.rows() == [
        (5, 0.25, 123, "resp", "user: q", None, "boom", 3, 2),
        (9, 1e-6, 456, "r2", "", "alt", None, 0, 1),
    ]
    assert candidates_frame([]).height == 0


def test_heatmap_reduction_budget_on_200x500() -> None:
    rng = np.random.default_rng(7)
    n, m = 200, 500
    without = -(rng.random((n, m)) ** 3)
    without[17] = np.nan  # one failed memory
    errors: list[str | None] = [None] * n
    errors[17] = "timeout"
    big = MemoryMatrix([f"m{i:03d}" for i in range(n)], np.arange(m) * 2, np.zeros(m),
                       without, errors)
    frame = matrix_frame(big)
    red = heatmap_reduction(frame)
    out = red.frame
    assert out.columns == list(HEATMAP_COLUMNS)
    assert out.height == red.marks <= 5000
    assert red.memories_total == 200 and red.memories_kept == 60
    assert red.responses_total == 500 and red.response_bins * 60 == out.height
    # the kept memories are exactly the 60 heaviest; the failed one is among the dropped
    weights = big.memory_weights
    heaviest = {big.keys[i] for i in np.argsort(-np.nan_to_num(weights, nan=-1.0))[:60]}
    assert set(out["memory_key"].unique().to_list()) == heaviest
    assert "m017" in red.dropped_memories and len(red.dropped_memories) == 140
    ranks = out.select("memory_key", "memory_rank").unique().sort("memory_rank")
    assert ranks["memory_rank"].to_list() == list(range(60))
    assert weights[big.keys.index(ranks["memory_key"][0])] == np.nanmax(weights)
    # each cell is the max divergence over its bin, and the bins cover every response
    cell = out.row(5, named=True)
    i = big.keys.index(cell["memory_key"])
    cols = (np.arange(m) * 2 >= cell["entry_index"]) & (np.arange(m) * 2 <= cell["entry_last"])
    assert cols.sum() == cell["n_responses"]
    assert cell["divergence"] == pytest.approx(big.divergence[i, cols].max())
    assert big.divergence[i, big.entries.tolist().index(cell["peak_entry"])] == pytest.approx(
        cell["divergence"]
    )
    first = out.filter(pl.col("memory_rank") == 0)
    assert first["n_responses"].sum() == 500
    assert "140 lighter dropped" in red.summary() and "500 responses" in red.summary()
    # a tighter budget is honoured
    assert heatmap_reduction(frame, max_memories=10, max_responses=50).frame.height == 500
    assert heatmap_reduction(frame, max_marks=600).frame.height <= 600
    # the heatmap built from it stays under Altair's 5000-row limit and keeps the budget
    (rows,) = _datasets(heatmap(big))
    assert len(rows) <= 5000


def test_reduce_keeps_small_matrix_whole(matrix: MemoryMatrix) -> None:
    red = heatmap_reduction(matrix_frame(matrix))
    assert not red.reduced and red.summary() == ""
    assert red.frame.height == 12
    failed = red.frame.filter(pl.col("status") == "failed")
    assert failed.height == 3
    assert failed["divergence"].is_null().all()
    assert failed["failure"].to_list() == [f"failed: {ERR}"] * 3
    with pytest.raises(ScoringError, match="memory_rank"):
        heatmap_reduction(matrix.to_frame())


# ── charts ───────────────────────────────────────────────────────


def test_heatmap_data_tooltips_and_png(
    matrix: MemoryMatrix, ctx: ContextState, tmp_path: Path
) -> None:
    chart = heatmap(matrix, ctx, width=300, height=120)
    spec = chart.to_dict()
    (rows,) = spec["datasets"].values()
    assert len(rows) == 12
    by = {(r["memory_key"], r["entry_index"]): r for r in rows}
    assert by[("cats", 3)]["divergence"] == pytest.approx(2.0)
    assert by[("cats", 3)]["memory_text"].startswith("Alice has two cats")
    assert by[("cats", 3)]["response_text"] == "Mia and Leo."
    assert by[("cats", 3)]["baseline"] == -2.0
    assert by[("age", 6)]["divergence"] is None
    assert by[("age", 6)]["failure"] == f"failed: {ERR}"
    ok_layer, failed_layer = spec["layer"]
    tips = {t["field"] for t in ok_layer["encoding"]["tooltip"]}
    assert {"memory_key", "memory_text", "entry_index", "response_text", "baseline",
            "divergence"} <= tips
    assert "failure" in {t["field"] for t in failed_layer["encoding"]["tooltip"]}
    assert failed_layer["mark"]["color"] and "color" not in failed_layer["encoding"]
    assert ok_layer["encoding"]["y"]["sort"] == ["cats", "oslo", "self", "age"]
    assert "grey: ablation failed" in spec["title"]["subtitle"]
    png, svg = _render(chart, tmp_path, "heatmap")
    _assert_scaled(png, svg, 300, 120)


def test_interactive_heatmap_links_a_bar_chart(matrix: MemoryMatrix, ctx: ContextState) -> None:
    spec = heatmap(matrix, ctx, interactive=True).to_dict()
    top, bars = spec["vconcat"]
    # Altair lifts a view's selection to the top level and names the view it belongs to
    sels = {p["name"]: p for p in spec["params"]}
    assert set(sels) == {"response", "memory"}
    sel = sels["response"]
    assert sel["views"] == [top["layer"][0]["name"]]
    assert sel["select"]["type"] == "point" and sel["select"]["fields"] == ["entry_index"]
    assert sels["memory"]["select"]["fields"] == ["memory_key"]
    # nothing selected at first: every cell at full opacity
    assert "value" not in sel
    (cond,) = top["layer"][0]["encoding"]["opacity"]["condition"]
    assert cond["value"] == 1.0 and cond.get("empty", True) is True
    leaned, nothing = bars["layer"]
    assert {"filter": {"param": "response"}} in leaned["transform"]
    assert leaned["mark"]["type"] == "bar"
    # a fixed x domain and no stack: an empty selection cannot give an infinite extent
    assert leaned["encoding"]["x"]["scale"]["domain"] == [0, 2.0]
    assert leaned["encoding"]["x"]["stack"] is None
    # a response that leaned on nothing is said so in words
    assert nothing["mark"]["type"] == "text"
    assert {"filter": "datum.hits === 0"} in nothing["transform"]
    assert "leaned on no memory" in nothing["encoding"]["text"]["value"]


def test_charts_are_new_objects_and_pure(matrix: MemoryMatrix, ctx: ContextState) -> None:
    before = matrix.without.copy()
    a, b = heatmap(matrix, ctx), heatmap(matrix, ctx)
    assert a is not b and a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(matrix.without, before)
    c = memory_weights_chart(matrix)
    c2 = c.properties(title="changed")
    assert c.to_dict()["title"] == "Memory weights" and c2 is not c


def test_memory_weights_chart(matrix: MemoryMatrix, ctx: ContextState, tmp_path: Path) -> None:
    chart = memory_weights_chart(matrix, ctx, width=250)
    (rows,) = _datasets(chart)
    assert [r["memory_key"] for r in rows] == ["cats", "oslo", "self", "age"]
    assert [r["weight"] for r in rows[:3]] == pytest.approx([2.5, 2.0, 0.1])
    assert rows[3]["weight"] is None and rows[3]["failure"] == f"failed: {ERR}"
    png, svg = _render(chart, tmp_path, "weights")
    _assert_scaled(png, svg, 250, 4 * 18)
    assert len(_datasets(memory_weights_chart(matrix, top=2))[0]) == 2


def test_response_dependence_chart(
    matrix: MemoryMatrix, ctx: ContextState, tmp_path: Path
) -> None:
    chart = response_dependence_chart(matrix, ctx, width=300, height=150)
    (rows,) = _datasets(chart)
    assert [r["entry_index"] for r in rows] == [3, 6, 8]
    assert [r["response_score"] for r in rows] == pytest.approx([2.1, 2.5, 0.0])
    assert [r["top_memory"] for r in rows] == ["cats", "oslo", None]
    assert rows[0]["response_text"] == "Mia and Leo."
    png, svg = _render(chart, tmp_path, "dependence")
    _assert_scaled(png, svg, 300, 150)


def test_finetune_histogram_log_bins_and_threshold(tmp_path: Path) -> None:
    thr = 1e-7
    cands = [
        FinetuneCandidate(i, d, "r", "", (), (1,), i)
        for i, d in enumerate([3e-7, 2e-5, 0.4, 1.7])
    ]
    scores: list[Any] = [*cands, (10, 5e-9), (11, 0.0), 4e-8, float("nan")]
    chart = finetune_histogram(scores, thr, width=300, height=120)
    spec = chart.to_dict()
    bars_rows, rule_rows = _datasets(chart)
    assert sum(r["count"] for r in bars_rows) == 6  # zero and NaN are not on a log axis
    assert rule_rows == [{"threshold": thr}]
    for r in bars_rows:  # the threshold is a bin edge: each bin lies on one side of it
        assert (r["bin_start"] >= thr * (1 - 1e-9)) == (r["side"].startswith("candidate"))
        assert r["bin_end"] <= thr * 1.0000001 or r["bin_start"] >= thr * 0.9999999
    assert sum(r["count"] for r in bars_rows if r["side"].startswith("candidate")) == 4
    assert spec["layer"][0]["encoding"]["x"]["scale"]["type"] == "log"
    assert spec["layer"][1]["mark"]["type"] == "rule"
    assert any("1 with divergence ≤ 0" in s for s in spec["title"]["subtitle"])
    png, svg = _render(chart, tmp_path, "hist")
    _assert_scaled(png, svg, 300, 120)
    # plain arrays and a linear axis work too; one million scores still make a tiny chart
    big = np.random.default_rng(0).exponential(1e-4, 1_000_000)
    rows = _datasets(finetune_histogram(big, thr))[0]
    assert sum(r["count"] for r in rows) == 1_000_000 and len(rows) < 200
    lin = _datasets(finetune_histogram(pl.Series([0.0, 0.5, 1.0]), 0.5, log=False, bins=4))[0]
    assert sum(r["count"] for r in lin) == 3
    with pytest.raises(ScoringError, match="item 0"):
        finetune_histogram(["nope"])  # type: ignore[list-item]


def test_weight_history_chart(tmp_path: Path) -> None:
    from scoring_kit.scoring import MemoryStore

    store = MemoryStore(tmp_path / "store.json")
    for t, (k, s) in enumerate([("a", 0.9), ("b", 0.1), ("a", 0.2), ("c", 0.9), ("b", 0.4)]):
        store.update(k, s, now=1_700_000_000 + 3600 * t)
    frame = store.to_frame()
    chart = weight_history_chart(frame, width=300, height=150)
    rows = _datasets(chart)[0]
    assert len(rows) == 5
    assert {r["key"] for r in rows} == {"a", "b", "c"}
    assert all(isinstance(r["scored_at"], int) for r in rows)  # epoch ms
    assert rows[0]["scored_at"] == 1_700_000_000_000
    spec = chart.to_dict()
    assert spec["layer"][0]["encoding"]["x"]["type"] == "temporal"
    png, svg = _render(chart, tmp_path, "history")
    _assert_scaled(png, svg, 300, 150)
    only = _datasets(weight_history_chart(frame, keys=["b"]))[0]
    assert {r["key"] for r in only} == {"b"}
    top1 = _datasets(weight_history_chart(frame, top=1))[0]
    assert {r["key"] for r in top1} == {"c"}  # highest latest weight
    with pytest.raises(ScoringError, match="weight"):
        weight_history_chart(frame.drop("weight"))


# ── saving ───────────────────────────────────────────────────────


def test_save_chart_formats_and_errors(matrix: MemoryMatrix, tmp_path: Path) -> None:
    chart = memory_weights_chart(matrix)
    html = save_chart(chart, tmp_path / "w.html").read_text()
    assert "vegaEmbed" in html and '"renderer": "svg"' in html
    assert not re.search(r"<script[^>]*\bsrc=", html)  # everything inlined
    assert "cdn.jsdelivr" not in html
    import json

    # text from the data cannot end the page's <script> (it is \u003c-escaped)
    evil = MemoryMatrix(["</script><script>alert(1)</script>"], np.array([1]),
                        np.array([-1.0]), np.array([[np.nan]]), ["<!-- & </script>"])
    page = save_chart(heatmap(evil), tmp_path / "evil.html").read_text()
    assert "<script>alert" not in page and "<!-- &" not in page
    start = page.index("const spec = ") + len("const spec = ")
    embedded = json.loads(page[start : page.index(";\n", start)])
    assert embedded == heatmap(evil).to_dict()
    (tmp_path / "evil.html").unlink()
    spec = json.loads(save_chart(chart, tmp_path / "w.json").read_text())
    assert spec["layer"][0]["mark"]["type"] == "bar"
    with pytest.raises(ExportError, match=r"\.html, \.json, \.png, \.svg"):
        save_chart(chart, tmp_path / "w.gif")
    with pytest.raises(ExportError, match="exists"):
        save_chart(chart, tmp_path / "w.json", overwrite=False)
    with pytest.raises(ExportError, match="scale"):
        save_chart(chart, tmp_path / "x.png", scale=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.html", "w.json"]  # no temp files


def test_import_has_no_altair_side_effects() -> None:
    # altair not even imported, so no theme can be registered at import time
    code = (
        "import sys, scoring_kit.analysis\n"
        "assert 'altair' not in sys.modules, 'altair imported at import time'\n"
        "assert 'vl_convert' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_theme_registered_on_first_call_and_user_theme_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import altair as alt

    from scoring_kit.analysis import _altair, charts

    before = alt.theme.active
    try:
        monkeypatch.setattr(_altair, "_theme_registered", False)
        alt.theme.enable("dark")
        finetune_histogram([1.0])
        assert charts.THEME_NAME in alt.theme.names()
        assert alt.theme.active == "dark"  # a theme the user chose is left alone
        monkeypatch.setattr(_altair, "_theme_registered", False)
        alt.theme.enable("default")
        spec = finetune_histogram([1.0]).to_dict()
        assert alt.theme.active == charts.THEME_NAME
        assert spec["config"]["font"].startswith("Inter")
    finally:
        alt.theme.enable(before)


# ── texts carried by the matrix, notebook helpers ────────────────


def _with_texts(matrix: MemoryMatrix) -> MemoryMatrix:
    import dataclasses

    return dataclasses.replace(
        matrix,
        memory_texts=("I am the assistant.", "Alice has two cats.", "Carol lives in Oslo.",
                      "Bob turned 40 in May."),
        response_texts=("Mia and Leo.", "In Oslo. " + "Long text, " * 10, "He is 40."),
    )


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_matrix_texts_survive_saving(matrix: MemoryMatrix, tmp_path: Path, suffix: str) -> None:
    m = _with_texts(matrix)
    back = MemoryMatrix.load(m.save(tmp_path / f"m{suffix}"))
    assert back.memory_texts == m.memory_texts and back.response_texts == m.response_texts
    if suffix == ".parquet":
        cols = pl.read_parquet(tmp_path / "m.parquet").select("memory_text", "response_text")
        assert cols.row(0) == ("I am the assistant.", "Mia and Leo.")


def test_frames_read_texts_from_the_matrix_without_ctx(matrix: MemoryMatrix) -> None:
    m = _with_texts(matrix)
    assert top_memories(m, 2)["memory_text"].to_list() == ["Alice has two cats.",
                                                           "Carol lives in Oslo."]
    per = top_memories_per_response(m, 1)
    assert per.row(0, named=True)["memory_text"] == "Alice has two cats."
    # full text by default: not cut to a snippet
    long = per.filter(pl.col("entry_index") == 6)["response_text"][0]
    assert long.startswith("In Oslo.") and len(long) > 100 and not long.endswith("…")
    assert set(matrix_frame(m)["memory_text"]) >= {"Bob turned 40 in May."}


def test_table_shows_every_row_and_full_text() -> None:
    from scoring_kit.analysis import table

    text = "word " * 40 + "<end>"
    frame = pl.DataFrame({"i": list(range(30)), "text": [text] * 30})
    html = table(frame)._repr_html_()
    assert html.count("<tr>") == 31  # header + every row
    assert "&lt;end&gt;" in html and "…" not in html
    assert "white-space:pre-wrap" in html


def test_explorer_table_says_when_a_response_leaned_on_nothing(matrix: MemoryMatrix) -> None:
    from scoring_kit.analysis.notebook import _leaned_on_html

    m = _with_texts(matrix)
    assert "No response selected" in _leaned_on_html(m, [], [], None)
    html = _leaned_on_html(m, [3], ["cats"], None)
    assert "Response 3" in html and "Mia and Leo." in html
    assert html.index("cats") < html.index("self")  # 2.0 before 0.1
    assert "Alice has two cats." in html and "background:#fdebd0" in html
    assert "leaned on no memory" in _leaned_on_html(m, [8], [], None)


def test_finetune_histogram_draws_the_threshold_on_its_axis() -> None:
    spec = finetune_histogram([0.5, 1.0, 2.0], 1e-3).to_dict()
    bars = spec["layer"][0]
    lo, hi = bars["encoding"]["x"]["scale"]["domain"]
    assert lo < 1e-3 < hi  # every response is above the threshold, the rule still shows
    y = bars["encoding"]["y"]
    assert y["axis"]["format"] == "d" and y["axis"]["tickMinStep"] == 1


def test_enable_notebook_renders_offline_html() -> None:
    import altair as alt

    from scoring_kit.analysis import RENDERER, chart_html, enable_notebook

    before = alt.renderers.active
    try:
        enable_notebook(quiet=False)
        assert alt.renderers.active == RENDERER
        one = MemoryMatrix(["a"], np.array([1]), np.array([-1.0]), np.array([[-2.0]]), [None])
        bundle = memory_weights_chart(one)._repr_mimebundle_()
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        html = data["text/html"]
    finally:
        alt.renderers.enable(before)
    assert not re.search(r"<script[^>]*\bsrc=", html) and "cdn" not in html.lower()
    assert "window.vegaEmbed" in html
    spec = {"$schema": "x", "data": {"values": [{"t": "</script><b>"}]}, "mark": "point"}
    assert "</script><b>" not in chart_html(spec)


# ── progress ─────────────────────────────────────────────────────


class _FakeScorer:
    name = "fake"

    def __init__(self, m: int) -> None:
        self.m = m

    async def score(self, request: Any) -> np.ndarray:
        return -np.arange(1, self.m + 1, dtype=np.float64) - len(request.prompt) * 0.0

    async def score_batch(self, requests: Any) -> list[np.ndarray]:
        return [await self.score(r) - 0.5 * i for i, r in enumerate(requests)]


def test_matrix_progress_bar_stays_with_total(ctx: ContextState,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from scoring_kit.scoring import score_memories

    m = len(ctx.wire_prompt().entries)
    result = score_memories(ctx, _FakeScorer(m), chunk_size=2)
    err = capsys.readouterr().err
    n = len(ctx.memory_keys())
    # the last redraw is kept (leave=True): the total and the elapsed time stay visible
    assert f"{n}/{n}" in err.splitlines()[-1] and "scoring memories" in err
    assert re.search(r"\d\d:\d\d<", err.splitlines()[-1])
    # one redraw per completed chunk at least (the count moved before the end)
    assert "2/4" in err or f"2/{n}" in err
    assert result.memory_texts == tuple(ctx.memory_text(k) for k in result.keys)
    assert result.response_texts[0] == "Mia and Leo."


def test_quiet_hides_library_noise_not_the_kits_warnings() -> None:
    import warnings

    from scoring_kit._exceptions import CostWarning
    from scoring_kit.analysis.notebook import _quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _quiet_libraries()
        warnings.warn("vLLM scores every prompt token", CostWarning, stacklevel=1)
    assert [type(w.message) for w in caught] == [CostWarning]
