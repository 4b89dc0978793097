"""``ScoreClient`` (the seed's ``/score`` protocol) and ``make_scorer`` against the REAL
embedded server: real HTTP on 127.0.0.1, the real model, no mocks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

from scoring_kit._exceptions import BackendError, ScoringAPIError
from scoring_kit.backends._common import BackendPromptError
from scoring_kit.backends.auto import amake_scorer, detect_backend, make_scorer
from scoring_kit.backends.base import CompletionRequest, Scorer, ScoreRequest
from scoring_kit.backends.http import ScoreClient


def chatml(tokenizer: Any, turns: list[tuple[str, str]]) -> ScoreRequest:
    """ChatML token ids; one span per assistant message (``<|im_start|>assistant ... \\n``)."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for role, text in turns:
        start = len(ids)
        ids += [tokenizer.im_start_id, *tokenizer.encode(f"{role}\n{text}"), tokenizer.im_end_id]
        ids += tokenizer.encode("\n")
        if role == "assistant":
            spans.append((start, len(ids)))
    return ScoreRequest.build(ids, spans)


SYSTEM = ("system", "You are a helpful assistant.")
MEMORY = ("system", "Memory: the user's dog is called Pepper and loves the beach.")
DIALOGUE = [
    ("user", "What is my dog called?"),
    ("assistant", "Your dog is called Pepper."),
    ("user", "Where does she like to go?"),
    ("assistant", "Pepper loves the beach."),
]


@pytest.fixture(scope="module")
def requests_(tokenizer: Any) -> list[ScoreRequest]:
    """Baseline (with the memory) and the same conversation without it, and a short one."""
    return [
        chatml(tokenizer, [SYSTEM, MEMORY, *DIALOGUE]),
        chatml(tokenizer, [SYSTEM, *DIALOGUE]),
        chatml(tokenizer, [SYSTEM, ("user", "Say hi."), ("assistant", "Hi!")]),
    ]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _using(client: ScoreClient, coro_fn: Any) -> Any:
    try:
        return await coro_fn(client)
    finally:
        await client.aclose()


def test_score_returns_one_total_per_range(server_url: str, requests_: list[ScoreRequest]) -> None:
    client = ScoreClient(server_url)
    out = run(_using(client, lambda c: c.score(requests_[0])))
    assert out.dtype == np.float64 and out.shape == (2,)
    assert np.all(np.isfinite(out)) and np.all(out < 0)
    assert client.stats.calls == 1 and client.stats.failed_calls == 0
    assert client.stats.prompt_tokens == len(requests_[0].prompt)


def test_score_batch_matches_single_scores(server_url: str, requests_: list[ScoreRequest]) -> None:
    """/score/batch (chunks of 2), per-request /score, and single calls agree."""
    reqs = [*requests_, ScoreRequest.build(requests_[2].prompt, [])]
    client = ScoreClient(server_url, batch_size=2)

    async def both(c: ScoreClient) -> tuple[list[Any], list[Any], bool]:
        single = [await c.score(r) for r in reqs]
        batched = await c.score_batch(reqs)
        return single, batched, await c.batch_available()

    single, batched, used_batch = run(_using(client, both))
    assert used_batch and client.capabilities is not None and "score_batch" in client.capabilities
    unbatched = run(_using(ScoreClient(server_url, batch=False), lambda c: c.score_batch(reqs)))
    assert len(batched) == len(unbatched) == len(reqs)
    for a, b, c in zip(single, batched, unbatched, strict=True):
        assert isinstance(b, np.ndarray) and isinstance(c, np.ndarray)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-4)
    assert batched[-1].shape == (0,)
    # Leave-one-out signal: without the memory, "Pepper" is less likely.
    assert single[0].sum() > single[1].sum()


def test_score_batch_keeps_good_requests_when_one_fails(
    server_url: str, requests_: list[ScoreRequest]
) -> None:
    oov = ScoreRequest.build([1, 10**7, 2, 3], [(1, 3)])  # only the server can tell
    bad_span = ScoreRequest.build(requests_[2].prompt, [(0, 2)])  # refused locally
    reqs = [requests_[0], oov, requests_[1], bad_span]
    for batch in (True, False):
        client = ScoreClient(server_url, batch=batch)
        out = run(_using(client, lambda c: c.score_batch(reqs)))
        assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray)
        assert isinstance(out[1], ScoringAPIError) and "10000000" in out[1].message
        assert isinstance(out[3], BackendPromptError)
        assert client.stats.failed_calls == 2


