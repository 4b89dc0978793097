"""The benchmark script's premises (its timings are not tested: they live in benchmarks/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from scoring_kit.context.model import skip_key

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_matrix.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_matrix", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_matrix", mod)
    spec.loader.exec_module(mod)
    return mod


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
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_grid_parsing() -> None:
    scale = _scale()
    assert scale._parse_grid("2000x16,8000X64") == [(2000, 16), (8000, 64)]
    import argparse

    for bad in ("2000", "2000x", "x16", "100x4", "2000x0"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale._parse_grid(bad)


@pytest.mark.parametrize("ways", ["exact,w", "exact,bogus", "exact,w1+rx"])
def test_scale_refuses_unknown_ways_before_loading_a_model(
    ways: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _scale().main(["--ways", ways])
    assert info.value.code == 2 and "--ways" in capsys.readouterr().err
