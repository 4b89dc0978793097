"""Approximate (hierarchical, windowed) matrices against the exact one, on the embedded server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scoring_kit._exceptions import ScoringError
from scoring_kit.backends.http import ScoreClient
from scoring_kit.context.io import load_context
from scoring_kit.context.model import ContextState
from scoring_kit.scoring.approx import (
    score_memories_hierarchical,
    score_memories_windowed,
    signed_weights,
    top_k_recall,
    top_k_sign_agreement,
    top_k_weight_share,
)
from scoring_kit.scoring.matrix import MemoryMatrix

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def ctx(tokenizer: Any) -> ContextState:
    return load_context(DATA / "sample_conversation.jsonl", tokenizer)


@pytest.fixture(scope="module")
def exact(sample_matrix: Any) -> Any:
    return sample_matrix


def test_hierarchical_finds_what_exact_finds(
    ctx: ContextState, exact: Any, server_url: str
) -> None:
    c = ScoreClient(server_url)
    try:
        approx = score_memories_hierarchical(ctx, c, group_size=4, descend_threshold=2.0,
                                             top_groups=0)
    finally:
        asyncio.run(c.aclose())
    assert approx.approximate and approx.method == "hierarchical" and not exact.approximate
    meta = approx.meta
    assert meta["exact_calls"] == 9
    singles = {g[0] for g in meta["tested_groups"] if len(g) == 1}
    assert set(meta["estimated_keys"]) == set(approx.keys) - singles
    # descended rows are exact; estimated rows are zero divergence
    for i, k in enumerate(approx.keys):
        if k in meta["estimated_keys"]:
            assert np.all(approx.divergence[i] == 0)
        else:
            assert np.allclose(approx.divergence[i], exact.divergence[i], atol=1e-3)
    # every response's strongest memory (when strong) is found
    for j in range(exact.shape[1]):
        col = exact.divergence[:, j]
        if col.max() > 2.0:
            assert approx.divergence[int(col.argmax()), j] == pytest.approx(col.max(), abs=1e-3)


def test_windowed_cells_are_exact_inside_the_window(
    ctx: ContextState, exact: Any, server_url: str
) -> None:
    c = ScoreClient(server_url)
    try:
        approx = score_memories_windowed(ctx, c, window=2)
    finally:
        asyncio.run(c.aclose())
    assert approx.approximate and approx.method == "windowed" and approx.keys == exact.keys
    meta = approx.meta
    assert meta["window"] == 2 and meta["calls"] <= meta["exact_calls"] == 9
    assert meta["prompt_tokens_sent"] < meta["exact_prompt_tokens"]
    np.testing.assert_allclose(approx.baseline, exact.baseline, atol=1e-3)
    inside = 0
    for i, k in enumerate(approx.keys):
        a, b = meta["window_entries"][k]
        assert np.count_nonzero((approx.entries >= a) & (approx.entries < b)) <= 2  # window
        known = approx.entries < b  # the window, and the responses before the memory
        np.testing.assert_allclose(approx.without[i, known], exact.without[i, known],
                                   atol=1e-3, err_msg=k)
        assert np.all(approx.divergence[i, ~known] == 0)  # estimated: no divergence
        inside += int(known.sum())
    assert meta["estimated_cells"] == approx.divergence.size - inside
    # the sample's memory-dependent answers sit right after their memories: all found
    for j in range(exact.shape[1]):
        col = exact.divergence[:, j]
        if col.max() > 5.0 and exact.keys[int(col.argmax())] != "identity:melanie":
            assert approx.divergence[int(col.argmax()), j] == pytest.approx(col.max(), abs=1e-3)


def test_windowed_refine_makes_the_heaviest_rows_exact(
    ctx: ContextState, exact: Any, server_url: str
) -> None:
    c = ScoreClient(server_url)
    try:
        plain = score_memories_windowed(ctx, c, window=1)
        refined = score_memories_windowed(ctx, c, window=1, refine=2)
        with pytest.raises(ScoringError, match="refine must be a count >= 0, got -1"):
            score_memories_windowed(ctx, c, window=1, refine=-1)
    finally:
        asyncio.run(c.aclose())
    meta = refined.meta
    # the two rows the window found heaviest (among those with later responses) are redone
    n_conv = len(ctx.conversation)
    open_rows = [i for i, k in enumerate(plain.keys)
                 if (plain.entries >= plain.meta["window_entries"][k][1]).any()]
    heaviest = sorted(open_rows, key=lambda i: -plain.memory_weights[i])[:2]
    assert meta["refined"] == [plain.keys[i] for i in heaviest] and meta["refine"] == 2
    assert meta["calls"] == plain.meta["calls"] + 2
    assert meta["prompt_tokens_sent"] > plain.meta["prompt_tokens_sent"]
    assert meta["estimated_cells"] < plain.meta["estimated_cells"]
    for i, k in enumerate(refined.keys):
        if k in meta["refined"]:  # whole row exact, its window now the whole conversation
            np.testing.assert_allclose(refined.without[i], exact.without[i], atol=1e-3)
            assert meta["window_entries"][k][1] == n_conv
        else:  # untouched
            np.testing.assert_array_equal(refined.without[i], plain.without[i])


def test_windowed_with_a_window_past_the_end_is_exact(
    ctx: ContextState, exact: Any, server_url: str
) -> None:
    c = ScoreClient(server_url)
    try:
        full = score_memories_windowed(ctx, c, window=len(ctx.conversation))
        with pytest.raises(ScoringError, match="window must be >= 1 response, got 0"):
            score_memories_windowed(ctx, c, window=0)
        with pytest.raises(ScoringError, match="memory 'nope' is not in the context"):
            score_memories_windowed(ctx, c, keys=["nope"])
    finally:
        asyncio.run(c.aclose())
    assert full.meta["estimated_cells"] == 0
    np.testing.assert_allclose(full.without, exact.without, atol=1e-3)


def test_top_k_recall_on_hand_made_matrices() -> None:
    keys = ["a", "b", "c", "d"]
    base = np.zeros(3)
    # exact: a leans on response 0, b on 1, c on 2 (d matters nowhere)
    exact = MemoryMatrix(keys, np.arange(3), base,
                         -np.array([[5, 0, 0], [0, 4, 0], [0, 0, 3], [0, 0, 0]], float),
                         [None] * 4)
    same = MemoryMatrix(keys, np.arange(3), base, exact.without.copy(), [None] * 4)
    assert top_k_recall(exact, same, k=1) == (1.0, 1.0)
    # approx misses c (estimated 0) and puts d there instead; a failed row (NaN) counts as 0
    w = exact.without.copy()
    w[2] = 0.0
    w[3] = [0, 0, -1]
    w[1] = np.nan
    approx = MemoryMatrix(keys, np.arange(3), base, w, [None, "boom", None, None])
    overall, per = top_k_recall(exact, approx, k=3)
    assert overall == pytest.approx(1 / 3)  # of {a, b, c} only a is in approx's {a, d}
    assert per == pytest.approx(1 / 3)  # response 0 found, 1 and 2 missed
    with pytest.raises(ScoringError, match="matrices differ in shape or keys"):
        top_k_recall(exact, MemoryMatrix(keys[:3], np.arange(3), base, w[:3], [None] * 3))


def test_top_k_weight_share_prices_a_near_tie() -> None:
    keys = ["a", "b", "c"]
    base = np.zeros(2)
    exact = MemoryMatrix(keys, np.arange(2), base,
                         -np.array([[5, 0], [0, 3.0], [0, 2.9]]), [None] * 3)
    # approx ranks c above b (a near tie in exact weight): recall 0.5, weight share ~0.99
    swapped = MemoryMatrix(keys, np.arange(2), base,
                           -np.array([[5, 0], [0, 1.0], [0, 2.9]]), [None] * 3)
    assert top_k_recall(exact, swapped, k=2)[0] == pytest.approx(0.5)
    assert top_k_weight_share(exact, swapped, k=2) == pytest.approx(7.9 / 8.0)
    assert top_k_weight_share(exact, exact, k=2) == 1.0
    # a row the approximation estimated as nothing, and an empty exact set
    blank = MemoryMatrix(keys, np.arange(2), base, np.zeros((3, 2)), [None] * 3)
    assert top_k_weight_share(exact, blank, k=2) == 0.0
    assert top_k_weight_share(blank, exact, k=2) == 1.0
    with pytest.raises(ScoringError, match="k must be >= 1, got 0"):
        top_k_weight_share(exact, exact, k=0)


def test_signed_ranking_nets_out_shifts_either_way() -> None:
    """b's weight comes from the positive half of shifts that net to about nothing: it is in
    the top 2 by divergence, not by signed sums; an approximation that estimated b's far
    cells as 0 misses it by divergence and finds the signed top 2."""
    keys = ["a", "b", "c"]
    base = np.zeros(4)
    delta = np.array([[3.0, 0, 0, 0], [2.0, 1.0, -1.0, 1.0], [0, 3.5, 0, 0]])
    exact = MemoryMatrix(keys, np.arange(4), base, -delta, [None] * 3)
    np.testing.assert_allclose(exact.memory_weights, [3.0, 4.0, 3.5])
    np.testing.assert_allclose(signed_weights(exact), [3.0, 3.0, 3.5])
    assert top_k_sign_agreement(exact, k=2) == pytest.approx(0.5)  # {b, c} against {a, c}
    assert top_k_sign_agreement(exact, k=3) == 1.0
    windowed = delta.copy()
    windowed[1, 1:] = 0.0  # b's far cells estimated as no divergence
    approx = MemoryMatrix(keys, np.arange(4), base, -windowed, [None] * 3)
    assert top_k_recall(exact, approx, k=2)[0] == pytest.approx(0.5)
    assert top_k_recall(exact, approx, k=2, signed=True)[0] == 1.0
    # a failed row counts as 0 either way
    failed = exact.without.copy()
    failed[2] = np.nan
    broken = MemoryMatrix(keys, np.arange(4), base, failed, [None, None, "boom"])
    assert signed_weights(broken)[2] == 0.0
    with pytest.raises(ScoringError, match="k must be >= 1, got 0"):
        top_k_sign_agreement(exact, k=0)
