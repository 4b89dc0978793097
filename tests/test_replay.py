"""The windowed mode replayed on an exact matrix equals the live windowed run."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scoring_kit._exceptions import ScoringError
from scoring_kit.backends.http import ScoreClient
from scoring_kit.context.io import load_context
from scoring_kit.context.model import ContextState
from scoring_kit.scoring.approx import score_memories_windowed
from scoring_kit.scoring.replay import replay_windowed

DATA = Path(__file__).resolve().parents[1] / "data"
SAME_META = ("window", "restated", "extended", "window_entries", "refine", "refined",
             "estimated_cells", "calls", "exact_calls", "prompt_tokens_sent",
             "exact_prompt_tokens")


@pytest.fixture(scope="module")
def ctx(tokenizer: Any) -> ContextState:
    return load_context(DATA / "sample_conversation.jsonl", tokenizer)


@pytest.mark.parametrize(("window", "restated", "refine"),
                         [(1, None, 0), (2, None, 0), (1, 0.5, 0), (1, None, 2)],
                         ids=["w1", "w2", "w1+r0.5", "w1+f2"])
def test_replay_equals_the_live_windowed_run(
    ctx: ContextState, sample_matrix: Any, server_url: str, window: int,
    restated: float | None, refine: int,
) -> None:
    c = ScoreClient(server_url)
    try:
        live = score_memories_windowed(ctx, c, window=window, restated=restated, refine=refine)
    finally:
        asyncio.run(c.aclose())
    rep = replay_windowed(sample_matrix, ctx, window=window, restated=restated, refine=refine)
    assert rep.approximate and rep.method == "windowed" and rep.meta["replayed"] is True
    for k in SAME_META:
        assert rep.meta[k] == live.meta[k], k
    np.testing.assert_allclose(rep.divergence, live.divergence, atol=2e-3)
    assert rep.keys == live.keys and np.array_equal(rep.entries, live.entries)
    # what a prefix-caching engine computes: less than what is sent, the exact run's more
    meta = rep.meta
    assert len(ctx.wire_prompt()) <= meta["computed_tokens"] < meta["prompt_tokens_sent"]
    assert meta["computed_tokens"] < meta["exact_computed_tokens"] < meta["exact_prompt_tokens"]


def test_replay_refuses_what_it_cannot_replay(ctx: ContextState, sample_matrix: Any) -> None:
    approx = dataclasses.replace(sample_matrix, method="windowed", approximate=True)
    with pytest.raises(ScoringError, match="replay needs an exact matrix; this one is "
                                           "approximate \\(method 'windowed'\\)"):
        replay_windowed(approx, ctx)
    other = dataclasses.replace(sample_matrix, entries=sample_matrix.entries + 1)
    with pytest.raises(ScoringError, match="the exact matrix is not of this conversation: its "
                                           f"{len(other.entries)} responses"):
        replay_windowed(other, ctx)
    with pytest.raises(ScoringError, match="refine must be a count >= 0, got -1"):
        replay_windowed(sample_matrix, ctx, refine=-1)
    with pytest.raises(ScoringError, match="window must be >= 1 response, got 0"):
        replay_windowed(sample_matrix, ctx, window=0)


def test_a_failed_exact_row_stays_failed(ctx: ContextState, sample_matrix: Any) -> None:
    without = sample_matrix.without.copy()
    without[1] = np.nan
    errors = list(sample_matrix.errors)
    errors[1] = "HTTP 503 after 3 tries"
    broken = dataclasses.replace(sample_matrix, without=without, errors=tuple(errors))
    rep = replay_windowed(broken, ctx, window=1, refine=len(errors))
    assert np.isnan(rep.without[1]).all() and rep.errors[1] == "HTTP 503 after 3 tries"
    assert broken.keys[1] not in rep.meta["refined"]  # a failed row is never refined
