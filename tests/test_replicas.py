"""Several servers (issue 19 item 4): ``make_scorer([a, b])`` / ``--server A --server B`` give
a :class:`~scoring_kit.backends.replicas.ReplicaPool`. Two embedded servers share the one
session engine (its lock serialises their calls); each is wrapped in a :class:`Switch` (an
ASGI wrapper) that records the scoring requests it answered and can stop its server right
after its k-th one, so a replica dies mid-run at a known point (no sleeps).
httpx.MockTransport only for a read timeout, which a real server cannot be made to give."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from _helpers import SAMPLE, run_cli, sample_context

from scoring_kit._exceptions import (
    BackendPromptError,
    BackendUnavailable,
    ConfigError,
    ScoringAPIError,
)
from scoring_kit.backends._retry import RetryPolicy
from scoring_kit.backends.auto import make_scorer
from scoring_kit.backends.base import ScoreRequest
from scoring_kit.backends.detect import Detection
from scoring_kit.backends.http import ScoreClient
from scoring_kit.backends.replicas import (
    ReplicaPool,
    _pieces,
    check_replicas_agree,
    is_replica_fault,
)
from scoring_kit.cli import build_parser
from scoring_kit.context.model import skip_key
from scoring_kit.scoring.matrix import MemoryMatrix, score_memories
from scoring_kit.server.runner import EmbeddedServer
from scoring_kit.session import open_session

FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01)


class Switch:
    """ASGI wrapper of a server's app: records each scoring POST it answered (path, prompts)
    and, with ``stop_after=k``, stops the server right after answering its k-th one; a
    request that still reaches it afterwards is answered 500 (the server going down)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.answered: list[tuple[str, list[tuple[int, ...]]]] = []
        self.stop_after: int | None = None
        self.server: EmbeddedServer | None = None
        self.url = ""
        self.dead = False
        self.stopper: threading.Thread | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.dead:
            body = orjson.dumps({"error": "replica stopped"})
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        chunks: list[bytes] = []

        async def recv() -> Any:
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
            return msg

        await self.app(scope, recv, send)
        data = orjson.loads(b"".join(chunks))
        items = data.get("requests", [data])
        self.answered.append((scope["path"], [tuple(r["prompt"]) for r in items]))
        # no await between the answer and this check: the next request cannot slip in
        if self.stop_after is not None and len(self.answered) >= self.stop_after:
            self.dead = True
            assert self.server is not None
            self.stopper = threading.Thread(target=self.server.stop, daemon=True)
            self.stopper.start()

    def prompts(self) -> list[tuple[int, ...]]:
        return [p for _, ps in self.answered for p in ps]


def _serve(engine: Any) -> tuple[EmbeddedServer, Switch]:
    srv = EmbeddedServer(engine)
    switch = Switch(srv.app)
    srv.app, switch.server = switch, srv  # type: ignore[assignment]
    switch.url = srv.start().url
    return srv, switch


@pytest.fixture(scope="module", autouse=True)
def _roomy(engine: Any) -> Iterator[None]:
    """The shared engine keeps every prompt of the sample between calls (speed only)."""
    before = engine.prefix_cache_entries
    engine.prefix_cache_entries = max(128, before)
    yield
    engine.prefix_cache_entries = before


@pytest.fixture(scope="module")
def one_server(sample_matrix: MemoryMatrix) -> MemoryMatrix:
    """The sample matrix through one embedded server (conftest's, scored once a session)."""
    return sample_matrix


@pytest.fixture()
def pair(engine: Any) -> Iterator[tuple[tuple[EmbeddedServer, Switch], ...]]:
    a, b = _serve(engine), _serve(engine)
    try:
        yield a, b
    finally:
        a[0].stop()
        b[0].stop()


def _pool(*urls: str) -> ReplicaPool:
    pool = make_scorer(list(urls))
    assert isinstance(pool, ReplicaPool)
    for rep in pool.replicas:
        rep.retry = FAST_RETRY  # type: ignore[attr-defined]
    return pool


def _same(got: MemoryMatrix, ref: MemoryMatrix) -> None:
    """Equal to one server's matrix. Not bit for bit: the shared engine reuses prefix KV
    differently when the same prompts arrive in other batches (float32 noise, ~1e-6 seen);
    1e-4 is far below any divergence that matters and far above that noise."""
    assert got.keys == ref.keys and got.shape == ref.shape == (8, 13)
    assert not np.isnan(got.without).any()
    np.testing.assert_allclose(got.baseline, ref.baseline, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.without, ref.without, atol=1e-4, rtol=0)


