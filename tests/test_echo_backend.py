"""The ``echo`` backend (OpenAI-style ``echo`` + ``logprobs`` completions), over recorded
answers: ``vllm_completions_echo.json`` is a real vLLM's answer (``scripts/refresh_fixtures.py``)
to the same prompt as ``vllm_completions_prompt_logprobs.json``; a llama-cpp-python-like
server (text prompts only, ``POST /tokenize``) is imitated over ``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from scoring_kit._exceptions import DetectionError, ProtocolError, ScoringAPIError
from scoring_kit.backends._common import BackendPromptError
from scoring_kit.backends._llamacpp import refuses_id_prompt
from scoring_kit.backends._retry import RetryPolicy
from scoring_kit.backends.auto import detect_backend, make_scorer
from scoring_kit.backends.base import ScoreRequest
from scoring_kit.backends.echo import EchoScorer, is_echo_answer, sum_token_logprobs
from scoring_kit.backends.vllm import sum_prompt_logprobs

FIXTURES = Path(__file__).parent / "fixtures"
URL = "http://127.0.0.1:9"
NO_RETRY = RetryPolicy.never()


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


PROMPT: list[int] = load("fixture_prompt.json")["prompt"]
TEXT: str = load("fixture_prompt.json")["text"]
RANGES = [(1, 4), (4, 6), (6, 13)]
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}


def echo_values() -> list[Any]:
    return list(load("vllm_completions_echo.json")["choices"][0]["logprobs"]["token_logprobs"])


def test_real_echo_fixture_equals_prompt_logprobs() -> None:
    values = echo_values()
    assert values[0] is None and len(values) == len(PROMPT) + 1  # + the generated token
    pl = load("vllm_completions_prompt_logprobs.json")["choices"][0]["prompt_logprobs"]
    np.testing.assert_allclose(
        sum_token_logprobs(values, len(PROMPT), RANGES),
        sum_prompt_logprobs(pl, PROMPT, RANGES),
        rtol=0, atol=1e-4,
    )


@pytest.mark.parametrize(
    ("values", "match"),
    [(None, "no choices\\[0\\].logprobs.token_logprobs"), ([None, -1.0], "at least 13"),
     ([None, "x", *[-1.0] * 11], "token_logprobs\\[1\\] is 'x'")],
    ids=["missing", "short", "not-a-number"],
)
def test_bad_token_logprobs_are_protocol_errors(values: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        sum_token_logprobs(values, len(PROMPT), RANGES)


def test_minus_9999_is_minus_inf() -> None:
    values = echo_values()
    values[3] = -9999.0
    out = sum_token_logprobs(values, len(PROMPT), RANGES)
    assert out[0] == -np.inf and np.isfinite(out[2])


def vllm_like(seen: list[dict[str, Any]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=load("vllm_models.json"))
        if request.url.path == "/v1/completions":
            seen.append(json.loads(request.content))
            return httpx.Response(200, json=load("vllm_completions_echo.json"))
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handler)


def test_ids_prompt_body_and_sums() -> None:
    seen: list[dict[str, Any]] = []
    scorer = EchoScorer(URL + "/v1", transport=vllm_like(seen), retry=NO_RETRY)
    out = asyncio.run(scorer.score(ScoreRequest.build(PROMPT, RANGES)))
    np.testing.assert_allclose(out, sum_token_logprobs(echo_values(), len(PROMPT), RANGES))
    model = load("vllm_models.json")["data"][0]
    assert scorer.model == model["id"] and scorer.max_model_len == model["max_model_len"]
    assert seen == [{"model": model["id"], "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                     "echo": True, "logprobs": 0, "stream": False}]
    assert scorer.prompt_format == "ids"
    # the context is known: a prompt of max_model_len tokens is refused before sending
    with pytest.raises(BackendPromptError, match="at most") as info:
        asyncio.run(scorer.score(ScoreRequest.build([1] * model["max_model_len"], [(1, 3)])))
    assert info.value.limit == model["max_model_len"] - 1 and len(seen) == 1


class FakeTokenizer:
    def decode(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
        assert list(ids) == PROMPT and not skip_special_tokens
        return TEXT


def llama_like(seen: list[tuple[str, Any]], tokens: list[int]) -> httpx.MockTransport:
    """Text prompts only (422 on ids, like llama-cpp-python's schema), ``/tokenize``."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        seen.append((path, body))
        if path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": tokens})
        if path == "/v1/completions":
            if not isinstance(body["prompt"], str):
                return httpx.Response(422, json={"detail": [{"msg": "Input should be a valid string"}]})
            values = [None, *[-0.5] * (len(PROMPT) - 1), -1.0]
            return httpx.Response(200, json={"choices": [{"text": "x", "logprobs": {
                "tokens": ["?"] * len(values), "token_logprobs": values}}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handler)


def test_text_only_server_gets_text_checked_against_its_tokenizer() -> None:
    seen: list[tuple[str, Any]] = []
    scorer = EchoScorer(URL, transport=llama_like(seen, PROMPT), retry=NO_RETRY,
                        tokenizer=FakeTokenizer())  # type: ignore[arg-type]
    out = asyncio.run(scorer.score(ScoreRequest.build(PROMPT, RANGES)))
    np.testing.assert_allclose(out, [-1.5, -1.0, -3.5])
    assert scorer.prompt_format == "text" and scorer.max_model_len is None
    paths = [p for p, _ in seen]
    assert paths == ["/v1/models", "/v1/completions", "/tokenize", "/v1/completions"]
    assert seen[-1][1]["prompt"] == TEXT
    asyncio.run(scorer.score(ScoreRequest.build(PROMPT, RANGES)))  # /tokenize answer is kept
    assert [p for p, _ in seen[4:]] == ["/v1/completions"]


def test_text_the_server_reads_differently_is_refused() -> None:
    seen: list[tuple[str, Any]] = []
    other = [*PROMPT[:5], 999, *PROMPT[6:]]
    scorer = EchoScorer(URL, transport=llama_like(seen, other), retry=NO_RETRY,
                        prompt_format="text", tokenizer=FakeTokenizer())  # type: ignore[arg-type]
    with pytest.raises(BackendPromptError, match="first difference at position 5"):
        asyncio.run(scorer.score(ScoreRequest.build(PROMPT, RANGES)))
    assert "/v1/completions" not in [p for p, _ in seen]


def test_text_only_server_without_tokenizer_says_so() -> None:
    scorer = EchoScorer(URL, transport=llama_like([], PROMPT), retry=NO_RETRY)
    with pytest.raises(BackendPromptError, match="pass tokenizer="):
        asyncio.run(scorer.score(ScoreRequest.build(PROMPT, RANGES)))


def test_auto_detects_an_echo_server() -> None:
    answer = {"choices": [{"text": "!", "logprobs": {"token_logprobs": [None, -3.2, -1.0]}}]}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/v1/completions":
            body = json.loads(request.content)
            assert body["echo"] is True and body["logprobs"] == 0 and body["max_tokens"] == 1
            return httpx.Response(200, json=answer)
        return httpx.Response(404, json={"detail": "Not Found"})

    det = asyncio.run(detect_backend(URL, transport=httpx.MockTransport(handler)))
    assert det.backend == "echo" and "echo" in det.reason and det.model == "m"
    scorer = make_scorer(URL, transport=httpx.MockTransport(handler))
    assert isinstance(scorer, EchoScorer) and scorer.model == "m"
    assert not is_echo_answer(200, {"choices": [{"logprobs": {"token_logprobs": [-1.0]}}]})
    assert not is_echo_answer(400, answer)


# ------------------------------------------------- llama-cpp-python (recorded from 0.3.36)

LLAMA_IDS: list[int] = load("llama_extras_tokenize.json")["tokens"]
LLAMA_TEXT = TEXT + "<|im_end|>\n<|im_start|>assistant\nA fox."  # refresh_fixtures.LLAMA_TAIL
LLAMA_BOS_AT = 15  # the second <|im_start|>, left out of llama-cpp-python's echo
LLAMA_RANGES = [(13, 16), (16, 22)]


class LlamaTokenizer:
    def decode(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
        texts = {tuple(LLAMA_IDS): LLAMA_TEXT,
                 tuple(LLAMA_IDS[:LLAMA_BOS_AT]): LLAMA_TEXT[: LLAMA_TEXT.rindex("<|im_start|>")]}
        return texts[tuple(ids)]


def llama_cpp(seen: list[tuple[str, Any]], *, plain: str = "llama_completions_bos_plain.json",
              fail: Any = None) -> httpx.MockTransport:
    """llama-cpp-python 0.3.36's answers, as recorded by ``refresh_fixtures.py --llama-url``."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        seen.append((path, body))
        if path == "/v1/models":
            return httpx.Response(200, json=load("llama_models.json"))
        if path == "/tokenize":
            return httpx.Response(404, json=load("llama_tokenize_404.json"))
        if path == "/extras/tokenize":
            assert body["input"] == LLAMA_TEXT
            return httpx.Response(200, json=load("llama_extras_tokenize.json"))
        if path == "/v1/completions":
            if not isinstance(body["prompt"], str):
                return httpx.Response(500, json=fail or load("llama_error_id_prompt.json"))
            if body.get("echo"):
                return httpx.Response(200, json=load("llama_completions_echo.json"))
            if body.get("logit_bias"):
                return httpx.Response(200, json=load("llama_completions_bos_biased.json"))
            return httpx.Response(200, json=load(plain))
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handler)


def llama_expected() -> list[float]:
    values = load("llama_completions_echo.json")["choices"][0]["logprobs"]["token_logprobs"]
    # entry j is position j + 1 up to the left-out BOS at 15, then position j + 2
    bos = load("llama_completions_bos_biased.json")["choices"][0]["logprobs"]["top_logprobs"]
    return [values[12] + values[13] + bos[0][""], sum(values[14:20])]


def test_llama_cpp_python_layout_is_undone() -> None:
    seen: list[tuple[str, Any]] = []
    scorer = EchoScorer(URL, transport=llama_cpp(seen), retry=NO_RETRY,
                        tokenizer=LlamaTokenizer())  # type: ignore[arg-type]
    req = ScoreRequest.build(LLAMA_IDS, LLAMA_RANGES)
    out = asyncio.run(scorer.score(req))
    np.testing.assert_allclose(out, llama_expected(), rtol=0, atol=1e-9)
    assert scorer.prompt_format == "text" and scorer.layout == "llama-cpp-python"
    paths = [p for p, _ in seen]
    assert paths == ["/v1/models", "/v1/completions", "/tokenize", "/extras/tokenize",
                     "/v1/completions", "/v1/completions", "/v1/completions"]
    assert seen[1][1]["prompt"] == LLAMA_IDS  # ids once, then text for good
    plain, biased = seen[5][1], seen[6][1]
    assert plain["prompt"] == LLAMA_TEXT[: LLAMA_TEXT.rindex("<|im_start|>")]
    assert plain["logprobs"] == 1 and not plain["echo"] and "logit_bias" not in plain
    assert biased["logit_bias"] == {"1": -100}  # no HF tokenizer here: only BOS itself
    asyncio.run(scorer.score(req))  # tokenize and the BOS value are remembered
    assert [p for p, _ in seen[7:]] == ["/v1/completions"] and seen[7][1]["echo"]


def test_llama_cpp_python_echo_agrees_with_vllm_on_the_same_tokens() -> None:
    """The recorded Q4_1 echo, aligned as the backend aligns it, against vLLM's float32 one."""
    llama = load("llama_completions_echo.json")["choices"][0]["logprobs"]["token_logprobs"]
    vllm = echo_values()
    got = np.array(llama[1:12])  # positions 2..12
    np.testing.assert_allclose(got, np.array(vllm[2:13]), rtol=0, atol=0.5)


def test_only_llama_cpp_pythons_schema_500_switches_to_text() -> None:
    boom = {"error": {"message": "CUDA out of memory", "type": "internal_server_error"}}
    seen: list[tuple[str, Any]] = []
    scorer = EchoScorer(URL, transport=llama_cpp(seen, fail=boom), retry=NO_RETRY,
                        tokenizer=LlamaTokenizer())  # type: ignore[arg-type]
    with pytest.raises(ScoringAPIError) as info:
        asyncio.run(scorer.score(ScoreRequest.build(LLAMA_IDS, LLAMA_RANGES)))
    assert info.value.status_code == 500 and "out of memory" in str(info.value)
    assert scorer.prompt_format == "auto" and scorer.layout == "openai"


def test_llama_cpp_python_span_it_cannot_read_is_refused() -> None:
    scorer = EchoScorer(URL, transport=llama_cpp([]), retry=NO_RETRY, prompt_format="text",
                        tokenizer=LlamaTokenizer())  # type: ignore[arg-type]
    with pytest.raises(BackendPromptError, match="null for the first echoed token"):
        asyncio.run(scorer.score(ScoreRequest.build(LLAMA_IDS, [(1, 3)])))
    # BOS not the most likely token there: its value cannot be told from other specials
    other = EchoScorer(URL, transport=llama_cpp([], plain="llama_completions_bos_biased.json"),
                       retry=NO_RETRY, tokenizer=LlamaTokenizer())  # type: ignore[arg-type]
    with pytest.raises(BackendPromptError, match="position 15 out of the echoed logprobs"):
        asyncio.run(other.score(ScoreRequest.build(LLAMA_IDS, LLAMA_RANGES)))


def test_refuses_id_prompt_is_precise() -> None:
    msg = load("llama_error_id_prompt.json")["error"]["message"]
    assert refuses_id_prompt(500, msg) and refuses_id_prompt(422, "")
    assert not refuses_id_prompt(500, "Internal Server Error")
    assert not refuses_id_prompt(400, msg)


def test_auto_detects_llama_cpp_python_from_its_recorded_answers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=load("llama_models.json"))
        if request.url.path == "/v1/completions":
            return httpx.Response(200, json=load("llama_completions_echo_probe.json"))
        return httpx.Response(404, json={"detail": "Not Found"})

    det = asyncio.run(detect_backend(URL, transport=httpx.MockTransport(handler)))
    assert det.backend == "echo" and det.model == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(("echo_status", "backend"), [(200, "echo"), (400, None)])
def test_owned_by_llamacpp_is_decided_by_the_echo_probe(
    echo_status: int, backend: str | None
) -> None:
    models = {"object": "list", "data": [{"id": "m.gguf", "owned_by": "llamacpp"}]}
    refusal = {"error": {"code": 400, "message": "Only no echo is supported",
                         "type": "invalid_request_error"}}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models)
        if request.url.path == "/v1/completions":
            answer = load("llama_completions_echo_probe.json") if echo_status == 200 else refusal
            return httpx.Response(echo_status, json=answer)
        return httpx.Response(404, json={"detail": "Not Found"})

    transport = httpx.MockTransport(handler)
    if backend is None:
        with pytest.raises(DetectionError, match=r"llama\.cpp server .* no prompt-token logprobs"):
            asyncio.run(detect_backend(URL, transport=transport))
    else:
        det = asyncio.run(detect_backend(URL, transport=transport))
        assert det.backend == backend and "owned_by 'llamacpp'" in det.reason
