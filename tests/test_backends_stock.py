"""Stock-server backends (vLLM, SGLang) and backend detection.

* Recorded response shapes (``tests/fixtures``, exactly as ``SERVERS.md`` documents them)
  are parsed through the scorers over ``httpx.MockTransport`` and their sums checked.
* Detection is run against transports imitating vLLM, a patched (seed-protocol) vLLM,
  SGLang, llama.cpp, TensorRT-LLM, Ollama and a server that knows nothing.
* Against the REAL embedded server (which speaks all three protocols) the three HTTP
  backends must give the same totals, within 1e-3, as each other and the engine.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from scoring_kit import _exceptions
from scoring_kit._exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    PromptError,
    ProtocolError,
    ScoringAPIError,
)
from scoring_kit.backends._common import BackendPromptError
from scoring_kit.backends._retry import RetryPolicy
from scoring_kit.backends.auto import (
    BACKENDS,
    Detection,
    DetectionError,
    detect_backend,
    make_scorer,
)
from scoring_kit.backends.base import CompletionRequest, Scorer, ScoreRequest
from scoring_kit.backends.http import ScoreClient
from scoring_kit.backends.sglang import SGLangScorer, sum_input_token_logprobs
from scoring_kit.backends.vllm import CostWarning, VLLMScorer, sum_prompt_logprobs

FIXTURES = Path(__file__).parent / "fixtures"
URL = "http://127.0.0.1:9"

#: The prompt the fixtures were recorded for, by ``scripts/refresh_fixtures.py`` against a real
#: vLLM (SmolLM2 ids of "<|im_start|>user\nThe quick brown fox jumps over the lazy dog.").
PROMPT: list[int] = json.loads((FIXTURES / "fixture_prompt.json").read_text())["prompt"]
#: Spans; the first starts at 2, so SGLang was asked with logprob_start_len = 1.
RANGES = [(2, 5), (6, 13)]
_VLLM_MODELS = json.loads((FIXTURES / "vllm_models.json").read_text())["data"][0]
#: The model card the real server sent.
MODEL_ID: str = _VLLM_MODELS["id"]
MAX_LEN: int = _VLLM_MODELS["max_model_len"]
#: Per-position logprob of PROMPT[t] (t = 1..12), as recorded (both fixtures carry them).
TOKEN_LP = {
    t: entry[str(PROMPT[t])]["logprob"]
    for t, entry in enumerate(
        json.loads((FIXTURES / "vllm_completions_prompt_logprobs.json").read_text())["choices"][
            0
        ]["prompt_logprobs"]
    )
    if t >= 1
}
EXPECTED = [sum(TOKEN_LP[t] for t in range(a, b)) for a, b in RANGES]

Handler = Callable[[httpx.Request], httpx.Response]


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def not_found(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, json=load("vllm_score_404.json"))


def router(
    routes: Mapping[tuple[str, str], Any], seen: list[httpx.Request] | None = None
) -> Handler:
    """Answer ``(method, path)`` from ``routes`` (a body, a Response or a callable); else 404."""

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        answer = routes.get((request.method, request.url.path))
        if answer is None:
            return not_found(request)
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)

    return handler


def mock(
    routes: Mapping[tuple[str, str], Any], seen: list[httpx.Request] | None = None
) -> httpx.MockTransport:
    return httpx.MockTransport(router(routes, seen))


NO_RETRY = RetryPolicy.never()
REQ = ScoreRequest.build(PROMPT, RANGES, priority=None)


# --------------------------------------------------------------------------- vLLM


def test_vllm_fixture_sums() -> None:
    seen: list[httpx.Request] = []
    transport = mock(
        {
            ("GET", "/v1/models"): load("vllm_models.json"),
            ("POST", "/v1/completions"): load("vllm_completions_prompt_logprobs.json"),
        },
        seen,
    )
    scorer = VLLMScorer(URL + "/v1/", transport=transport, retry=NO_RETRY, warn=False)
    out = asyncio.run(scorer.score(REQ))
    np.testing.assert_allclose(out, EXPECTED, rtol=0, atol=1e-12)
    assert out.dtype == np.float64
    # Model and context come from /v1/models; the body is the documented one.
    assert scorer.model == MODEL_ID and scorer.max_model_len == MAX_LEN
    body = json.loads(seen[-1].content)
    assert str(seen[-1].url) == URL + "/v1/completions"
    assert body == {
        "model": MODEL_ID,
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
        "stream": False,
    }


def test_vllm_reads_the_prompt_token_not_the_top_one() -> None:
    """With ``prompt_logprobs: 0`` real vLLM 0.32 sends only the prompt token (with its rank,
    often > 1); with ``k > 0`` the top-k come beside it. The reader takes the prompt token's
    key whatever else the entry holds."""
    data = load("vllm_completions_prompt_logprobs.json")["choices"][0]["prompt_logprobs"]
    for t in range(1, len(PROMPT)):
        assert list(data[t]) == [str(PROMPT[t])] and data[t][str(PROMPT[t])]["rank"] >= 1
    ranked_low = [t for t in range(1, len(PROMPT)) if data[t][str(PROMPT[t])]["rank"] > 1]
    assert ranked_low
    t = ranked_low[0]
    with_top = copy.deepcopy(data)
    with_top[t] = {"99": {"logprob": -0.01, "rank": 1, "decoded_token": "x"}, **with_top[t]}
    np.testing.assert_allclose(sum_prompt_logprobs(with_top, PROMPT, [(t, t + 1)]), [TOKEN_LP[t]])


def test_vllm_minus_9999_is_minus_inf() -> None:
    data = copy.deepcopy(load("vllm_completions_prompt_logprobs.json")["choices"][0])
    data["prompt_logprobs"][3][str(PROMPT[3])]["logprob"] = -9999.0
    out = sum_prompt_logprobs(data["prompt_logprobs"], PROMPT, RANGES)
    assert out[0] == -math.inf and math.isclose(out[1], EXPECTED[1])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda pl: pl.pop(), "expected 13 prompt_logprobs entries"),
        (lambda pl: pl.__setitem__(4, {"99": {"logprob": -1.0}}), f"no entry for prompt token {PROMPT[4]}"),
        (lambda pl: pl.__setitem__(4, None), "expected a map"),
        (lambda pl: pl[4][str(PROMPT[4])].__setitem__("logprob", None), "not a number"),
    ],
    ids=["short", "misaligned", "null-entry", "null-logprob"],
)
def test_vllm_bad_prompt_logprobs_are_protocol_errors(mutate: Any, match: str) -> None:
    pl = copy.deepcopy(
        load("vllm_completions_prompt_logprobs.json")["choices"][0]["prompt_logprobs"]
    )
    mutate(pl)
    with pytest.raises(ProtocolError, match=match):
        sum_prompt_logprobs(pl, PROMPT, RANGES)
    with pytest.raises(ProtocolError, match="ignored 'prompt_logprobs'"):
        sum_prompt_logprobs(None, PROMPT, RANGES)


def test_vllm_prompt_too_long_is_refused_locally_and_recorded_in_batch() -> None:
    seen: list[httpx.Request] = []
    models = copy.deepcopy(load("vllm_models.json"))
    models["data"][0]["max_model_len"] = 12

    def completions(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["prompt"])
        data = load("vllm_completions_prompt_logprobs.json")
        data["choices"][0]["prompt_logprobs"] = data["choices"][0]["prompt_logprobs"][:n]
        return httpx.Response(200, json=data)

    transport = mock(
        {("GET", "/v1/models"): models, ("POST", "/v1/completions"): completions}, seen
    )
    scorer = VLLMScorer(URL, transport=transport, retry=NO_RETRY, warn=False)
    with pytest.raises(BackendPromptError) as info:
        asyncio.run(scorer.score(REQ))
    err = info.value
    assert isinstance(err, PromptError) and isinstance(err, BackendError)
    assert "13 tokens" in str(err) and "max_model_len 12" in str(err) and "at most 11" in str(err)
    assert (err.limit, err.actual) == (11, 13)
    assert all(r.url.path != "/v1/completions" for r in seen)
    short = ScoreRequest.build(PROMPT[:5], [(2, 5)])
    out = asyncio.run(scorer.score_batch([short, REQ]))
    assert isinstance(out[1], BackendPromptError) and isinstance(out[0], np.ndarray)
    np.testing.assert_allclose(out[0], np.array([TOKEN_LP[2] + TOKEN_LP[3] + TOKEN_LP[4]]))


def test_vllm_priority_rejected_once_then_dropped() -> None:
    bodies: list[dict[str, Any]] = []

    def completions(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if "priority" in body:
            return httpx.Response(
                400,
                json={
                    "object": "error",
                    "message": "V1 does not support priority yet.",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                },
            )
        return httpx.Response(200, json=load("vllm_completions_prompt_logprobs.json"))

    transport = mock(
        {("GET", "/v1/models"): load("vllm_models.json"), ("POST", "/v1/completions"): completions}
    )
    scorer = VLLMScorer(URL, transport=transport, retry=NO_RETRY, warn=False)
    req = ScoreRequest.build(PROMPT, RANGES, priority=5)
    for _ in range(2):
        np.testing.assert_allclose(asyncio.run(scorer.score(req)), EXPECTED)
    assert [("priority" in b) for b in bodies] == [True, False, False]
    # priority 0 is never sent
    scorer2 = VLLMScorer(URL, model="m", max_model_len=100, transport=transport, warn=False)
    asyncio.run(scorer2.score(ScoreRequest.build(PROMPT, RANGES, priority=0)))
    assert "priority" not in bodies[-1]


def test_vllm_cost_warning_once() -> None:
    transport = mock(
        {
            ("GET", "/v1/models"): load("vllm_models.json"),
            ("POST", "/v1/completions"): load("vllm_completions_prompt_logprobs.json"),
        }
    )
    scorer = VLLMScorer(URL, transport=transport)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(scorer.score_batch([REQ, REQ, REQ]))
    costs = [w for w in caught if issubclass(w.category, CostWarning)]
    assert len(costs) == 1 and "max-num-batched-tokens" in str(costs[0].message)
    assert issubclass(CostWarning, UserWarning)


def test_vllm_error_shapes_map_to_api_error() -> None:
    nested = {
        "error": {
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "Bad Request",
            "param": None,
            "code": 400,
        }
    }
    transport = mock(
        {
            ("GET", "/v1/models"): load("vllm_models.json"),
            ("POST", "/v1/completions"): httpx.Response(400, json=nested),
        }
    )
    scorer = VLLMScorer(URL, transport=transport, retry=NO_RETRY, warn=False)
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(scorer.score(REQ))
    assert info.value.status_code == 400
    assert info.value.message == "This model's maximum context length is 4096 tokens."
    assert str(info.value).startswith("vllm /v1/completions HTTP 400: This model's")


def test_vllm_complete() -> None:
    seen: list[httpx.Request] = []
    transport = mock(
        {
            ("GET", "/v1/models"): load("vllm_models.json"),
            ("POST", "/v1/completions"): {"choices": [{"index": 0, "text": " jumps"}]},
        },
        seen,
    )
    scorer = VLLMScorer(URL, transport=transport, warn=False)
    req = CompletionRequest(prompt=(1, 2, 3), max_tokens=5, stop_token_ids=(2,), priority=None)
    assert asyncio.run(scorer.complete(req)) == " jumps"
    body = json.loads(seen[-1].content)
    assert body["stop_token_ids"] == [2] and body["skip_special_tokens"] is False
    assert body["max_tokens"] == 5 and "priority" not in body and "prompt_logprobs" not in body


# --------------------------------------------------------------------------- SGLang


def test_sglang_fixture_sums() -> None:
    seen: list[httpx.Request] = []
    transport = mock({("POST", "/generate"): load("sglang_generate_input_logprobs.json")}, seen)
    scorer = SGLangScorer(URL, transport=transport, retry=NO_RETRY)
    out = asyncio.run(scorer.score(REQ))
    np.testing.assert_allclose(out, EXPECTED, rtol=0, atol=1e-12)
    assert json.loads(seen[0].content) == {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 1,
    }


def test_vllm_and_sglang_fixtures_agree() -> None:
    """Both fixtures carry the same numbers; the two readers must agree on any spans."""
    v = load("vllm_completions_prompt_logprobs.json")["choices"][0]["prompt_logprobs"]
    s = load("sglang_generate_input_logprobs.json")["meta_info"]["input_token_logprobs"]
    for ranges in ([(2, 13)], [(2, 3), (3, 4), (12, 13)], RANGES):  # first start 2: s = 1
        np.testing.assert_allclose(
            sum_prompt_logprobs(v, PROMPT, ranges),
            sum_input_token_logprobs(s, PROMPT, ranges, 1),
            rtol=0,
            atol=1e-12,
        )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda itl: itl.pop(), "expected 12 input_token_logprobs entries"),
        (lambda itl: itl[3].__setitem__(1, 42), f"is for token 42, but prompt\\[4\\] is {PROMPT[4]}"),
        (lambda itl: itl[0].__setitem__(1, 42), f"is for token 42, but prompt\\[1\\] is {PROMPT[1]}"),
        (lambda itl: itl[3].__setitem__(0, None), "has logprob None"),
        (lambda itl: itl.__setitem__(3, "x"), "expected \\[logprob, token_id, text\\]"),
    ],
    ids=["short", "token-mismatch", "entry0-mismatch", "null-logprob", "not-a-triple"],
)
def test_sglang_bad_input_token_logprobs_are_protocol_errors(mutate: Any, match: str) -> None:
    data = copy.deepcopy(load("sglang_generate_input_logprobs.json"))
    mutate(data["meta_info"]["input_token_logprobs"])
    transport = mock({("POST", "/generate"): data})
    scorer = SGLangScorer(URL, transport=transport, retry=NO_RETRY)
    with pytest.raises(ProtocolError, match=match):
        asyncio.run(scorer.score(REQ))


def test_sglang_errors() -> None:
    transport = mock(
        {
            ("POST", "/generate"): httpx.Response(
                400, json={"error": {"message": "logprob_start_len=20 is higher than the number"}}
            )
        }
    )
    scorer = SGLangScorer(URL, transport=transport, retry=NO_RETRY)
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(scorer.score(REQ))
    assert info.value.status_code == 400 and "logprob_start_len=20" in info.value.message
    aborted = copy.deepcopy(load("sglang_generate_input_logprobs.json"))
    aborted["meta_info"]["finish_reason"] = {
        "type": "abort",
        "message": "Using priority is disabled for this server.",
        "status_code": 503,
    }
    scorer = SGLangScorer(URL, transport=mock({("POST", "/generate"): aborted}), retry=NO_RETRY)
    with pytest.raises(ScoringAPIError, match="priority is disabled") as info:
        asyncio.run(scorer.score(REQ))
    assert info.value.status_code == 503


def test_sglang_complete() -> None:
    seen: list[httpx.Request] = []
    answer = {
        "text": " jumps",
        "output_ids": [432],
        "meta_info": {"finish_reason": {"type": "length"}},
    }
    scorer = SGLangScorer(URL, transport=mock({("POST", "/generate"): answer}, seen))
    req = CompletionRequest(prompt=(1, 2), max_tokens=4, top_k=0, stop_token_ids=(2,), seed=3)
    assert asyncio.run(scorer.complete(req)) == " jumps"
    assert json.loads(seen[0].content) == {
        "input_ids": [1, 2],
        "sampling_params": {
            "max_new_tokens": 4,
            "temperature": 0.7,
            "top_p": 0.95,
            "top_k": -1,
            "stop_token_ids": [2],
            "skip_special_tokens": False,
            "sampling_seed": 3,
        },
    }


# --------------------------------------------------------------------------- detection

SGLANG_MODELS = {
    "object": "list",
    "data": [
        {
            "id": "meta-llama/Llama-2-7b-hf",
            "object": "model",
            "created": 1767225600,
            "owned_by": "sglang",
            "root": "meta-llama/Llama-2-7b-hf",
            "max_model_len": 4096,
        }
    ],
}
SEED_SCORE = {"scores": [{"range_index": 0, "total_logprob": -3.25}]}


def detect(routes: Mapping[tuple[str, str], Any], url: str = URL) -> Detection:
    return asyncio.run(detect_backend(url, transport=mock(routes)))


def vllm_routes(score: Any = None) -> dict[tuple[str, str], Any]:
    return {
        ("GET", "/v1/models"): load("vllm_models.json"),
        ("GET", "/version"): {"version": "0.11.0"},
        ("GET", "/health"): httpx.Response(200),
        ("POST", "/score"): score if score is not None else not_found,
    }


def test_detect_vllm() -> None:
    d = detect(vllm_routes())
    assert d.backend == "vllm" and "owned_by 'vllm'" in d.reason
    assert d.model == MODEL_ID and d.max_model_len == MAX_LEN
    # vLLM's own /score must not pass for the seed protocol
    assert any("POST /score → 404" in p for p in d.probes)


def test_detect_vllm_by_version_when_models_needs_no_owner() -> None:
    routes = vllm_routes()
    del routes[("GET", "/v1/models")]
    d = detect(routes)
    assert d.backend == "vllm" and "/version" in d.reason


def test_detect_vllm_cross_encoder_score_is_not_seed_score() -> None:
    """vLLM ≤ 0.11 answers 400 validation errors; a reranker answers 200 with data[].score."""
    bad = httpx.Response(
        400, json={"error": {"message": "1 validation error: text_1 field required", "code": 400}}
    )
    assert detect(vllm_routes(bad)).backend == "vllm"
    rerank = {
        "id": "score-1",
        "object": "list",
        "data": [{"index": 0, "object": "score", "score": 0.87}],
    }
    assert detect(vllm_routes(rerank)).backend == "vllm"


def test_detect_patched_vllm_with_seed_score() -> None:
    d = detect(vllm_routes(SEED_SCORE))
    assert d.backend == "score" and "seed protocol" in d.reason


def test_detect_sglang() -> None:
    d = detect(
        {
            ("GET", "/v1/models"): SGLANG_MODELS,
            ("GET", "/model_info"): load("sglang_model_info.json"),
            ("POST", "/v1/score"): httpx.Response(400, json={"error": {"message": "bad"}}),
        }
    )
    assert d.backend == "sglang" and "sglang" in d.reason and d.max_model_len == 4096


def test_detect_sglang_by_model_info() -> None:
    d = detect({("GET", "/get_model_info"): load("sglang_model_info.json")})
    assert d.backend == "sglang" and "/get_model_info" in d.reason
    assert d.model == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize(
    ("routes", "server"),
    [
        (
            {
                ("GET", "/v1/models"): {
                    "object": "list",
                    "data": [
                        {"id": "m.gguf", "object": "model", "owned_by": "llamacpp", "meta": {}}
                    ],
                }
            },
            "llama.cpp",
        ),
        ({("GET", "/props"): {"default_generation_settings": {}, "total_slots": 1}}, "llama.cpp"),
        (
            {
                ("GET", "/v1/models"): {
                    "object": "list",
                    "data": [{"id": "m", "owned_by": "tensorrt_llm"}],
                }
            },
            "TensorRT-LLM",
        ),
        ({("GET", "/api/tags"): {"models": [{"name": "llama3:8b"}]}}, "Ollama"),
    ],
    ids=["llamacpp-models", "llamacpp-props", "tensorrt", "ollama"],
)
def test_detect_refuses_servers_without_prompt_logprobs(routes: Any, server: str) -> None:
    with pytest.raises(DetectionError) as info:
        detect(routes)
    text = str(info.value)
    assert server in text and "returns no prompt-token logprobs" in text and "\n" not in text


def test_detect_nothing_recognised_names_every_probe() -> None:
    with pytest.raises(DetectionError) as info:
        asyncio.run(detect_backend(URL, transport=httpx.MockTransport(not_found)))
    text = str(info.value)
    for probe in (
        "GET /v1/models → 404",
        "GET /version → 404",
        "GET /model_info → 404",
        "GET /get_model_info → 404",
        "GET /health → 404",
        "GET /props → 404",
        "GET /api/tags → 404",
        "POST /score → 404",
        "POST /v1/completions → 404",
    ):
        assert probe in text
    assert "Not Found" in text and len(info.value.probes) == 9


def test_detect_refused_connection_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with pytest.raises(BackendUnavailable, match="Connection refused"):
        asyncio.run(detect_backend(URL, transport=httpx.MockTransport(refuse)))


def test_detect_hints_at_missing_key() -> None:
    def deny(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "Unauthorized"})

    with pytest.raises(DetectionError, match="api_key"):
        asyncio.run(detect_backend(URL, transport=httpx.MockTransport(deny)))


def test_make_scorer_builds_detected_backend() -> None:
    transport = mock(vllm_routes())
    scorer = make_scorer(URL + "/v1", transport=transport, concurrency=2)
    assert isinstance(scorer, VLLMScorer) and isinstance(scorer, Scorer)
    assert scorer.name == "vllm" and scorer.concurrency == 2
    assert scorer.model == MODEL_ID and scorer.max_model_len == MAX_LEN
    assert scorer.detection is not None and scorer.detection.backend == "vllm"
    explicit = make_scorer(URL, backend="sglang", transport=transport)
    assert isinstance(explicit, SGLangScorer) and explicit.detection is not None
    assert "explicitly" in explicit.detection.reason


@pytest.mark.parametrize(
    ("cls", "own"),
    [
        (ScoreClient, ["model", "batch", "batch_size"]),
        (VLLMScorer, ["model", "max_model_len", "warn"]),
        (SGLangScorer, ["model", "max_model_len"]),
    ],
)
def test_http_constructors_show_every_keyword(cls: type, own: list[str]) -> None:
    """The shared connection options are written once (HTTPOptions), yet every constructor's
    signature lists them with their defaults, and they reach the client."""
    sig = inspect.signature(cls)
    shared = ["api_key", "timeout", "concurrency", "retry", "transport"]
    assert list(sig.parameters) == ["base_url", *own, *shared]
    assert sig.parameters["timeout"].default == 300.0
    assert sig.parameters["concurrency"].default == 4
    policy = RetryPolicy(max_attempts=2)
    scorer = cls(URL, api_key="k", timeout=7.0, concurrency=3, retry=policy)
    assert (scorer.concurrency, scorer.retry, scorer._timeout) == (3, policy, httpx.Timeout(7.0))
    assert "api_key=<set>" in repr(scorer)
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        cls(URL, concurrency=0)


def test_backend_errors_are_the_trees() -> None:
    """The backends' old names are the tree's classes; bad arguments are ConfigErrors."""
    assert BackendPromptError is _exceptions.BackendPromptError
    assert CostWarning is _exceptions.CostWarning
    assert DetectionError is _exceptions.DetectionError
    with pytest.raises(ConfigError, match="valid backends"):
        make_scorer(URL, backend="tgi")
    with pytest.raises(ConfigError, match="concurrency must be >= 1"):
        make_scorer(URL, backend="score", concurrency=0)
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="batch_size"):
        ScoreClient(URL, batch_size=0)


def test_make_scorer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="valid backends: auto, score, vllm, sglang, echo, local"):
        make_scorer(URL, backend="tgi")
    with pytest.raises(ValueError, match="needs a base_url"):
        make_scorer(None, backend="vllm")
    with pytest.raises(ValueError, match="http://"):
        make_scorer("127.0.0.1:8000", backend="score")
    assert BACKENDS == ("auto", "score", "vllm", "sglang", "echo", "local")


# --------------------------------------------------------------------------- real server


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


def sample_requests(tokenizer: Any) -> list[ScoreRequest]:
    system = ("system", "You are a helpful assistant. Memory: the user's cat is called Miso.")
    return [
        chatml(tokenizer, [system, ("user", "What is my cat called?"), ("assistant", "Miso.")]),
        chatml(
            tokenizer,
            [
                system,
                ("user", "Hi!"),
                ("assistant", "Hello! How can I help you today?"),
                ("user", "Name a colour."),
                ("assistant", "Blue."),
            ],
        ),
        chatml(
            tokenizer,
            [("user", "Count to three."), ("assistant", "One, two, three.")],
        ),
    ]


def test_three_backends_agree_on_the_embedded_server(
    server_url: str, tokenizer: Any, engine: Any
) -> None:
    reqs = sample_requests(tokenizer)

    async def run(scorer: Any) -> list[np.ndarray]:
        try:
            return [await scorer.score(r) for r in reqs]
        finally:
            await scorer.aclose()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CostWarning)
        results = {
            "score": asyncio.run(run(ScoreClient(server_url))),
            "vllm": asyncio.run(run(VLLMScorer(server_url))),
            "sglang": asyncio.run(run(SGLangScorer(server_url))),
        }
    for i, req in enumerate(reqs):
        ref = np.asarray(engine.score(req.prompt, req.ranges), dtype=np.float64)
        assert ref.shape == (len(req.ranges),) and np.all(ref < 0)
        for name, outs in results.items():
            np.testing.assert_allclose(outs[i], ref, rtol=0, atol=1e-3, err_msg=name)


def test_stock_backends_batch_on_the_embedded_server(server_url: str, tokenizer: Any) -> None:
    reqs = sample_requests(tokenizer)
    bad = ScoreRequest.build(reqs[0].prompt, [(0, 3)])

    async def run(scorer: VLLMScorer | SGLangScorer) -> list[Any]:
        try:
            return await scorer.score_batch([*reqs, bad])
        finally:
            await scorer.aclose()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CostWarning)
        v = asyncio.run(run(VLLMScorer(server_url, concurrency=2)))
        s = asyncio.run(run(SGLangScorer(server_url, concurrency=2)))
    for a, b in zip(v[:-1], s[:-1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert isinstance(v[-1], BackendPromptError) and isinstance(s[-1], BackendPromptError)


def test_stock_backends_real_4xx(server_url: str, tokenizer: Any) -> None:
    """An out-of-vocabulary id is only caught by the server: a real 400 with a message."""
    req = ScoreRequest.build([tokenizer.im_start_id, 10**7, 5], [(1, 3)])

    async def run(scorer: VLLMScorer | SGLangScorer) -> ScoringAPIError:
        try:
            await scorer.score(req)
        except ScoringAPIError as exc:
            return exc
        finally:
            await scorer.aclose()
        raise AssertionError("no error")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CostWarning)
        for scorer in (VLLMScorer(server_url), SGLangScorer(server_url)):
            err = asyncio.run(run(scorer))
            assert err.status_code == 400 and "10000000" in err.message
            assert scorer.stats.retries == 0


def test_detect_embedded_server_prefers_score(server_url: str) -> None:
    d = asyncio.run(detect_backend(server_url))
    assert d.backend == "score" and "scoring_kit" in d.reason
    assert d.model and d.max_model_len and d.max_model_len > 0


def test_stock_backends_complete_on_the_embedded_server(server_url: str, tokenizer: Any) -> None:
    prompt = chatml(tokenizer, [("user", "Say hello.")]).prompt
    prompt = (*prompt, tokenizer.im_start_id, *tokenizer.encode("assistant\n"))
    req = CompletionRequest(
        prompt=prompt, max_tokens=4, temperature=0.0, stop_token_ids=(tokenizer.im_end_id,), seed=1
    )

    async def run(scorer: VLLMScorer | SGLangScorer) -> str:
        try:
            return await scorer.complete(req)
        finally:
            await scorer.aclose()

    texts = [asyncio.run(run(VLLMScorer(server_url))), asyncio.run(run(SGLangScorer(server_url)))]
    assert all(isinstance(t, str) and t for t in texts)
    assert texts[0] == texts[1]  # greedy on the same model