def test_two_replicas_give_one_servers_matrix_and_share_the_work(
    pair: Any, one_server: MemoryMatrix, tokenizer: Any
) -> None:
    (a, sa), (b, sb) = pair
    pool = _pool(a.url, b.url)
    ctx = sample_context(tokenizer)
    try:
        got = score_memories(ctx, pool, progress=False)
    finally:
        asyncio.run(pool.aclose())
    assert got.complete
    _same(got, one_server)
    assert got.meta["backend"] == "score"
    base = tuple(ctx.wire_prompt().request().prompt)
    for switch in (sa, sb):
        assert len(switch.answered) > 0
        # the baseline is the first prompt each replica scored (its prefix cache is warm)
        assert switch.prompts()[0] == base
    # the 8 ablations were split over both, 4 each, and the baseline sent to each once
    ablations = [p for s in (sa, sb) for p in s.prompts() if p != base]
    assert sorted(ablations) == sorted(
        tuple(ctx.wire_prompt(skip=skip_key(k)).request().prompt) for k in ctx.memory_keys())
    assert [len([p for p in s.prompts() if p != base]) for s in (sa, sb)] == [4, 4]
    assert [s.prompts().count(base) for s in (sa, sb)] == [1, 1]
    reps = got.meta["replicas"]
    assert [r["url"] for r in reps] == [a.url, b.url]
    assert all(r["calls"] > 0 and r["failed"] == 0 for r in reps)
    assert got.meta["replica_failures"] == []


