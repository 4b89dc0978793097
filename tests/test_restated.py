"""The restatement screen (pure text) and the windowed matrix it extends (embedded server)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from scoring_kit._exceptions import ScoringError
from scoring_kit.backends.http import ScoreClient
from scoring_kit.context.io import context_from_messages
from scoring_kit.context.model import ContextState
from scoring_kit.scoring.approx import score_memories_windowed
from scoring_kit.scoring.matrix import score_memories
from scoring_kit.scoring.restated import content_words, restatement, restatement_matrix


def test_content_words_are_lower_cased_distinct_and_long_enough() -> None:
    assert content_words("I painted THAT lake-sunrise; a lake!") == {
        "painted", "that", "lake", "sunrise"}
    assert content_words("Ça été élevé", min_length=2) == {"ça", "été", "élevé"}
    assert content_words("") == frozenset()


def test_restatement_weighs_rare_words_over_common_ones() -> None:
    corpus = ["Melanie said hello", "Melanie went home", "Melanie likes tea"]
    memories = ["Melanie painted a lake sunrise", "", "Melanie Melanie"]
    responses = [
        "Yes, I painted that lake sunrise!",  # every rare word: nearly all the weight
        "Melanie is here",  # only the name every node shares
        "Nothing in common",
    ]
    s = restatement(memories, responses, corpus)
    assert s.shape == (3, 3)
    assert 0.85 < s[0, 0] <= 1.0
    assert 0.0 < s[0, 1] < 0.1  # the name is in 5 of 9 documents: little weight
    assert s[0, 2] == 0.0
    assert np.all(s[1] == 0.0)  # an empty memory restates nowhere (no division by zero)
    assert s[2, 1] == pytest.approx(1.0)  # all of its (only) word is restated
    assert restatement([], responses).shape == (0, 3)
    assert restatement(memories, []).shape == (3, 0)


def _far_context(tokenizer: Any) -> ContextState:
    msgs: list[dict[str, str]] = [
        {"role": "system", "content": "You are a helpful assistant with a memory."},
        {"role": "memory", "key": "sunrise",
         "content": "Melanie painted a lake sunrise last year; it is special to her."},
        {"role": "memory", "key": "swim", "content": "Melanie goes swimming on Sundays."},
    ]
    small_talk = [("How was your day?", "Pretty good, thanks for asking."),
                  ("Any plans tonight?", "Just reading a book at home."),
                  ("What's the weather like?", "Cloudy, with some rain later.")]
    for q, a in small_talk:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs += [{"role": "user", "content": "Which painting means a lot to you?"},
             {"role": "assistant",
              "content": "Yeah, I painted that lake sunrise last year! It's special to me."}]
    return context_from_messages(msgs, tokenizer)


def test_restated_extends_the_window_through_a_far_response(
    tokenizer: Any, server_url: str
) -> None:
    ctx = _far_context(tokenizer)
    shares, columns = restatement_matrix(ctx, ["sunrise", "swim"])
    assert columns == [3, 5, 7, 9]  # conversation indices of the responses
    assert shares[0, 3] > 0.5 > shares[0, :3].max()
    assert shares[1].max() < 0.5
    c = ScoreClient(server_url)
    try:
        exact = score_memories(ctx, c, progress=False)
        plain = score_memories_windowed(ctx, c, window=1)
        screened = score_memories_windowed(ctx, c, window=1, restated=0.5)
        with pytest.raises(ScoringError, match=r"restated must be a share in \(0, 1\], got 1.5"):
            score_memories_windowed(ctx, c, window=1, restated=1.5)
    finally:
        asyncio.run(c.aclose())
    assert screened.meta["restated"] == 0.5 and plain.meta["restated"] is None
    assert screened.meta["extended"] == {"sunrise": [9]} and plain.meta["extended"] == {}
    assert screened.meta["window_entries"]["sunrise"] == [0, 10]
    assert screened.meta["window_entries"]["swim"] == plain.meta["window_entries"]["swim"]
    assert screened.meta["prompt_tokens_sent"] > plain.meta["prompt_tokens_sent"]
    assert screened.meta["estimated_cells"] == plain.meta["estimated_cells"] - 3
    i = screened.keys.index("sunrise")
    # the far cell is the exact one, and the memory matters there: the plain window missed it
    assert exact.divergence[i, 3] > 1.0
    np.testing.assert_allclose(screened.without[i], exact.without[i], atol=1e-3)
    assert plain.divergence[i, 3] == 0.0