def test_real_4xx_maps_to_scoring_api_error(server_url: str) -> None:
    client = ScoreClient(server_url)
    with pytest.raises(ScoringAPIError) as info:
        run(_using(client, lambda c: c.score(ScoreRequest.build([1, 10**7, 2], [(1, 3)]))))
    err = info.value
    assert err.status_code == 400 and err.backend == "score"
    assert "10000000" in err.message and "vocabulary" in err.message
    assert str(err) == f"score API HTTP 400: {err.message}"
    assert client.stats.retries == 0 and client.stats.failed_calls == 1


def test_too_long_prompt_is_a_real_400(server_url: str, engine: Any) -> None:
    n = int(engine.max_len) + 1
    req = ScoreRequest.build([1] * n, [(1, 2)])
    with pytest.raises(ScoringAPIError) as info:
        run(_using(ScoreClient(server_url), lambda c: c.score(req)))
    assert info.value.status_code == 400 and str(n) in info.value.message


def test_unknown_path_is_404(server_url: str) -> None:
    client = ScoreClient(server_url + "/nope")
    with pytest.raises(ScoringAPIError) as info:
        run(_using(client, lambda c: c.score(ScoreRequest.build([1, 2, 3], [(1, 3)]))))
    assert info.value.status_code == 404


def test_v1_base_url_reaches_v1_score(server_url: str, requests_: list[ScoreRequest]) -> None:
    a = run(_using(ScoreClient(server_url), lambda c: c.score(requests_[2])))
    b = run(_using(ScoreClient(server_url + "/v1/"), lambda c: c.score(requests_[2])))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_complete_generates_text(server_url: str, tokenizer: Any) -> None:
    prefix = chatml(tokenizer, [SYSTEM, ("user", "Say hello.")]).prompt
    prompt = (*prefix, tokenizer.im_start_id, *tokenizer.encode("assistant\n"))
    req = CompletionRequest(
        prompt=prompt, max_tokens=8, temperature=0.0, stop_token_ids=(tokenizer.im_end_id,), seed=1
    )
    text = run(_using(ScoreClient(server_url), lambda c: c.complete(req)))
    assert isinstance(text, str) and text.strip()


def test_no_server_is_backend_unavailable() -> None:
    from scoring_kit._exceptions import BackendUnavailable
    from scoring_kit.backends._retry import RetryPolicy

    async def no_wait(_: float) -> None:
        return None

    client = ScoreClient(
        "http://127.0.0.1:9", retry=RetryPolicy(max_attempts=2, sleep=no_wait), timeout=5.0
    )
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:9.*ConnectError"):
        run(_using(client, lambda c: c.score(ScoreRequest.build([1, 2], [(1, 2)]))))
    assert client.stats.retries == 1


def test_auto_detection_picks_score(server_url: str, caplog: pytest.LogCaptureFixture) -> None:
    d = run(detect_backend(server_url))
    assert d.backend == "score" and d.reason and d.model
    caplog.set_level(logging.INFO, logger="scoring_kit")
    scorer = make_scorer(server_url)
    assert isinstance(scorer, ScoreClient) and isinstance(scorer, Scorer)
    assert scorer.detection is not None and scorer.detection.backend == "score"
    assert scorer.model == d.model
    assert "scoring backend 'score'" in caplog.text and d.reason in caplog.text


def test_make_scorer_sync_then_async_use(server_url: str, requests_: list[ScoreRequest]) -> None:
    """make_scorer probes on its own loop; the scorer then works on the caller's loops."""
    scorer = make_scorer(server_url, concurrency=2)
    first = run(scorer.score(requests_[2]))
    second = run(scorer.score(requests_[2]))
    run(scorer.aclose())
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)

    async def inside() -> Any:
        s = await amake_scorer(server_url, backend="vllm")
        try:
            return s, await s.score(requests_[2])
        finally:
            await s.aclose()

    with pytest.warns(UserWarning, match="prefix cache"):
        s, third = run(inside())
    assert s.name == "vllm"
    np.testing.assert_allclose(first, third, rtol=0, atol=1e-3)


def test_errors_are_backend_errors(server_url: str) -> None:
    with pytest.raises(BackendError):
        run(
            _using(
                ScoreClient(server_url), lambda c: c.score(ScoreRequest.build([1, -5], [(1, 2)]))
            )
        )


def test_make_scorer_without_url_is_local(engine: Any, requests_: list[ScoreRequest]) -> None:
    from scoring_kit.backends.local import LocalScorer

    scorer = make_scorer(None, engine=engine)
    assert isinstance(scorer, LocalScorer) and scorer.name == "local"
    assert scorer.detection.backend == "local"  # type: ignore[attr-defined]
    explicit = make_scorer("http://127.0.0.1:9", backend="local", engine=engine)
    assert isinstance(explicit, LocalScorer)