def test_a_replica_stopped_mid_run_loses_nothing(
    pair: Any, one_server: MemoryMatrix, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    (_, sa), (b, sb) = pair
    sb.stop_after = 2  # B answers 2 requests (the baseline and its first batch), then stops
    pool = _pool(sa.url, sb.url)
    try:
        with caplog.at_level(logging.WARNING, logger="scoring_kit.backends.replicas"):
            got = score_memories(sample_context(tokenizer), pool, chunk_size=4,
                                 progress=False)
    finally:
        asyncio.run(pool.aclose())
    assert len(sb.answered) == 2 and sb.stopper is not None
    sb.stopper.join(30)
    assert not b.running
    assert got.complete and not got.failed
    _same(got, one_server)
    failures = got.meta["replica_failures"]
    assert failures and {f["url"] for f in failures} == {sb.url}
    assert sum(f["moved"] for f in failures) >= 1
    calls = {r["url"]: r for r in got.meta["replicas"]}
    assert calls[sb.url]["failed"] >= 1 and calls[sa.url]["failed"] == 0
    assert calls[sa.url]["calls"] > calls[sb.url]["calls"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(sb.url in w and "another replica" in w for w in warned), warned


def test_both_replicas_failing_gives_nan_rows_with_their_errors(
    pair: Any, tokenizer: Any
) -> None:
    (_, sa), (_, sb) = pair
    sa.stop_after = 1  # A answers the baseline only
    sb.stop_after = 1  # B answers the baseline it is sent before its ablations, only
    pool = _pool(sa.url, sb.url)
    try:
        got = score_memories(sample_context(tokenizer), pool, progress=False)
    finally:
        asyncio.run(pool.aclose())
    assert np.isfinite(got.baseline).all()
    assert list(got.failed) == list(got.keys) and np.isnan(got.without).all()
    assert all(e for e in got.errors)
    assert got.meta["failed_calls"] == 8
    assert {f["url"] for f in got.meta["replica_failures"]} == {sa.url, sb.url}


def test_no_replica_answering_is_the_single_servers_error(engine: Any) -> None:
    srv, _ = _serve(engine)
    url = srv.url
    srv.stop()
    with pytest.raises(BackendUnavailable, match="no server answers at"):
        make_scorer([url, "http://127.0.0.1:9"])


class _Renamed:
    """The session engine under another model name."""

    def __init__(self, engine: Any, name: str) -> None:
        self._engine, self.name = engine, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._engine, attr)


def test_replicas_of_different_models_are_refused_in_one_line(engine: Any) -> None:
    with (EmbeddedServer(engine) as a, EmbeddedServer(_Renamed(engine, "other-7B")) as c,
          pytest.raises(ConfigError) as info):
        urls = [a.url, c.url]
        make_scorer(urls)
    text = str(info.value)
    assert "\n" not in text and urls[0] in text and urls[1] in text
    assert "model" in text and "'other-7B'" in text and "SmolLM2-135M-Instruct" in text


def test_agreement_check_names_what_differs() -> None:
    d1 = Detection("vllm", "x", "m", 4096)
    with pytest.raises(ConfigError, match=r"max_model_len: http://a has 4096, http://b has 8192"):
        check_replicas_agree(["http://a", "http://b"], [d1, Detection("vllm", "x", "m", 8192)])
    with pytest.raises(ConfigError, match=r"backend: http://a has 'vllm', http://b has 'sglang'"):
        check_replicas_agree(["http://a", "http://b"], [d1, Detection("sglang", "x", "m", 4096)])
    with pytest.raises(ConfigError, match="given twice"):
        check_replicas_agree(["http://a/v1", "http://a"], [d1, d1])
    check_replicas_agree(["http://a", "http://b"], [d1, Detection("vllm", "y", "m", 4096)])


def test_pieces_and_fault_kinds() -> None:
    assert _pieces([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert _pieces([1], 3) == [[1]]
    assert _pieces([], 2) == [[]]
    assert is_replica_fault(BackendUnavailable("down"))
    assert is_replica_fault(ScoringAPIError("x", status_code=502, message="x"))
    assert is_replica_fault(ScoringAPIError("x", status_code=429, message="x"))
    assert not is_replica_fault(ScoringAPIError("x", status_code=400, message="x"))
    assert not is_replica_fault(ScoringAPIError("x", status_code=200, message="x"))
    assert not is_replica_fault(BackendPromptError("bad range"))


def test_a_timeout_moves_the_call_to_another_replica() -> None:
    """A replica that times out (MockTransport: a real server cannot be made to at will)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "slow":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json={"scores": [{"range_index": 0, "total_logprob": -1.5}]})

    mock = httpx.MockTransport(handler)
    scorers = [ScoreClient(f"http://{h}", batch=False, transport=mock, retry=FAST_RETRY)
               for h in ("slow", "fast")]
    pool = ReplicaPool(scorers)
    req = ScoreRequest.build([1, 2, 3], [(1, 3)])

    async def go() -> Any:
        try:
            return await pool.score_batch([req, req, req])
        finally:
            await pool.aclose()

    out = asyncio.run(go())
    assert all(isinstance(o, np.ndarray) and o.tolist() == [-1.5] for o in out)
    # the lead and one ablation were sent to "slow" (two attempts each), then it rested
    assert seen.count("slow") == 4
    assert pool.failures[0].url == "http://slow" and "no answer" in pool.failures[0].error
    assert pool.stats.calls == 3 and pool.stats.failed_calls == 0


def test_cli_takes_server_twice(
    pair: Any, one_server: MemoryMatrix, tokenizer: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    (a, sa), (b, sb) = pair
    monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)
    monkeypatch.delenv("SCORING_KIT_SERVER", raising=False)
    monkeypatch.setattr("scoring_kit.engine.loader.load_tokenizer", lambda *_: tokenizer)
    out = tmp_path / "out"
    res = run_cli(["score", SAMPLE, "--server", a.url, "--server", b.url, "--out", out,
                   "--quiet"], capsys)
    assert res.code == 0, res.err
    got = MemoryMatrix.load(out / "matrix.parquet")
    _same(got, one_server)
    assert [r["url"] for r in got.meta["replicas"]] == [a.url, b.url]
    assert sa.answered and sb.answered


def test_parser_server_is_a_list_and_the_env_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scoring_kit.cli import _servers

    p = build_parser()
    args = p.parse_args(["score", "c.jsonl", "--out", "o", "--server", "http://a", "--server", "http://b"])
    assert args.server == ["http://a", "http://b"]
    monkeypatch.setenv("SCORING_KIT_SERVER", "http://env")
    assert _servers(args) == ["http://a", "http://b"]
    assert _servers(p.parse_args(["score", "c.jsonl", "--out", "o"])) == ["http://env"]
    monkeypatch.delenv("SCORING_KIT_SERVER")
    assert _servers(p.parse_args(["score", "c.jsonl", "--out", "o"])) is None


def test_session_takes_a_list_of_servers(pair: Any) -> None:
    (a, _), (b, _) = pair
    with open_session([a.url, b.url]) as sess:
        assert isinstance(sess.scorer, ReplicaPool)
        assert sess.urls == (a.url, b.url) and sess.url == a.url
        assert repr(sess) == f"Session(score at {a.url}, {b.url})"
    with open_session([a.url]) as sess:
        assert isinstance(sess.scorer, ScoreClient)
