"""Approximate (hierarchical) matrices against the exact one, on the embedded server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scoring_kit.backends.http import ScoreClient
from scoring_kit.context.io import load_context
from scoring_kit.context.model import ContextState
from scoring_kit.scoring import score_memories
from scoring_kit.scoring.approx import score_memories_hierarchical

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def ctx(tokenizer: Any) -> ContextState:
    return load_context(DATA / "sample_conversation.jsonl", tokenizer)


def test_hierarchical_finds_what_exact_finds(ctx: ContextState, server_url: str) -> None:
    c = ScoreClient(server_url)
    try:
        exact = score_memories(ctx, c, progress=False)
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
