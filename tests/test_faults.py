"""Faults a real server cannot be made to produce on demand, through ``httpx.MockTransport``:
5xx bursts, 429 + Retry-After, timeouts, connection resets, truncated or garbled bodies,
wrong score counts, per-request failures inside a batch, and API-key hygiene.

No test waits for real: the retry policy gets a recording ``sleep``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest

from scoring_kit._exceptions import (
    BackendError,
    BackendUnavailable,
    PromptError,
    ProtocolError,
    ScoringAPIError,
)
from scoring_kit.backends._common import BackendPromptError
from scoring_kit.backends._retry import RetryPolicy, parse_retry_after
from scoring_kit.backends.base import CompletionRequest, ScoreRequest
from scoring_kit.backends.http import ScoreClient

URL = "http://127.0.0.1:9"
KEY = "sk-test-SECRET-4f8a2c"
REQ = ScoreRequest.build([1, 2, 3, 4, 5, 6], [(1, 3), (4, 6)])

Handler = Callable[[httpx.Request], httpx.Response]


class Sleeps(list[float]):
    """Records the waits a policy asks for; never sleeps."""

    async def __call__(self, delay: float) -> None:
        self.append(delay)


def scores_body(n: int, base: float = -1.0) -> dict[str, Any]:
    return {"scores": [{"range_index": i, "total_logprob": base - i} for i in range(n)]}


def make(
    handler: Handler,
    sleeps: Sleeps | None = None,
    *,
    max_attempts: int = 5,
    **kw: Any,
) -> ScoreClient:
    policy = RetryPolicy(
        max_attempts=max_attempts, jitter=0.0, sleep=sleeps if sleeps is not None else Sleeps()
    )
    kw.setdefault("batch", False)
    return ScoreClient(URL, transport=httpx.MockTransport(handler), retry=policy, **kw)


def sequence(*steps: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler that plays ``steps`` in order (the last one repeats) and logs requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = steps[min(len(seen) - 1, len(steps) - 1)]
        if isinstance(step, Exception):
            raise step
        return step

    return handler, seen


def ok() -> httpx.Response:
    return httpx.Response(200, json=scores_body(2))


# --------------------------------------------------------------------------- retries


def test_5xx_burst_then_success_retries_and_counts() -> None:
    sleeps = Sleeps()
    handler, seen = sequence(
        httpx.Response(502, text="Bad Gateway"),
        httpx.Response(503, json={"error": "overloaded"}),
        httpx.Response(504, text="Gateway Timeout"),
        ok(),
    )
    client = make(handler, sleeps)
    out = asyncio.run(client.score(REQ))
    np.testing.assert_array_equal(out, [-1.0, -2.0])
    assert out.dtype == np.float64
    assert len(seen) == 4
    assert client.stats.retries == 3
    assert client.stats.calls == 1 and client.stats.failed_calls == 0
    assert client.stats.prompt_tokens == len(REQ.prompt)
    assert sleeps == [0.5, 1.0, 2.0]  # exponential backoff, no jitter


def test_5xx_until_exhausted_raises_api_error() -> None:
    sleeps = Sleeps()
    handler, seen = sequence(httpx.Response(503, json={"error": "overloaded"}))
    client = make(handler, sleeps)
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(client.score(REQ))
    err = info.value
    assert err.status_code == 503 and err.message == "overloaded"
    assert str(err).startswith("score API HTTP 503: overloaded")
    assert "gave up after 5 attempts" in str(err)
    assert len(seen) == 5 and len(sleeps) == 4
    assert client.stats.retries == 4 and client.stats.failed_calls == 1


def test_429_retry_after_seconds_is_honoured() -> None:
    sleeps = Sleeps()
    handler, _ = sequence(
        httpx.Response(429, headers={"retry-after": "7"}, json={"error": "slow down"}),
        httpx.Response(429, headers={"retry-after": "120"}, json={"error": "slow down"}),
        ok(),
    )
    client = make(handler, sleeps)
    asyncio.run(client.score(REQ))
    assert sleeps == [7.0, 30.0]  # the second is capped at max_delay
    assert client.stats.retries == 2


def test_429_retry_after_http_date_is_honoured() -> None:
    sleeps = Sleeps()
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    handler, _ = sequence(httpx.Response(429, headers={"retry-after": when}), ok())
    client = make(handler, sleeps)
    asyncio.run(client.score(REQ))
    assert len(sleeps) == 1 and 15.0 <= sleeps[0] <= 20.0


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:42 GMT", now=now) == 42.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("later") is None
    assert parse_retry_after(None) is None


def test_backoff_jitter_bounds() -> None:
    full = RetryPolicy(jitter=1.0, rng=random.Random(1))
    equal = RetryPolicy(jitter=0.5, rng=random.Random(2))
    for retry in range(1, 12):
        d = min(30.0, 0.5 * 2 ** (retry - 1))
        assert 0.0 <= full.backoff(retry) <= d
        assert d / 2 <= equal.backoff(retry) <= d
    assert RetryPolicy(jitter=0.0).backoff(20) == 30.0
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.PoolTimeout("no connection available"),
        httpx.ConnectError("[Errno 111] Connection refused"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_failures_retried_then_unavailable(exc: Exception) -> None:
    sleeps = Sleeps()
    handler, seen = sequence(exc)
    client = make(handler, sleeps)
    with pytest.raises(BackendUnavailable) as info:
        asyncio.run(client.score(REQ))
    text = str(info.value)
    assert URL in text and type(exc).__name__ in text and "5 attempt" in text
    assert isinstance(info.value.__cause__, httpx.TransportError)
    assert len(seen) == 5 and client.stats.retries == 4 and client.stats.failed_calls == 1


def test_timeout_then_success() -> None:
    handler, seen = sequence(httpx.ReadTimeout("timed out"), ok())
    client = make(handler)
    np.testing.assert_array_equal(asyncio.run(client.score(REQ)), [-1.0, -2.0])
    assert len(seen) == 2 and client.stats.retries == 1


def test_connection_reset_mid_response_is_retried() -> None:
    handler, seen = sequence(
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        ok(),
    )
    client = make(handler)
    np.testing.assert_array_equal(asyncio.run(client.score(REQ)), [-1.0, -2.0])
    assert len(seen) == 3 and client.stats.retries == 2


@pytest.mark.parametrize(
    "content",
    [
        b'{"scores": [{"range_index": 0, "total_lo',  # truncated
        b"<html><body>502 Bad Gateway</body></html>",  # garbled
        b"",  # empty
    ],
    ids=["truncated", "html", "empty"],
)
def test_malformed_json_retried_then_success(content: bytes) -> None:
    handler, seen = sequence(
        httpx.Response(200, content=content, headers={"content-type": "application/json"}),
        ok(),
    )
    client = make(handler)
    np.testing.assert_array_equal(asyncio.run(client.score(REQ)), [-1.0, -2.0])
    assert len(seen) == 2 and client.stats.retries == 1


def test_malformed_json_until_exhausted_is_protocol_error() -> None:
    handler, seen = sequence(httpx.Response(200, content=b'{"scores": [{"range_'))
    client = make(handler, max_attempts=3)
    with pytest.raises(ProtocolError, match="not valid JSON") as info:
        asyncio.run(client.score(REQ))
    assert "3 attempt" in str(info.value) and len(seen) == 3


def test_nan_and_infinity_literals_are_accepted() -> None:
    body = (
        b'{"scores": [{"range_index": 0, "total_logprob": -Infinity}, '
        b'{"range_index": 1, "total_logprob": -2.5}]}'
    )
    handler, _ = sequence(httpx.Response(200, content=body))
    out = asyncio.run(make(handler).score(REQ))
    assert out[0] == -np.inf and out[1] == -2.5


# --------------------------------------------------------------------------- errors


def test_2xx_with_error_field_is_api_error_not_retried() -> None:
    handler, seen = sequence(httpx.Response(200, json={"error": "model is reloading"}))
    client = make(handler)
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(client.score(REQ))
    assert str(info.value) == "score API error: model is reloading"
    assert info.value.status_code == 200 and info.value.message == "model is reloading"
    assert len(seen) == 1 and client.stats.retries == 0


def test_2xx_with_null_error_field_is_fine() -> None:
    handler, _ = sequence(httpx.Response(200, json={**scores_body(2), "error": None}))
    np.testing.assert_array_equal(asyncio.run(make(handler).score(REQ)), [-1.0, -2.0])


def test_wrong_number_of_scores_is_protocol_error() -> None:
    handler, seen = sequence(httpx.Response(200, json=scores_body(1)))
    client = make(handler)
    with pytest.raises(ProtocolError) as info:
        asyncio.run(client.score(REQ))
    assert "expected 2 scores" in str(info.value) and "returned 1" in str(info.value)
    assert len(seen) == 1 and client.stats.failed_calls == 1


@pytest.mark.parametrize(
    "body",
    [
        {
            "scores": [
                {"range_index": 1, "total_logprob": -1.0},
                {"range_index": 0, "total_logprob": -2.0},
            ]
        },
        {
            "scores": [
                {"range_index": 0, "total_logprob": None},
                {"range_index": 1, "total_logprob": -2.0},
            ]
        },
        {"scores": "nope"},
        {"result": []},
        [1, 2],
    ],
    ids=["range-order", "null-total", "scores-not-list", "no-scores", "not-object"],
)
def test_bad_score_bodies_are_protocol_errors(body: Any) -> None:
    handler, _ = sequence(httpx.Response(200, json=body))
    with pytest.raises(ProtocolError):
        asyncio.run(make(handler).score(REQ))


@pytest.mark.parametrize(
    ("status", "response", "message"),
    [
        (400, {"error": "score_ranges[0] starts at 0"}, "score_ranges[0] starts at 0"),
        (400, {"error": {"message": "bad span", "type": "Bad Request", "code": 400}}, "bad span"),
        (400, {"object": "error", "message": "old vLLM style", "code": 400}, "old vLLM style"),
        (404, {"detail": "Not Found"}, "Not Found"),
        (401, {"error": "invalid api key"}, "invalid api key"),
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}, "field required"),
        (413, "Request Entity Too Large", "Request Entity Too Large"),
        (400, "", "Bad Request"),
    ],
    ids=["flat", "nested", "message", "detail", "401", "422-list", "text", "empty"],
)
def test_4xx_is_not_retried_and_maps_message(status: int, response: Any, message: str) -> None:
    kwargs: dict[str, Any] = (
        {"json": response} if isinstance(response, dict) else {"text": response}
    )
    handler, seen = sequence(httpx.Response(status, **kwargs))
    client = make(handler)
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(client.score(REQ))
    err = info.value
    assert err.status_code == status
    assert message in err.message
    assert str(err).startswith(f"score API HTTP {status}: {err.message}")
    if status == 401:  # a refusal says whether a key was sent
        assert "wants an API key" in str(err)
    else:
        assert str(err) == f"score API HTTP {status}: {err.message}"
    assert len(seen) == 1 and client.stats.retries == 0


def test_long_text_error_body_is_truncated() -> None:
    handler, _ = sequence(httpx.Response(500, text="x" * 5000))
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(make(handler, max_attempts=1).score(REQ))
    assert len(info.value.message) < 700 and "5000 bytes" in info.value.message


# --------------------------------------------------------------------------- requests


def test_request_shape_and_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok()

    client = make(handler, api_key=KEY, model="smol")
    req = ScoreRequest.build([7, 8, 9, 10], [(1, 2), (2, 4)], priority=5)
    asyncio.run(client.score(req))
    (request,) = seen
    assert request.method == "POST" and str(request.url) == f"{URL}/score"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "model": "smol",
        "prompt": [7, 8, 9, 10],
        "score_ranges": [[1, 2], [2, 4]],
        "logprobs": 1,
        "priority": 5,
    }


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORING_KIT_API_KEY", KEY)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok()

    client = make(handler)
    asyncio.run(client.score(REQ))
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(client)


def test_no_key_sends_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)
    handler, seen = sequence(ok())
    asyncio.run(make(handler).score(REQ))
    assert "authorization" not in seen[0].headers


def test_no_ranges_skips_the_round_trip() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    client = make(handler)
    out = asyncio.run(client.score(ScoreRequest.build([1, 2, 3], [])))
    assert out.shape == (0,) and out.dtype == np.float64
    assert client.stats.calls == 0


def test_bad_span_is_refused_locally() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    client = make(handler)
    with pytest.raises(BackendPromptError, match="position 0 has no prediction") as info:
        asyncio.run(client.score(ScoreRequest.build([1, 2, 3], [(0, 2)])))
    assert isinstance(info.value, PromptError) and isinstance(info.value, BackendError)


def test_client_survives_successive_event_loops() -> None:
    """The sync facade runs each call on a fresh loop; the pool must follow."""
    handler, seen = sequence(ok())
    client = make(handler)
    for _ in range(3):
        asyncio.run(client.score(REQ))
    asyncio.run(client.aclose())
    assert len(seen) == 3


def test_complete_request_and_text() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "hello there"}]})

    client = make(handler, model="m")
    req = CompletionRequest(prompt=(1, 2, 3), max_tokens=8, stop_token_ids=(2,), seed=11)
    assert asyncio.run(client.complete(req)) == "hello there"
    body = json.loads(seen[0].content)
    assert str(seen[0].url) == f"{URL}/completions"
    assert body == {
        "model": "m",
        "prompt": [1, 2, 3],
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.95,
        "top_k": 20,
        "stop_token_ids": [2],
        "skip_special_tokens": False,
        "priority": 5,
        "seed": 11,
    }


def test_complete_without_text_is_protocol_error() -> None:
    handler, _ = sequence(httpx.Response(200, json={"choices": []}))
    with pytest.raises(ProtocolError, match="choices"):
        asyncio.run(make(handler).complete(CompletionRequest(prompt=(1, 2))))


# --------------------------------------------------------------------------- train


def test_train_sends_key_and_returns_job_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"job_id": "job-42"})

    client = make(handler, api_key=KEY)
    samples = [{"context_ids": [1, 2], "continuation_ids": [3]}]
    assert asyncio.run(client.train(samples)) == "job-42"
    assert str(seen[0].url) == f"{URL}/train"
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(seen[0].content) == {"training_data": {"samples": samples}}


def test_train_without_job_id_is_protocol_error() -> None:
    handler, _ = sequence(httpx.Response(200, json={"status": "queued"}))
    with pytest.raises(ProtocolError, match="job_id"):
        asyncio.run(make(handler).train([{"context_ids": [1], "continuation_ids": [2]}]))


def test_train_is_not_idempotent() -> None:
    """A 502 may mean the job started: not retried. A 503 or a refused connection: retried."""
    handler, seen = sequence(httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(ScoringAPIError):
        asyncio.run(make(handler).train([{"context_ids": [1], "continuation_ids": [2]}]))
    assert len(seen) == 1
    handler, seen = sequence(httpx.ReadTimeout("timed out"))
    with pytest.raises(BackendUnavailable):
        asyncio.run(make(handler).train([{"context_ids": [1], "continuation_ids": [2]}]))
    assert len(seen) == 1
    handler, seen = sequence(
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": "busy"}),
        httpx.Response(200, json={"job_id": "j"}),
    )
    assert asyncio.run(make(handler).train([{"context_ids": [1], "continuation_ids": [2]}])) == "j"
    assert len(seen) == 3
    with pytest.raises(ValueError, match="no samples"):
        asyncio.run(make(handler).train([]))


# --------------------------------------------------------------------------- batches


def _prompt_handler(fail_prompt_head: int) -> tuple[Handler, list[list[int]]]:
    order: list[list[int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        order.append(body["prompt"])
        if body["prompt"][0] == fail_prompt_head:
            return httpx.Response(400, json={"error": f"token id {fail_prompt_head} unknown"})
        return httpx.Response(
            200, json=scores_body(len(body["score_ranges"]), -float(body["prompt"][0]))
        )

    return handler, order


def test_score_batch_without_batch_endpoint_keeps_the_others() -> None:
    handler, order = _prompt_handler(fail_prompt_head=13)
    client = make(handler, batch=False, concurrency=2)
    reqs = [ScoreRequest.build([h, 2, 3, 4], [(1, 4)]) for h in (10, 11, 12, 13, 14)]
    reqs.append(ScoreRequest.build([15, 2], [(0, 1)]))  # refused locally
    out = asyncio.run(client.score_batch(reqs))
    assert order[0] == [10, 2, 3, 4]  # the baseline goes first
    assert isinstance(out[3], ScoringAPIError) and out[3].status_code == 400
    assert isinstance(out[5], BackendPromptError)
    for i, h in enumerate((10, 11, 12, 14)):
        res = out[i if i < 3 else 4]
        assert isinstance(res, np.ndarray)
        np.testing.assert_array_equal(res, [-float(h)])
    assert client.stats.failed_calls == 2 and client.stats.calls == 6


def _batch_server(
    *, fail_head: int | None = None, batch_status: int = 200, caps: list[str] | None = None
) -> tuple[Handler, list[tuple[str, Any]]]:
    log: list[tuple[str, Any]] = []

    def result(item: dict[str, Any]) -> dict[str, Any]:
        if item["prompt"][0] == fail_head:
            return {"error": f"prompt {fail_head} is too long"}
        return scores_body(len(item["score_ranges"]), -float(item["prompt"][0]))

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            log.append((path, None))
            return httpx.Response(
                200, json={"status": "ok", "server": "scoring_kit", "capabilities": caps or []}
            )
        body = json.loads(request.content)
        if path == "/score":
            log.append((path, body["prompt"][0]))
            return httpx.Response(200, json=result(body))
        if path == "/score/batch":
            heads = [r["prompt"][0] for r in body["requests"]]
            log.append((path, heads))
            if batch_status != 200:
                return httpx.Response(batch_status, json={"detail": "Not Found"})
            assert body["model"] == "default"
            assert all("model" not in r for r in body["requests"])
            return httpx.Response(200, json={"results": [result(r) for r in body["requests"]]})
        return httpx.Response(404, json={"detail": "Not Found"})

    return handler, log


def test_score_batch_uses_batch_endpoint_and_keeps_the_others() -> None:
    handler, log = _batch_server(fail_head=13, caps=["score", "score_batch"])
    client = make(handler, batch="auto", batch_size=2, concurrency=1)
    reqs = [ScoreRequest.build([h, 2, 3], [(1, 3)]) for h in range(10, 16)]
    out = asyncio.run(client.score_batch(reqs))
    assert log[0] == ("/health", None)
    assert log[1] == ("/score", 10)  # baseline alone, first
    assert [entry for entry in log[2:]] == [
        ("/score/batch", [11, 12]),
        ("/score/batch", [13, 14]),
        ("/score/batch", [15]),
    ]
    err = out[3]
    assert isinstance(err, ScoringAPIError) and str(err) == "score API error: prompt 13 is too long"
    for i, h in enumerate(range(10, 16)):
        if h != 13:
            np.testing.assert_array_equal(out[i], [-float(h)])
    assert client.stats.calls == 6 and client.stats.failed_calls == 1
    # The capability probe happens once.
    asyncio.run(client.score_batch(reqs[:2]))
    assert sum(1 for p, _ in log if p == "/health") == 1


def test_score_batch_chunk_failure_fills_its_slots_only() -> None:
    calls = {"n": 0}
    inner, _ = _batch_server(caps=["score_batch"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/score/batch":
            calls["n"] += 1
            if calls["n"] == 1:
                return httpx.Response(400, json={"error": "chunk too large"})
        return inner(request)

    client = make(handler, batch=True, batch_size=2, concurrency=1)
    reqs = [ScoreRequest.build([h, 2, 3], [(1, 3)]) for h in range(10, 15)]
    out = asyncio.run(client.score_batch(reqs))
    assert isinstance(out[1], ScoringAPIError) and isinstance(out[2], ScoringAPIError)
    for i in (0, 3, 4):
        assert isinstance(out[i], np.ndarray)


def test_score_batch_wrong_result_count_is_protocol_error_per_slot() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/score/batch":
            return httpx.Response(200, json={"results": [scores_body(1)]})
        return httpx.Response(200, json=scores_body(1))

    client = make(handler, batch=True)
    reqs = [ScoreRequest.build([h, 2, 3], [(1, 3)]) for h in range(4)]
    out = asyncio.run(client.score_batch(reqs))
    assert isinstance(out[0], np.ndarray)
    assert all(isinstance(r, ProtocolError) and "expected 3 results" in str(r) for r in out[1:])


def test_score_batch_falls_back_when_batch_endpoint_is_missing() -> None:
    handler, log = _batch_server(caps=["score_batch"], batch_status=404)
    client = make(handler, batch="auto", batch_size=8)
    reqs = [ScoreRequest.build([h, 2, 3], [(1, 3)]) for h in range(10, 14)]
    out = asyncio.run(client.score_batch(reqs))
    assert all(isinstance(r, np.ndarray) for r in out)
    assert [p for p, _ in log].count("/score/batch") == 1
    assert [h for p, h in log if p == "/score"] == [10, 11, 12, 13]
    assert client.stats.calls == 4 and client.stats.failed_calls == 0


def test_score_batch_without_capability_uses_score() -> None:
    handler, log = _batch_server(caps=["score"])
    client = make(handler, batch="auto")
    reqs = [ScoreRequest.build([h, 2, 3], [(1, 3)]) for h in range(10, 13)]
    out = asyncio.run(client.score_batch(reqs))
    assert all(isinstance(r, np.ndarray) for r in out)
    assert "/score/batch" not in [p for p, _ in log]


def test_score_batch_health_unreachable_means_no_batch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=scores_body(1))

    client = make(handler, batch="auto")
    out = asyncio.run(client.score_batch([ScoreRequest.build([1, 2], [(1, 2)])] * 3))
    assert all(isinstance(r, np.ndarray) for r in out)
    assert client.capabilities == frozenset()


# --------------------------------------------------------------------------- secrets


def _all_text(exc: BaseException) -> str:
    parts = [str(exc), repr(exc)]
    for attr in ("message",):
        if hasattr(exc, attr):
            parts.append(str(getattr(exc, attr)))
    return "\n".join(parts)


@pytest.mark.parametrize(
    "step",
    [
        httpx.Response(401, json={"error": f"invalid key Bearer {KEY}"}),
        httpx.Response(500, text=f"internal error; headers: authorization=Bearer {KEY}"),
        httpx.Response(200, json={"error": {"message": f"rejected {KEY}"}}),
        httpx.Response(200, content=f'{{"echo": "{KEY}", "trunc'.encode()),
        httpx.Response(429, json={"error": f"rate limit for {KEY}"}),
    ],
    ids=["401-echo", "500-text-echo", "2xx-error-echo", "malformed-echo", "429-echo"],
)
def test_api_key_never_appears_in_errors_or_logs(
    step: httpx.Response, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return step

    client = make(handler, api_key=KEY, max_attempts=2)
    with pytest.raises(BackendError) as info:
        asyncio.run(client.score(REQ))
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent
    assert KEY not in _all_text(info.value)
    assert "<redacted>" in str(info.value)
    assert KEY not in repr(client) and "api_key=<set>" in repr(client)
    assert KEY not in caplog.text


def test_api_key_absent_from_transport_error_and_batch_slots(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    handler, _ = sequence(httpx.ConnectError("[Errno 111] Connection refused"))
    client = make(handler, api_key=KEY, max_attempts=2)
    with pytest.raises(BackendUnavailable) as info:
        asyncio.run(client.score(REQ))
    assert KEY not in _all_text(info.value)
    out = asyncio.run(client.score_batch([REQ, REQ]))
    assert all(isinstance(r, BackendUnavailable) and KEY not in _all_text(r) for r in out)
    assert KEY not in caplog.text


def test_no_real_sleep_happens() -> None:
    handler, _ = sequence(httpx.Response(503), ok())
    client = ScoreClient(
        URL,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(base_delay=10.0, sleep=Sleeps()),
        batch=False,
    )
    t0 = time.perf_counter()
    asyncio.run(client.score(REQ))
    assert time.perf_counter() - t0 < 2.0


def test_approximate_matrices_record_failed_rows_as_nan_never_zero() -> None:
    """Every ablation call of a windowed / hierarchical run fails with 503 after retries:
    each affected row is NaN with its error, and the baseline (which succeeded) is kept."""
    from pathlib import Path

    from scoring_kit.context.io import load_context
    from scoring_kit.scoring.approx import score_memories_hierarchical, score_memories_windowed

    ctx = load_context(Path(__file__).resolve().parents[1] / "data"
                       / "sample_conversation.tokens.jsonl")
    full = len(ctx.wire_prompt())

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if len(body["prompt"]) == full:  # the baseline
            return httpx.Response(200, json=scores_body(len(body["score_ranges"])))
        return httpx.Response(503, text="overloaded")

    for run in (lambda c: score_memories_windowed(ctx, c, window=2),
                lambda c: score_memories_hierarchical(ctx, c, group_size=1)):
        client = make(handler, max_attempts=2)
        try:
            m = run(client)
        finally:
            asyncio.run(client.aclose())
        assert m.approximate and m.failed == list(m.keys)
        assert np.isnan(m.without).all() and np.isnan(m.divergence).all()
        assert all(e is not None and "503" in e for e in m.errors), m.errors
        assert np.isfinite(m.baseline).all()
