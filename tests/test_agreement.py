"""The tokenizer agreement check (issue 16): one request before any scoring call.

Against the embedded server (real HTTP) for agreement and for a tokenizer that reads text
differently; ``httpx.MockTransport`` only for servers a real one cannot be made into (no
tokenize endpoint at all; llama-cpp-python's ``/extras/tokenize`` with its BOS).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from scoring_kit._exceptions import ConfigError, TokenizerMismatch
from scoring_kit.backends.agreement import (
    PROBE_TEXT,
    check_tokenizer,
    check_tokenizer_local,
    compare_tokens,
)
from scoring_kit.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_conversation.jsonl"


class _Shifted:
    """A tokenizer that reads text as another model would (every id moved by one)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = "other-model"
        self.vocab_size = inner.vocab_size
        self.im_start_id = inner.im_start_id
        self.im_end_id = inner.im_end_id

    def encode(self, text: str) -> list[int]:
        return [(t + 1) % self.vocab_size for t in self.inner.encode(text)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=skip_special_tokens))


def test_compare_tokens() -> None:
    assert compare_tokens([1, 2, 3], [1, 2, 3]) == (True, "")
    assert compare_tokens([7, 8], [2, 7, 8], bos_id=2) == (True, "the server adds BOS 2")
    same, detail = compare_tokens([7, 8], [2, 7, 8])  # no BOS known: a difference
    assert not same and detail == "2 vs 3 tokens, first difference at token 0: 7 vs 2"
    same, detail = compare_tokens([7, 8, 9], [7, 8])
    assert not same and "first difference at token 2: 9 vs end" in detail


def test_agrees_with_the_embedded_server(server_url: str, tokenizer: Any) -> None:
    res = asyncio.run(check_tokenizer(server_url, tokenizer, served_model="x"))
    assert res.status == "agree" and res.endpoint == "POST /tokenize"
    assert res.probe_tokens == len(tokenizer.encode(PROBE_TEXT)) > 40
    assert res.max_model_len == 8192
    json.dumps(res.as_meta())  # recorded in the matrix metadata


def test_mismatch_is_one_line_naming_both(server_url: str, tokenizer: Any) -> None:
    with pytest.raises(TokenizerMismatch) as info:
        asyncio.run(check_tokenizer(server_url, _Shifted(tokenizer),
                                    served_model="SmolLM2-135M-Instruct"))
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)  # the CLI exits 2
    assert "\n" not in msg
    for needle in ("'other-model'", "'SmolLM2-135M-Instruct'", "--tokenizer", "token 0"):
        assert needle in msg, (needle, msg)
    with pytest.raises(TokenizerMismatch, match="in-process engine"):
        check_tokenizer_local(_Shifted(tokenizer), tokenizer)
    assert check_tokenizer_local(tokenizer, tokenizer).status == "agree"


def _mock(routes: dict[str, Any], seen: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path in routes:
            return httpx.Response(200, json=routes[request.url.path](json.loads(request.content)))
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handler)


def test_no_endpoint_is_reported_not_skipped(tokenizer: Any) -> None:
    seen: list[str] = []
    res = asyncio.run(check_tokenizer("http://gpu-box:8000/v1", tokenizer,
                                      transport=_mock({}, seen)))
    assert res.status == "unavailable"
    assert seen == ["/tokenize", "/v1/tokenize", "/extras/tokenize"]
    assert "POST /tokenize → 404" in res.detail and "NOT checked" in res.describe()


def test_llama_cpp_python_extras_tokenize_with_bos(tokenizer: Any) -> None:
    bos = tokenizer.hf.bos_token_id
    assert isinstance(bos, int)

    def extras(body: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": [bos, *tokenizer.encode(body["input"])]}

    seen: list[str] = []
    res = asyncio.run(check_tokenizer("http://laptop:8080", tokenizer,
                                      transport=_mock({"/extras/tokenize": extras}, seen)))
    assert res.status == "agree" and res.endpoint == "POST /extras/tokenize"
    assert res.detail == f"the server adds BOS {bos}"


def test_session_checks_before_scoring(server_url: str, tokenizer: Any) -> None:
    from scoring_kit.session import Session

    with Session(server_url, backend="score") as sess:
        sess.set_tokenizer(_Shifted(tokenizer))  # type: ignore[arg-type]
        with pytest.raises(TokenizerMismatch):
            sess.load(SAMPLE)
        assert sess.scorer.stats.calls == 0
        sess.set_tokenizer(tokenizer)
        sess.load(SAMPLE)
        assert sess.tokenizer_check is not None and sess.tokenizer_check.status == "agree"


def test_cli_records_the_check(server_url: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from scoring_kit.scoring.memory_matrix import MemoryMatrix

    out = tmp_path / "out"
    code = main(["score", str(SAMPLE), "--server", server_url, "--backend", "score",
                 "--approx", "windowed", "--window", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    check = MemoryMatrix.load(out / "matrix.parquet").meta["tokenizer_check"]
    assert check["status"] == "agree" and check["endpoint"] == "POST /tokenize"


# ── --tokenizer server: the served model's tokenizer through its /tokenize ──────
def test_server_tokenizer_renders_like_the_local_one(server_url: str, tokenizer: Any) -> None:
    from scoring_kit.backends.server_tokenizer import ServerTokenizer
    from scoring_kit.context.io import load_context

    remote = ServerTokenizer(server_url)
    try:
        assert remote.name == "SmolLM2-135M-Instruct"
        assert (remote.im_start_id, remote.im_end_id) == (tokenizer.im_start_id,
                                                          tokenizer.im_end_id)
        assert remote.encode(PROBE_TEXT) == tokenizer.encode(PROBE_TEXT)
        assert remote.decode(tokenizer.encode(PROBE_TEXT)) == PROBE_TEXT
        got, ref = load_context(SAMPLE, remote).wire_prompt(), load_context(
            SAMPLE, tokenizer).wire_prompt()
        assert got.tokens.tolist() == ref.tokens.tolist() and got.ranges == ref.ranges
    finally:
        remote.close()


def test_server_tokenizer_needs_a_tokenize_endpoint() -> None:
    from scoring_kit.backends.server_tokenizer import ServerTokenizer

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    with pytest.raises(ConfigError, match=r"no POST /tokenize \(404\).*--tokenizer PATH"):
        ServerTokenizer("http://gpu-box:8000", transport=httpx.MockTransport(handler))


def test_cli_tokenizer_server(server_url: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from scoring_kit.scoring.memory_matrix import MemoryMatrix

    out = tmp_path / "out"
    code = main(["score", str(SAMPLE), "--server", server_url, "--tokenizer", "server",
                 "--approx", "windowed", "--window", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    check = MemoryMatrix.load(out / "matrix.parquet").meta["tokenizer_check"]
    assert check["status"] == "agree" and check["tokenizer"] == "SmolLM2-135M-Instruct"
    code = main(["render", str(SAMPLE), "--tokenizer", "server"])
    err = capsys.readouterr().err
    assert code == 2 and "render has no --server" in err
