"""LocalScorer: the Scorer protocol over the in-process engine (real model)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from scoring_kit._exceptions import BackendError, PromptError, ScoringAPIError
from scoring_kit.backends.base import (
    CompletionRequest,
    Scorer,
    ScoreRequest,
    WireImage,
    gather_in_order,
)
from scoring_kit.backends.local import LocalScorer
from scoring_kit.engine.engine import Engine


def _prompt(tok: Any) -> tuple[list[int], list[tuple[int, int]], tuple[int, int]]:
    """A small chat: system, memory, user, assistant, user, assistant (~120 tokens)."""

    def node(role: str, body: str) -> list[int]:
        return [tok.im_start_id, *tok.encode(f"{role}\n{body}"), tok.im_end_id, *tok.encode("\n")]

    nodes = [
        ("system", "You are a helpful agent."),
        ("system", "memory: Alice moved to Lisbon in March and drinks green tea."),
        ("user", "Where does Alice live now?"),
        ("assistant", "Alice lives in Lisbon; she moved there in March."),
        ("user", "And what does she drink?"),
        ("assistant", "Green tea, mostly."),
    ]
    toks: list[int] = []
    spans = []
    memory = (0, 0)
    for role, body in nodes:
        run = node(role, body)
        if role == "assistant":
            spans.append((len(toks), len(toks) + len(run)))
        if body.startswith("memory:"):
            memory = (len(toks), len(toks) + len(run))
        toks += run
    return toks, spans, memory


@pytest.fixture()
def scorer(engine: Engine) -> LocalScorer:
    engine.clear_cache()
    return LocalScorer(engine)


def test_protocol_and_score(scorer: LocalScorer, engine: Engine, tokenizer: Any) -> None:
    assert isinstance(scorer, Scorer)
    assert scorer.name == "local"
    prompt, spans, _ = _prompt(tokenizer)
    got = asyncio.run(scorer.score(ScoreRequest.build(prompt, spans)))
    np.testing.assert_allclose(got, engine.score(prompt, spans), atol=1e-6, rtol=0)
    assert scorer.stats.calls == 1 and scorer.stats.prompt_tokens == len(prompt)
    assert scorer.stats.computed_tokens == spans[-1][1] - 1
    assert scorer.stats.extra["logit_rows"] == sum(b - a for a, b in spans)


def test_score_bad_request_is_api_error_400(scorer: LocalScorer) -> None:
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(scorer.score(ScoreRequest.build([1, 2, 3], [(0, 2)])))
    err = info.value
    assert err.status_code == 400 and err.backend == "local"
    assert "starts at 0" in err.message
    assert str(err).startswith("score API HTTP 400: ")
    assert isinstance(err.__cause__, PromptError)
    assert scorer.stats.failed_calls == 1


def test_score_batch_errors_in_their_slots(
    scorer: LocalScorer, engine: Engine, tokenizer: Any
) -> None:
    prompt, spans, (ms, me) = _prompt(tokenizer)
    ablated = prompt[:ms] + prompt[me:]
    abl_spans = [(a - (me - ms), b - (me - ms)) for a, b in spans]
    reqs = [
        ScoreRequest.build(prompt, spans),
        ScoreRequest.build(ablated, abl_spans),
        ScoreRequest.build(prompt, [(1, len(prompt) + 5)]),  # bad: ends past the prompt
        ScoreRequest.build(prompt, spans, images=[WireImage("image/png", b"\x89PNG")]),
    ]
    out = asyncio.run(scorer.score_batch(reqs))
    assert len(out) == 4
    assert isinstance(out[0], np.ndarray) and isinstance(out[1], np.ndarray)
    np.testing.assert_allclose(out[0], engine.score(prompt, spans), atol=1e-3, rtol=0)
    np.testing.assert_allclose(out[1], engine.score(ablated, abl_spans), atol=1e-3, rtol=0)
    bad = out[2]
    assert isinstance(bad, ScoringAPIError) and bad.status_code == 400
    assert "request 2" in bad.message and f"prompt length {len(prompt)}" in bad.message
    assert isinstance(bad.__cause__, PromptError)
    img = out[3]
    assert isinstance(img, ScoringAPIError) and img.status_code == 400
    assert "image" in img.message
    assert scorer.stats.calls == 4 and scorer.stats.failed_calls == 2
    # the ablation reused the baseline's prefix
    assert scorer.stats.extra["cache_hits_tokens"] >= ms
    assert scorer.stats.computed_tokens < len(prompt) + len(ablated)
    assert asyncio.run(scorer.score_batch([])) == []


def test_score_with_images_is_refused(scorer: LocalScorer, tokenizer: Any) -> None:
    prompt, spans, _ = _prompt(tokenizer)
    req = ScoreRequest.build(prompt, spans, images=[WireImage("image/png", b"x")])
    with pytest.raises(ScoringAPIError, match="image") as info:
        asyncio.run(scorer.score(req))
    assert info.value.status_code == 400
    assert isinstance(info.value, BackendError)


def test_gather_in_order_over_local(scorer: LocalScorer, tokenizer: Any) -> None:
    prompt, spans, _ = _prompt(tokenizer)
    reqs = [ScoreRequest.build(prompt, spans), ScoreRequest.build(prompt, [(0, 1)])]
    out = asyncio.run(gather_in_order(scorer, reqs, concurrency=2))
    assert isinstance(out[0], np.ndarray) and isinstance(out[1], ScoringAPIError)


def test_complete(scorer: LocalScorer, engine: Engine, tokenizer: Any) -> None:
    prompt, _, _ = _prompt(tokenizer)
    ask = [*prompt, tokenizer.im_start_id, *tokenizer.encode("assistant\n")]
    req = CompletionRequest(
        tuple(ask), max_tokens=6, temperature=0.0, stop_token_ids=(tokenizer.im_end_id,)
    )
    text = asyncio.run(scorer.complete(req))
    ids, want = engine.generate(
        ask, max_tokens=6, temperature=0.0, top_p=0.95, top_k=20, stop_token_ids=[2]
    )
    assert text == want and len(ids) <= 6
    assert "<|im_end|>" not in text
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(scorer.complete(CompletionRequest((), max_tokens=3)))
    assert info.value.status_code == 400 and isinstance(info.value.__cause__, PromptError)
    asyncio.run(scorer.aclose())


def test_lazy_load_once(monkeypatch: pytest.MonkeyPatch, engine: Engine, tokenizer: Any) -> None:
    calls: list[tuple[Any, Any]] = []

    def fake_load(model_path: Any = None, *, device: Any = None, **_: Any) -> Engine:
        calls.append((model_path, device))
        return engine

    monkeypatch.setattr(Engine, "load", staticmethod(fake_load))
    scorer = LocalScorer(model_path="/some/model.gguf", device="cpu")
    assert "not loaded" in repr(scorer)
    prompt, spans, _ = _prompt(tokenizer)

    async def two() -> list[Any]:
        req = ScoreRequest.build(prompt, spans)
        return list(await asyncio.gather(scorer.score(req), scorer.score(req)))

    a, b = asyncio.run(two())
    np.testing.assert_array_equal(a, b)
    assert calls == [("/some/model.gguf", "cpu")]
    assert scorer.engine is engine
