"""The benchmark script's premises (its timings are not tested: they live in benchmarks/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from scoring_kit.context.model import skip_key

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, *, register: bool = False) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (``register``: also under its name in sys.modules,
    for the scripts that import it by name)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("bench_matrix", register=True)


@pytest.fixture(scope="module")
def layouts(bench: ModuleType, tokenizer: Any) -> dict[str, Any]:
    return {
        layout: bench.build_conversation(
            layout, n_memories=21, target_tokens=2048, tokenizer=tokenizer, locomo=bench.LOCOMO
        )
        for layout in ("even", "late")
    }


def test_layouts_meet_the_issue_sizes_and_differ_only_in_order(
    bench: ModuleType, layouts: dict[str, Any]
) -> None:
    even, late = layouts["even"], layouts["late"]
    for ctx in (even, late):
        assert len(ctx.wire_prompt()) >= 2048
        assert len(ctx.memory_keys()) == 21
    assert sorted(even.memory_keys()) == sorted(late.memory_keys())
    # the premise of timing the seed's way once: both layouts have the same prompt lengths
    assert bench.seed_shape(even) == bench.seed_shape(late)
    built = sorted(len(late.wire_prompt(skip=skip_key(k))) for k in late.memory_keys())
    assert bench.seed_shape(late) == (len(late.wire_prompt()), *built)
    assert even.wire_prompt().tokens.tolist() != late.wire_prompt().tokens.tolist()


def test_exact_minimum_counts_suffixes_after_each_memory(
    bench: ModuleType, layouts: dict[str, Any]
) -> None:
    ctx = layouts["late"]
    base = ctx.wire_prompt()
    seed, minimum = bench.exact_minimum(ctx)
    assert seed == len(base) + sum(len(ctx.wire_prompt(skip=skip_key(k))) for k in ctx.memory_keys())
    # late layout: every memory sits in the last third, so each suffix is under a third of L
    assert len(base) < minimum < len(base) * (1 + len(ctx.memory_keys()) / 3 + 0.05)
    assert seed / minimum > 2.5


@pytest.mark.parametrize(
    ("option", "value"),
    [("--window", v) for v in ("0", "x", ",", "2,-1")]
    + [("--restated", v) for v in ("0", "x", ",", "0.5,1.5")],
)
def test_bad_list_option_is_refused_before_loading_a_model(
    bench: ModuleType, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main([option, value])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def _scale() -> ModuleType:
    return _load("bench_scale")


def test_scale_point_whose_process_ends_without_reporting_is_a_failed_point() -> None:
    """A point's process killed before it reports (for memory, by a signal) must not hang the
    run: the point is failed, naming the exit code. ``print`` stands in for a child that
    returns without putting a result."""
    r = _scale().run_point(700, 8, "late", {}, child=print)
    assert r["target_tokens"] == 700 and r["layout"] == "late"
    assert "exit code 0 before reporting" in r["error"]


def test_scale_grid_parsing() -> None:
    scale = _scale()
    assert scale._parse_grid("2000x16,8000X64:late") == [(2000, 16, None), (8000, 64, "late")]
    full = scale._parse_grid("full")  # the issue's grid: 2k/4k/8k tokens x 16-128 memories
    assert len(full) == 12 and (8000, 128, None) in full and (4000, 16, None) in full
    assert scale._parse_grid(scale.DEFAULT_GRID)[-1] == (8000, 64, "late")
    import argparse

    for bad in ("2000", "2000x", "x16", "100x4", "2000x0", "2000x16:middle"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale._parse_grid(bad)


@pytest.mark.parametrize("ways", ["exact,w", "exact,bogus", "exact,w1+rx"])
def test_scale_refuses_unknown_ways_before_loading_a_model(
    ways: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _scale().main(["--ways", ways])
    assert info.value.code == 2 and "--ways" in capsys.readouterr().err


def test_scale_merge_keeps_what_a_rerun_did_not_measure() -> None:
    merge = _scale()._merge
    old = {"layout": "even", "w1": {"s": 1.0}, "vllm": {"s": 9.0}, "exact": {"s": 5.0},
           "seed": {"s": 20.0}}
    new = {"layout": "even", "w1+f8": {"s": 2.0}, "exact": {"s": 5.0, "reused_from": "x"},
           "seed": {"s": 24.0}}
    # the reused exact matrix keeps its own figures and the seed's way they were measured by
    assert merge(old, new) == {"layout": "even", "w1": {"s": 1.0}, "vllm": {"s": 9.0},
                               "exact": {"s": 5.0}, "seed": {"s": 20.0}, "w1+f8": {"s": 2.0}}
    fresh = {**new, "exact": {"s": 4.0}}  # recomputed: the new run's figures replace both
    assert merge(old, fresh)["seed"] == {"s": 24.0} and merge(old, fresh)["exact"] == {"s": 4.0}
    assert merge(old, {"error": "boom"}) == {**old, "last_error": "boom"}
    assert merge({}, {"error": "boom"}) == {"error": "boom"}


def test_scale_seed_estimate_brackets_the_ways() -> None:
    """The seed's estimate is the mean of a dense pass before the ways and one after (the
    cores drift); every speedup measured in the run is recomputed against it, a reused exact
    matrix keeps its own."""
    calls = iter([4.0])  # the pass after the ways: 1,000 tokens in 4 s (before: 2 s)
    out = {"bound": 2.0, "flop_bound": 2.5, "seed": {"s": 20.0, "how": "estimated"},
           "exact": {"s": 10.0, "speedup": 2.0}, "w1": {"s": 1.0, "speedup": 20.0}}
    scale = _scale()
    scale._bracket_seed(out, lambda: None, 2.0, 10_000, 1_000, ["exact", "w1"],
                        clock=lambda fn: next(calls))
    assert out["seed"]["s"] == pytest.approx(30.0)  # 10,000 tokens at 3 ms each
    assert out["seed"]["dense_tok_s"] == [500.0, 250.0] and "500 and 250 tok/s" in out["seed"]["how"]
    assert out["exact"]["speedup"] == pytest.approx(3.0) and out["w1"]["speedup"] == pytest.approx(30.0)
    assert out["exact"]["share_of_bound"] == pytest.approx(1.5)
    assert out["exact"]["share_of_flop_bound"] == pytest.approx(1.2)
    reused = {**out, "exact": {"s": 10.0, "speedup": 2.0, "reused_from": "x"}}
    scale._bracket_seed(reused, lambda: None, 2.0, 10_000, 1_000, ["exact"], clock=lambda fn: 2.0)
    assert reused["exact"]["speedup"] == 2.0


def test_scale_report_is_a_markdown_table() -> None:
    row = {"target_tokens": 2000, "memories": 16, "layout": "late", "prompt_tokens": 2010,
           "bound": 4.0, "flop_bound": 4.2, "seed": {"s": 100.0, "how": "timed"},
           "exact": {"s": 30.0, "speedup": 3.3, "share_of_bound": 0.83, "peak_mb": 1469.0},
           "w1+f8": {"s": 10.0, "speedup": 10.0, "top5_recall": 1.0,
                     "top5_recall_per_response": 0.9},
           "vllm": {"s": 75.0, "engine_over_vllm": 2.5}}
    table = _scale().markdown_table([row, {"error": "boom", "layout": "even"}]).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[2].count("|")
    assert "| 2,010 | 16 | late | 4.00x (4.20x) | 100 (timed) | 30: 3.3x, 83% (79%), 1,469 |" \
        in table[2]
    assert "10.0x, 1.00 / 0.90" in table[2] and "75 (2.50x)" in table[2]


def test_scale_way_names() -> None:
    parse = _scale()._parse_way
    assert parse("w1") == (1, None, 0) and parse("w2+r0.5") == (2, 0.5, 0)
    assert parse("w1+r0.5+f8") == (1, 0.5, 8) and parse("w1+f4") == (1, None, 4)
    for bad in ("w0", "w1+r0", "w1+r1.5", "w1+f", "f4", "w1+f4+r0.5"):
        assert parse(bad) is None, bad


def test_flop_bound_is_the_token_bound_when_every_token_costs_the_same(
    bench: ModuleType, layouts: dict[str, Any]
) -> None:
    from types import SimpleNamespace

    scale = _scale()
    for ctx in layouts.values():
        seed, minimum = bench.exact_minimum(ctx)
        # head_dim 0 and no vocabulary: no attention or LM-head cost, only the layer weights
        flat = SimpleNamespace(hidden_size=1, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=8, vocab_size=0)
        f_seed, f_min = scale.flop_counts(ctx, flat)
        assert f_seed / f_min == pytest.approx(seed / minimum)
        # with attention priced, a late suffix token (many keys before it) costs more than an
        # average prefill token: the FLOP bound is below the token bound on the late layout
        real = SimpleNamespace(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                               vocab_size=0)
        r_seed, r_min = scale.flop_counts(ctx, real)
        if ctx is layouts["late"]:
            assert r_seed / r_min < seed / minimum


# ── --cli: end-to-end CLI figures (benchmarks/bench_cli.py) ────────────────
def _cli_bench() -> ModuleType:
    return _load("bench_cli")


@pytest.fixture(scope="module")
def tiny(bench: ModuleType, tokenizer: Any) -> tuple[Any, list[dict[str, str]]]:
    """The late layout at 300 tokens x 3 memories, and its plain messages."""
    return bench.conversation_and_messages(
        "late", n_memories=3, target_tokens=300, tokenizer=tokenizer, locomo=bench.LOCOMO)


def test_cli_point_parsing() -> None:
    import argparse

    cli = _cli_bench()
    assert cli.parse_point("2000x20") == (2000, 20) and cli.parse_point("700X6") == (700, 6)
    for bad in ("2000", "x6", "100x4", "700x0", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_point(bad)


@pytest.mark.parametrize("argv", [["--cli", "--tokens", "700"], ["--cli", "--memories", "6"],
                                  ["--cli", "--cli-point", "700"],
                                  ["--cli", "--cli-repeats", "0"]])
def test_cli_options_are_refused_before_loading_a_model(
    bench: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2 and "--cli" in capsys.readouterr().err


def test_cli_file_reads_back_into_the_benchmark_prompt(
    tiny: tuple[Any, list[dict[str, str]]], tokenizer: Any, tmp_path: Path
) -> None:
    cli = _cli_bench()
    ctx, messages = tiny
    assert len(ctx.memory_keys()) == 3 and len(ctx.wire_prompt()) >= 300
    assert all(m.get("key") for m in messages if m["role"] == "memory")
    path = cli.write_messages(messages, tmp_path / "late.jsonl")
    cli.check_round_trip(path, ctx, tokenizer)
    # a file that reads into another prompt stops the benchmark
    changed = [dict(m, content=m["content"] + " (changed)") if m["role"] == "memory" else m
               for m in messages]
    with pytest.raises(cli.CliBenchError, match="does not read back"):
        cli.check_round_trip(cli.write_messages(changed, tmp_path / "x.jsonl"), ctx, tokenizer)


def test_cli_matrix_diff_needs_the_same_keys_and_responses(bench: ModuleType) -> None:
    import numpy as np

    cli = _cli_bench()
    a = bench.MemoryMatrix(("m1", "m2"), np.array([3, 5]), np.array([-1.0, -2.0]),
                           np.array([[-1.5, -2.0], [-1.0, -2.25]]), (None, None))
    b = bench.MemoryMatrix(("m1", "m2"), np.array([3, 5]), np.array([-1.0, -2.0005]),
                           np.array([[-1.5, -2.0], [-1.0, -2.25]]), (None, None))
    assert cli.matrix_diff(a, a) == {"baseline": 0.0, "without": 0.0, "divergence": 0.0}
    assert cli.matrix_diff(a, b)["baseline"] == pytest.approx(5e-4)
    other = bench.MemoryMatrix(("m2", "m1"), a.entries, a.baseline, a.without, (None, None))
    with pytest.raises(cli.CliBenchError, match="other keys"):
        cli.matrix_diff(other, a)


@pytest.mark.slow
def test_cli_measure_end_to_end(
    tiny: tuple[Any, list[dict[str, str]]], engine: Any, server_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """render and score run as subprocesses of this interpreter; the matrix is checked, and
    every timed ``score`` finds the server's prefix cache empty (it computes what the
    in-process exact run computes from a cleared cache)."""
    from scoring_kit.backends.local import LocalScorer
    from scoring_kit.scoring.matrix import score_memories

    cli = _cli_bench()
    ctx, messages = tiny
    engine.clear_cache()
    engine.reset_stats()
    exact = score_memories(ctx, LocalScorer(engine), chunk_size=3, progress=False)
    exact_fwd = engine.stats.forward_tokens
    # the session's server runs this engine: its stats count what the server computes
    engine.reset_stats()
    cli.flush_prefix_cache(server_url, int(ctx.wire_prompt().tokens[0]))
    flush_fwd = engine.stats.forward_tokens
    row = {"seed": {"s": 4.0}, "exact": {"s": 1.0}, "bound": 2.0}
    engine.reset_stats()
    with cli.CliBench(repeats=2, server_url=server_url) as b:
        got = b.measure("late", ctx, messages, exact, row, engine.tokenizer)
    # 2 timed runs and the one with the heatmap: no run reused a prefix
    assert engine.stats.forward_tokens == 3 * (flush_fwd + exact_fwd)
    assert got["score"]["with_heatmap_s"] > 0
    assert got["score"]["max_abs_diff"]["without"] <= cli.MATRIX_ATOL
    assert got["score"]["speedup"] == pytest.approx(4.0 / got["score"]["s"])
    assert got["score"]["share_of_bound"] == pytest.approx(got["score"]["speedup"] / 2.0)
    assert got["score"]["fixed_cost_s"] == pytest.approx(got["score"]["s"] - 1.0)
    assert len(got["render"]["runs_s"]) == 3 and got["render"]["first_cache"] in ("warm", "cold", "off")
    lines = capsys.readouterr().out.splitlines()
    assert [w.split()[0] for w in lines if w.split()[:1] in (["cli"], ["render"])] == [
        "cli", "render"]


def _replay_bench() -> ModuleType:
    _load("bench_matrix", register=True)
    _load("bench_scale", register=True)
    return _load("bench_replay")


def test_replay_reads_a_kept_exact_matrix_and_refuses_another_prompt(
    bench: ModuleType, engine: Any, tmp_path: Path
) -> None:
    """A point kept the way bench_scale keeps it is replayed (w1 spends less than exact, a
    window as long as the conversation is exact); a cache of another prompt is refused."""
    import hashlib
    import json

    import numpy as np

    from scoring_kit.backends.local import LocalScorer
    from scoring_kit.scoring.matrix import score_memories

    rep = _replay_bench()
    ctx = bench.build_conversation("late", n_memories=4, target_tokens=700,
                                   tokenizer=engine.tokenizer, locomo=bench.LOCOMO)
    exact = score_memories(ctx, LocalScorer(engine), progress=False)
    exact.save(tmp_path / "700x4-late.npz")
    sha = hashlib.sha256(ctx.wire_prompt().tokens.astype(">i8").tobytes()).hexdigest()
    (tmp_path / "700x4-late.json").write_text(json.dumps({"prompt_sha": sha}))
    measured = {(700, 4, "late"): {"w1": {"speedup": 3.0, "forward_tokens": 10}}}
    row = rep.replay_point("700x4-late", tmp_path, ["w1", "w99"], engine.tokenizer,
                           bench.LOCOMO, measured)
    seed_tokens, _ = bench.exact_minimum(ctx, bench.ablations(ctx))
    assert row["seed_tokens"] == seed_tokens and row["prompt_tokens"] == len(ctx.wire_prompt())
    assert row["w99"]["top5_recall"] == 1.0 and row["w99"]["top5_weight_share"] == 1.0
    assert row["w1"]["computed_tokens"] < row["exact"]["computed_tokens"]
    assert row["w1"]["token_ratio"] == seed_tokens / row["w1"]["computed_tokens"]
    assert row["w1"]["measured_speedup"] == 3.0 and "measured_speedup" not in row["w99"]
    table = rep.markdown_table([row], ["w1", "w99"])
    assert table.splitlines()[2].endswith(f"| w99: {row['w99']['token_ratio']:.1f}× | "
                                          f"{row['exact_top5_sign_agreement']:.1f} |")
    # the cells past the windows: w99 has none, so it is exact under either ranking
    assert row["w99"]["top5_recall_signed"] == 1.0
    far = row["after_w1_windows"]
    assert far["divergence_nats"] >= max(far["signed_nats"], 0.0) - 1e-6
    assert 0.0 <= far["negative_cell_share"] <= 1.0
    assert np.isfinite(row["w1"]["top5_recall"])
    (tmp_path / "700x4-late.json").write_text(json.dumps({"prompt_sha": "0" * 64}))
    with pytest.raises(SystemExit, match="its exact matrix is of another prompt"):
        rep.replay_point("700x4-late", tmp_path, ["w1"], engine.tokenizer, bench.LOCOMO, {})
    with pytest.raises(SystemExit, match="no exact matrix kept for 700x8-late"):
        rep.replay_point("700x8-late", tmp_path, ["w1"], engine.tokenizer, bench.LOCOMO, {})
    with pytest.raises(SystemExit, match="is not TOKENSxMEMORIES-LAYOUT"):
        rep.replay_point("700-late", tmp_path, ["w1"], engine.tokenizer, bench.LOCOMO, {})


def test_replay_merge_keeps_earlier_points_and_ways() -> None:
    """--merge: a point replayed now is updated way by way, one not replayed is kept, and the
    table marks a way a point has not replayed."""
    rep = _replay_bench()
    fig = {"top5_recall": 1.0, "token_ratio": 9.0}
    old = [{"target_tokens": 8000, "memories": 64, "layout": "even", "prompt_tokens": 8009,
            "w1": {**fig, "token_ratio": 4.0}, "w2": fig},
           {"target_tokens": 2000, "memories": 64, "layout": "late", "prompt_tokens": 3679,
            "w1": fig}]
    new = [{"target_tokens": 8000, "memories": 64, "layout": "even", "prompt_tokens": 8009,
            "w1": {**fig, "token_ratio": 5.0}, "w1+f6": fig}]
    rows = rep.merge_rows(old, new)
    assert [(r["target_tokens"], r["layout"]) for r in rows] == [(2000, "late"), (8000, "even")]
    assert rows[1]["w1"]["token_ratio"] == 5.0 and rows[1]["w2"] == fig and "w1+f6" in rows[1]
    lines = rep.markdown_table(rows, ["w1", "w1+f6"]).splitlines()
    assert lines[2] == "| 3,679 × 64 late | 1.0 / 9.0× | - | w1: 9.0× | - |"
    assert lines[3].endswith("| 1.0 / 5.0× | 1.0 / 9.0× | w1+f6: 9.0× | - |")
    # a way whose recall by signed sums differs shows it in brackets
    rows[1]["w1"]["top5_recall_signed"] = 0.8
    rows[1]["exact_top5_sign_agreement"] = 0.8
    assert rep.markdown_table(rows, ["w1"]).splitlines()[3] == (
        "| 8,009 × 64 even | 1.0 [0.8] / 5.0× | w1: 5.0× | 0.8 |")
