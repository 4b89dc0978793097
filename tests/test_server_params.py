"""The server's request records parsed without a model: good bodies, and bad ones refused
with the field, what it must be and what came."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from scoring_kit.server._fields import RequestError
from scoring_kit.server.params import (
    BadItem,
    BatchParams,
    CompletionParams,
    DetokenizeParams,
    GenerateParams,
    ModelLimits,
    ScoreParams,
    TokenizeParams,
    TrainParams,
)

LIMITS = ModelLimits(name="tiny", vocab_size=100, max_len=16)


def test_score_params_good_body_is_a_frozen_record() -> None:
    body = {"model": "m", "prompt": [5, 6, 7], "score_ranges": [[1, 3]], "priority": 2}
    p = ScoreParams.parse(body, LIMITS)
    assert p == ScoreParams(prompt=(5, 6, 7), ranges=((1, 3),), priority=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.priority = 0  # type: ignore[misc]
    # spans are the engine's to check: a bad span parses (the engine refuses it, once)
    assert ScoreParams.parse({"prompt": [5], "score_ranges": [[0, 9]]}, LIMITS).ranges == ((0, 9),)


def test_batch_params_keep_one_slot_per_request() -> None:
    body = {
        "requests": [
            {"prompt": [5, 6], "score_ranges": [[1, 2]]},
            3,
            {"prompt": [5, True], "score_ranges": []},
        ],
        "priority": 4,
    }
    p = BatchParams.parse(body, LIMITS)
    assert p.priority == 4
    first, second, third = p.requests
    assert first == ScoreParams((5, 6), ((1, 2),), 4)
    assert isinstance(second, BadItem) and "`requests[1]` must be an object" in second.message
    assert isinstance(third, BadItem)
    assert "`requests[2].prompt[1]` must be an integer token id, got a boolean" in third.message


_BAD: dict[str, tuple[type[Any], dict[str, Any], tuple[str, ...]]] = {
    "score missing ranges": (ScoreParams, {"prompt": [1, 2]}, ("missing required field", "`score_ranges`")),
    "score string prompt": (ScoreParams, {"prompt": "hi", "score_ranges": []}, ("`prompt`", 'a string ("hi")')),
    "score images": (ScoreParams, {"prompt": [1, 2], "score_ranges": [], "multi_modal_data": {"image": ["x"]}},
                     ("model tiny is text-only", "1 item(s)")),
    "batch not an array": (BatchParams, {"requests": {}}, ("`requests`", "an object")),
    "completion max_tokens 0": (CompletionParams, {"prompt": [1, 2], "max_tokens": 0}, ("at least 1", "got 0")),
    "completion too long": (CompletionParams, {"prompt": [1] * 10, "max_tokens": 8},
                            ("maximum context length is 16 tokens", "requested 18 tokens")),
    "completion top-k logprobs": (CompletionParams, {"prompt": [1, 2], "prompt_logprobs": 5},
                                  ("prompt logprobs of 5", "max allowed: 0")),
    "completion stop id outside vocab": (CompletionParams, {"prompt": "hi", "stop_token_ids": [100]},
                                         ("token id 100 at `stop_token_ids[0]`", "[0, 100)")),
    "generate unknown sampling key": (GenerateParams, {"input_ids": [1], "sampling_params": {"foo": 1}},
                                      ("unknown field `foo`",)),
    "generate start past prompt": (GenerateParams, {"input_ids": [1, 2], "return_logprob": True,
                                                    "sampling_params": {"max_new_tokens": 0},
                                                    "logprob_start_len": 3}, ("logprob_start_len=3",)),
    "generate no prompt": (GenerateParams, {}, ("`input_ids` (or `text`)",)),
    "tokenize messages": (TokenizeParams, {"messages": []}, ("`messages`", "non-empty list")),
    "tokenize message": (TokenizeParams, {"messages": [{"role": "user", "content": 3}]},
                         ("messages[0]", "`role` and `content` must be strings", "a number")),
    "detokenize outside vocab": (DetokenizeParams, {"tokens": [1, -1]}, ("token id -1 at `tokens[1]`",)),
    "train empty": (TrainParams, {"training_data": {"samples": []}}, ("`training_data.samples` is empty",)),
    "train too long": (TrainParams, {"training_data": {"samples": [{"context_ids": [1] * 10,
                                                                    "continuation_ids": [2] * 7}]}},
                       ("has 17 tokens (10 context + 7 continuation)", "context of 16 tokens")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_bodies_are_refused_with_400(case: str) -> None:
    record, body, needles = _BAD[case]
    with pytest.raises(RequestError) as info:
        record.parse(body, LIMITS)
    assert info.value.status == 400
    for needle in needles:
        assert needle in info.value.message, (needle, info.value.message)


def test_good_generation_bodies() -> None:
    g = GenerateParams.parse(
        {"text": "hi", "sampling_params": {"max_new_tokens": 0, "top_k": 5}}, LIMITS
    )
    assert (g.prompt, g.max_new_tokens, g.top_k, g.logprob_start_len) == ("hi", 0, 5, -1)
    roomy = dataclasses.replace(LIMITS, max_len=64)  # room for the default 16 max_tokens
    c = CompletionParams.parse({"prompt": [[1, 2]], "max_tokens": None, "seed": 3}, roomy)
    assert (c.prompt, c.max_tokens, c.seed, c.prompt_logprobs) == ((1, 2), 16, 3, None)
    samples = [{"context_ids": [], "continuation_ids": [4], "extra": "kept"}]
    t = TrainParams.parse({"training_data": {"samples": samples}}, LIMITS)
    assert list(t.samples) == samples  # recorded exactly as sent
