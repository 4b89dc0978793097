"""Reliability and safety: kill-and-resume, concurrency, auth, isolation of bad requests, and
a table of bad inputs (each names what is wrong and where).

Everything runs against the session's embedded model over real HTTP on 127.0.0.1; the only
child process is the killed-and-rerun ``scoring-kit score`` (it loads a tokenizer, no model).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from _helpers import (
    ROOT,
    SAMPLE,
    GatedEngine,
    reference_matrix,
    roomy_prefix_cache,
    run_cli,
    write_jsonl,
)

from scoring_kit._exceptions import (
    BackendError,
    ContextError,
    ExportError,
    PromptError,
    ScoringAPIError,
    StoreError,
)
from scoring_kit.analysis.export import read_candidates, read_chat
from scoring_kit.backends.auto import make_scorer
from scoring_kit.backends.base import CompletionRequest, ScoreRequest
from scoring_kit.backends.http import ScoreClient
from scoring_kit.context.io import load_context
from scoring_kit.scoring.matrix import MemoryMatrix
from scoring_kit.server.runner import EmbeddedServer

# ── helpers ─────────────────────────────────────────────────────────
_TEXT = (
    "The river bends twice before it reaches the old mill, where Anna keeps her bees and a "
    "small boat painted blue. On Sundays her cousin Tomas rows across to sell honey, jars of "
    "plum jam, and wooden spoons he carves in winter. Last spring a storm took the roof of the "
    "granary, so the whole village climbed ladders with tiles, nails and bread for three days. "
    "Now the children count herons from the bridge and argue about whether the fox by the "
    "willow is the same one their grandmother fed when she was young. In the autumn the "
    "school choir sings at the harvest fair, and the baker hides a silver coin in one loaf."
)


def _completed_rows(ckpt: Path) -> int | None:
    """Rows of a checkpoint that hold results (None while there is no checkpoint yet)."""
    try:
        m = MemoryMatrix.load(ckpt)
    except StoreError:  # not written yet (the file is replaced atomically, never partial)
        return None
    return sum(1 for i, e in enumerate(m.errors) if e is None and not np.isnan(m.without[i]).any())


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SCORING_KIT_API_KEY", "SCORING_KIT_SERVER")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture()
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)


@pytest.fixture(autouse=True)
def _roomy_cache(monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    roomy_prefix_cache(monkeypatch, engine)


# ── kill mid-run, restart, same result ──────────────────────────────
def test_killed_matrix_run_resumes_to_the_uninterrupted_result(
    engine: Any, tokenizer: Any, server_url: str, tmp_path: Path
) -> None:
    """SIGKILL a ``scoring-kit score`` child after exactly 3 of 8 rows, rerun it: the rerun
    computes only the 5 missing rows and the result equals an uninterrupted run (1e-4)."""
    ref = reference_matrix(server_url, tokenizer)
    out = tmp_path / "run"
    ckpt = out / "matrix.ckpt.npz"
    # baseline + 3 ablations pass; the 4th ablation then waits inside the engine
    gate = GatedEngine(engine, allow=1 + 3)
    with EmbeddedServer(gate) as srv:
        cmd = [sys.executable, "-m", "scoring_kit", "score", str(SAMPLE), "--out", str(out),
               "--server", srv.url, "--backend", "score", "--quiet",
               "--concurrency", "1", "--chunk-size", "1"]
        log1 = (tmp_path / "first.log").open("w+b")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdin=subprocess.DEVNULL,
                                stdout=log1, stderr=subprocess.STDOUT)
        try:
            # bounded wait for the 4th ablation to reach the engine: by then the child has
            # checkpointed row 3 (it saves before it sends the next chunk)
            blocked, rows = False, None
            for _ in range(1200):  # <= 240 s
                blocked = gate.wait_until(lambda g: g.waiting >= 1, timeout=0.2)
                rows = _completed_rows(ckpt)  # None until the first checkpoint exists
                if (blocked and rows is not None) or proc.poll() is not None:
                    break
            log1.seek(0)
            assert blocked, f"child never reached row 4 (exit {proc.poll()}): {log1.read()!r}"
            assert proc.poll() is None
            assert rows == 3  # at least one row, not all
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            log1.close()
        partial = MemoryMatrix.load(ckpt)
        np.testing.assert_allclose(partial.without[:3], ref.without[:3], atol=1e-4)
        assert np.isnan(partial.without[3:]).all()
        assert not (out / "matrix.parquet").exists()

        gate.open()
        rerun = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=300, check=False)
        assert rerun.returncode == 0, rerun.stderr
        assert "scored 8 memories x 13 responses" in rerun.stdout
        # baseline + 3 rows + the orphaned 4th call, then only the 5 missing rows
        assert gate.calls == 1 + 3 + 1 + 5
    result = MemoryMatrix.load(out / "matrix.parquet")
    assert not ckpt.exists()  # a finished run removes its checkpoint
    assert result.keys == ref.keys
    assert np.array_equal(result.entries, ref.entries)
    assert result.complete
    np.testing.assert_allclose(result.baseline, ref.baseline, atol=1e-4)
    np.testing.assert_allclose(result.without, ref.without, atol=1e-4)


# ── concurrency ─────────────────────────────────────────────────────
N_CLIENTS, PER_CLIENT = 16, 20


N_PROMPTS = 8


def _range_sets(n: int, count: int, rng: random.Random) -> list[tuple[tuple[int, int], ...]]:
    """``count`` different valid sets of 1-2 sorted, disjoint spans in a prompt of ``n``."""
    out: dict[tuple[tuple[int, int], ...], None] = {}
    while len(out) < count:
        if rng.random() < 0.5:
            a = rng.randint(1, n - 1)
            out[((a, rng.randint(a + 1, n)),)] = None
        else:
            a = rng.randint(1, n - 3)
            b = rng.randint(a + 1, n - 2)
            c = rng.randint(b, n - 1)
            out[((a, b), (c, rng.randint(c + 1, n)))] = None
    return list(out)


def _concurrent_requests(tokenizer: Any) -> list[list[ScoreRequest]]:
    """``[client][step]``: 320 different requests of 20-40 tokens and 1-2 ranges. Request
    ``k = step * 16 + client`` scores prompt ``k % 8`` with its range set ``k // 8``, so
    clients working at the same time send different prompts and never the same request."""
    ids = tokenizer.encode(_TEXT)
    prompts = [ids[12 * i : 12 * i + 20 + (7 * i) % 21] for i in range(N_PROMPTS)]
    assert len(prompts[-1]) == 20 + (7 * (N_PROMPTS - 1)) % 21  # the text is long enough
    per_prompt = N_CLIENTS * PER_CLIENT // N_PROMPTS
    rng = random.Random(20240611)
    sets = [_range_sets(len(p), per_prompt, rng) for p in prompts]
    out: list[list[ScoreRequest]] = [[] for _ in range(N_CLIENTS)]
    for step in range(PER_CLIENT):
        for c in range(N_CLIENTS):
            k = step * N_CLIENTS + c
            out[c].append(ScoreRequest.build(prompts[k % N_PROMPTS], sets[k % N_PROMPTS][k // N_PROMPTS]))
    return out


def test_16_concurrent_clients_get_what_each_request_gets_alone(
    engine: Any, tokenizer: Any, server_url: str, no_env_key: None
) -> None:
    per_client = _concurrent_requests(tokenizer)
    flat = [r for reqs in per_client for r in reqs]
    assert len(flat) == N_CLIENTS * PER_CLIENT == len({(r.prompt, r.ranges) for r in flat})
    assert len({r.prompt for r in flat}) == N_PROMPTS
    assert all(20 <= len(r.prompt) <= 40 and 1 <= len(r.ranges) <= 2 for r in flat)
    # each request alone, one at a time, straight on the engine; one full-span call per
    # prompt first computes every position once, so the 320 requests (alone and over HTTP)
    # are sums over those positions and add no prefix-cache entries of their own
    for p in dict.fromkeys(r.prompt for r in flat):
        engine.score(p, [(1, len(p))])
    alone = {(r.prompt, r.ranges): engine.score(r.prompt, r.ranges)
             for step in range(PER_CLIENT) for r in (c[step] for c in per_client)}

    async def drive() -> tuple[list[list[Any]], list[ScoreClient]]:
        clients = [ScoreClient(server_url, concurrency=1) for _ in range(N_CLIENTS)]

        async def one(client: ScoreClient, reqs: list[ScoreRequest]) -> list[Any]:
            got: list[Any] = []
            for r in reqs:
                try:
                    got.append(await client.score(r))
                except BackendError as exc:
                    got.append(exc)
            return got

        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(one(c, r) for c, r in zip(clients, per_client, strict=True))),
                timeout=400,
            )
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        return list(results), clients

    results, clients = asyncio.run(drive())
    errors = [x for got in results for x in got if isinstance(x, BaseException)]
    assert errors == []
    # a 503 the retry policy absorbed is allowed; anything else would have been an error
    assert sum(c.stats.failed_calls for c in clients) == 0
    assert sum(c.stats.calls for c in clients) == N_CLIENTS * PER_CLIENT
    for c, reqs in enumerate(per_client):
        for r, got in zip(reqs, results[c], strict=True):
            assert got.shape == (len(r.ranges),)
            np.testing.assert_allclose(got, alone[(r.prompt, r.ranges)], atol=1e-4,
                                       err_msg=f"client {c}: {r.ranges}")


# ── auth ────────────────────────────────────────────────────────────
def _texts(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), str(getattr(exc, "message", ""))])


@pytest.mark.filterwarnings("ignore::scoring_kit.backends.vllm.CostWarning")
def test_api_key_is_required_everywhere_and_never_shown(
    engine: Any, tokenizer: Any, tmp_path: Path, no_env_key: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = f"s3cret-{uuid.uuid4().hex}"
    ids = tokenizer.encode(_TEXT)[:24]
    req = ScoreRequest.build(ids, [(4, 12), (12, 24)])
    batch = [req, ScoreRequest.build(ids[:20], [(2, 20)]), ScoreRequest.build(ids[:16], [(8, 16)])]
    completion = CompletionRequest(tuple(ids), max_tokens=2, temperature=0.0, seed=0)
    sample = [{"context_ids": ids[:12], "continuation_ids": ids[12:]}]
    train_dir = tmp_path / "train"
    expected = engine.score(req.prompt, req.ranges)

    async def calls(client: ScoreClient) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, call in (
            ("score", lambda: client.score(req)),
            ("score_batch", lambda: client.score_batch(batch)),
            ("complete", lambda: client.complete(completion)),
            ("train", lambda: client.train(sample)),
        ):
            try:
                out[name] = await call()
            except BackendError as exc:
                out[name] = exc
        await client.aclose()
        return out

    with EmbeddedServer(engine, api_key=key, train_dir=train_dir) as srv:
        good = ScoreClient(srv.url, api_key=key)
        ok = asyncio.run(calls(good))
        bare = ScoreClient(srv.url)
        refused = asyncio.run(calls(bare))
        wrong = ScoreClient(srv.url, api_key="not-" + key)
        refused_wrong = asyncio.run(calls(wrong))
        # the other protocols and auto-detection send the key too
        others = {}
        for backend in ("vllm", "sglang"):
            with_key = make_scorer(srv.url, backend=backend, api_key=key)
            without = make_scorer(srv.url, backend=backend)
            others[backend] = (asyncio.run(with_key.score(req)), without)
            with pytest.raises(ScoringAPIError) as info:
                asyncio.run(without.score(req))
            assert info.value.status_code == 401
        detected = make_scorer(srv.url, api_key=key)

    # with the key: every call works
    np.testing.assert_allclose(ok["score"], expected, atol=1e-4)
    assert all(isinstance(x, np.ndarray) for x in ok["score_batch"])
    np.testing.assert_allclose(ok["score_batch"][0], expected, atol=1e-4)
    assert isinstance(ok["complete"], str)
    assert isinstance(ok["train"], str) and ok["train"]
    assert len(list(train_dir.glob("*.jsonl"))) == 1
    for backend, (scores, _) in others.items():
        np.testing.assert_allclose(scores, expected, atol=1e-3, err_msg=backend)
    assert detected.name == "score" and "scoring_kit" in detected.detection.reason
    # without it (or with a wrong one): 401 on each, as an error, in every batch slot
    for result in (refused, refused_wrong):
        for name in ("score", "complete", "train"):
            exc = result[name]
            assert isinstance(exc, ScoringAPIError) and exc.status_code == 401, (name, exc)
            assert "API key" in str(exc)
        slots = result["score_batch"]
        assert len(slots) == 3
        assert all(isinstance(s, ScoringAPIError) and s.status_code == 401 for s in slots)
    # the key never shows: errors, reprs, logs
    shown = [_texts(e) for r in (refused, refused_wrong) for e in r.values()
             if isinstance(e, BaseException)]
    shown += [_texts(s) for r in (refused, refused_wrong) for s in r["score_batch"]]
    shown += [repr(good), repr(wrong), repr(detected), repr(others["vllm"][1])]
    shown += [rec.getMessage() for rec in caplog.records]
    assert len(shown) > 10
    assert all(key not in s for s in shown)
    assert key not in caplog.text
    assert "api_key=<set>" in repr(good)


# ── one bad request never affects another ───────────────────────────
def test_bad_requests_interleaved_with_good_ones_do_not_affect_them(
    engine: Any, tokenizer: Any, server_url: str
) -> None:
    ids = tokenizer.encode(_TEXT)
    good = [(ids[i : i + 24 + i % 9], [(2, 10), (12, 20 + i % 5)]) for i in range(10)]
    too_long = [ids[0]] * (engine.max_len + 1)
    bad: list[tuple[Any, str, str]] = [  # (body, where the server must say is wrong)
        (b'{"prompt": [1, 2, 3], "score_ranges": [[1, 3]', "malformed JSON", ""),
        ({"prompt": ids[:20], "score_ranges": [[0, 5]]}, "score range 0 [0, 5)", "start at 1"),
        ({"prompt": ids[:20], "score_ranges": [[1, 8], [5, 9]]}, "score range 1 [5, 9)",
         "ends at 8"),
        ({"prompt": [*ids[:5], engine.vocab_size + 7], "score_ranges": [[1, 6]]},
         f"token id {engine.vocab_size + 7} at prompt position 5",
         f"[0, {engine.vocab_size})"),
        ({"prompt": too_long, "score_ranges": [[1, 2]]}, f"{engine.max_len + 1} tokens",
         f"{engine.max_len} tokens"),
        ({"prompt": "hello", "score_ranges": [[1, 2]]}, "field `prompt`", '"hello"'),
        ({"prompt": ids[:20], "score_ranges": [[1, 30]]}, "end 30 > prompt length 20", ""),
        ([1, 2, 3], "must be a JSON object", "got an array"),
    ]

    async def drive() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server_url, timeout=300,
                                     limits=httpx.Limits(max_connections=16)) as c:
            tasks = []
            for i in range(max(len(good), len(bad))):
                if i < len(good):
                    p, r = good[i]
                    tasks.append(c.post("/score", json={"prompt": p, "score_ranges": r}))
                if i < len(bad):
                    body = bad[i][0]
                    if isinstance(body, bytes):
                        tasks.append(c.post("/score", content=body))
                    else:
                        tasks.append(c.post("/score", json=body))
            # a batch mixing good and bad items: the bad one fails alone
            tasks.append(c.post("/score/batch", json={"requests": [
                {"prompt": good[0][0], "score_ranges": good[0][1]},
                {"prompt": good[1][0], "score_ranges": [[3, 2]]},
                {"prompt": good[2][0], "score_ranges": good[2][1]},
            ]}))
            return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=300))

    responses = asyncio.run(drive())
    batch = responses.pop()
    good_resp = [responses[2 * i] for i in range(len(bad))] + responses[2 * len(bad):]
    bad_resp = [responses[2 * i + 1] for i in range(len(bad))]
    assert len(good_resp) == len(good)
    for (p, r), resp in zip(good, good_resp, strict=True):
        assert resp.status_code == 200, resp.text
        got = [s["total_logprob"] for s in resp.json()["scores"]]
        np.testing.assert_allclose(got, engine.score(p, r), atol=1e-4)
    for (_, what, limit), resp in zip(bad, bad_resp, strict=True):
        assert resp.status_code == 400, (what, resp.status_code, resp.text)
        msg = resp.json()["error"]
        assert what in msg and limit in msg, msg
    results = batch.json()["results"]
    assert batch.status_code == 200 and len(results) == 3
    assert "requests[1]" in results[1]["error"] and "score range 0 [3, 2)" in results[1]["error"]
    for j in (0, 2):
        got = [s["total_logprob"] for s in results[j]["scores"]]
        np.testing.assert_allclose(got, engine.score(*good[j]), atol=1e-4)
    assert httpx.get(server_url + "/health", timeout=30).json()["status"] == "ok"


# ── the bad-input table ─────────────────────────────────────────────
@dataclass(frozen=True)
class Bad:
    """One kind of bad input: what is fed where, and what the error must say.

    ``kind``: ``conversation`` (``data`` = file lines, loaded with ``load_context``),
    ``request`` (``data`` = (prompt, ranges), sent with ``ScoreClient`` to the server),
    ``cli`` (``data`` = argv, optionally with a file's lines under ``"file"``),
    ``candidates`` / ``chat`` (``data`` = file lines, re-imported).
    ``error``: the exception type, or the CLI exit code. ``says``: text the message must
    contain; ``{file}`` is the file the case wrote, ``{server}`` the server URL.
    """

    id: str
    kind: str
    data: Any
    error: type[BaseException] | int
    says: tuple[str, ...]


_HEADER = {"format": "scoring_kit.context", "version": 1}
_CANDIDATE = {
    "schema": "scoring_kit.candidate/1", "entry_idx": 3, "divergence": 0.5,
    "timestamp_ns": 1683554160000000000, "response_text": "Pepper.",
    "prior_context": "user: What is my dog called?", "alternate_text": None,
    "alternate_error": None, "context_ids": [1, 2, 3], "continuation_ids": [4, 5],
}
_IDS = list(range(100, 110))  # 10 valid token ids
_VOCAB = 49152  # SmolLM2's vocabulary


def _cand(**change: Any) -> dict[str, Any]:
    out = {**_CANDIDATE, **change}
    return {k: v for k, v in out.items() if v is not ...}


BAD_INPUTS: list[Bad] = [
    # conversation files
    Bad("conv-unknown-role", "conversation",
        ['{"role": "user", "content": "hi"}', '{"role": "robot", "content": "beep"}'],
        ContextError, ("{file}:2", "field 'role'", "unknown role 'robot'", "expected one of")),
    Bad("conv-missing-content", "conversation", ['{"role": "user"}'],
        ContextError, ("{file}:1", "field 'content'", "got missing")),
    Bad("conv-memory-without-key", "conversation", ['{"role": "memory", "content": "x"}'],
        ContextError, ("{file}:1", "field 'key'", "needs a key")),
    Bad("conv-key-on-user", "conversation", ['{"role": "user", "content": "x", "key": "k"}'],
        ContextError, ("{file}:1", "field 'key'", "not on 'user'")),
    Bad("conv-bad-json", "conversation",
        ['{"role": "user", "content": "hi"}', "", '{"role": "assistant", "content": }'],
        ContextError, ("{file}:3", "bad JSON")),
    Bad("conv-line-not-object", "conversation", ['["user", "hi"]'],
        ContextError, ("{file}:1", "must be a JSON object", "got list")),
    Bad("conv-bad-timestamp", "conversation",
        ['{"role": "user", "content": "hi", "timestamp": "yesterday"}'],
        ContextError, ("{file}:1", "field 'timestamp'", "'yesterday'", "ISO 8601")),
    Bad("conv-unknown-field", "conversation", ['{"role": "user", "content": "x", "colour": 1}'],
        ContextError, ("{file}:1", "field 'colour'", "allowed: role, content, key, timestamp")),
    Bad("conv-empty-file", "conversation", ["", ""],
        ContextError, ("{file}", "holds no messages")),
    Bad("conv-token-id-out-of-vocab", "conversation",
        [orjson.dumps(_HEADER).decode(),
         '{"section": "conversation", "kind": "user", "token_ids": [1, 99999]}'],
        ContextError, ("{file}:2", "field 'token_ids'", "token_ids[1] = 99999",
                       f"[0, {_VOCAB})")),
    Bad("conv-unknown-section", "conversation",
        ['{"section": "attic", "kind": "user", "token_ids": [1]}'],
        ContextError, ("{file}:1", "field 'section'", "unknown section 'attic'")),
    Bad("conv-unsupported-version", "conversation",
        ['{"format": "scoring_kit.context", "version": 9}'],
        ContextError, ("{file}:1", "field 'version'", "unsupported version 9", "version 1")),
    # score requests (checked by the client, or refused by the server with 400)
    Bad("req-start-below-1", "request", (_IDS, [(0, 3)]),
        PromptError, ("score range 0 [0, 3)", "starts at 0", "start at 1")),
    Bad("req-overlap", "request", (_IDS, [(1, 4), (3, 6)]),
        PromptError, ("score range 1 [3, 6)", "overlaps", "ends at 4")),
    Bad("req-end-past-prompt", "request", (_IDS, [(2, 12)]),
        PromptError, ("score range 0 [2, 12)", "end 12 > prompt length 10")),
    Bad("req-empty-range", "request", (_IDS, [(4, 4)]),
        PromptError, ("score range 0 [4, 4)", "is empty")),
    Bad("req-empty-prompt", "request", ([], [(1, 2)]),
        PromptError, ("prompt is empty",)),
    Bad("req-prompt-too-long", "request", ([100] * 8193, [(1, 2)]),
        ScoringAPIError, ("HTTP 400", "prompt has 8193 tokens", "context of 8192 tokens")),
    Bad("req-id-outside-vocab", "request", ([*_IDS[:3], _VOCAB, *_IDS[3:]], [(1, 5)]),
        ScoringAPIError, ("HTTP 400", f"token id {_VOCAB} at prompt position 3",
                          f"[0, {_VOCAB})")),
    Bad("req-negative-id", "request", ([-1, *_IDS], [(1, 5)]),
        ScoringAPIError, ("HTTP 400", "token id -1 at prompt position 0")),
    # CLI arguments (exit 2, one line on stderr)
    Bad("cli-bad-range", "cli", {"argv": ["render", "{sample}", "--range", "x:y"]},
        2, ("argument --range", "A:B", "'x:y'")),
    Bad("cli-reversed-range", "cli", {"argv": ["render", "{sample}", "--range", "5:2"]},
        2, ("argument --range", "0 <= A < B", "'5:2'")),
    Bad("cli-negative-threshold", "cli",
        {"argv": ["candidates", "{sample}", "--out", "{tmp}/c.jsonl", "--threshold", "-1"]},
        2, ("argument --threshold", "must be a number >= 0", "'-1'")),
    Bad("cli-nan-threshold", "cli",
        {"argv": ["candidates", "{sample}", "--out", "{tmp}/c.jsonl", "--threshold", "nan"]},
        2, ("argument --threshold", "must be a number >= 0", "'nan'")),
    Bad("cli-zero-concurrency", "cli",
        {"argv": ["score", "{sample}", "--out", "{tmp}/o", "--concurrency", "0"]},
        2, ("argument --concurrency", "must be an integer >= 1, got 0")),
    Bad("cli-unknown-backend", "cli",
        {"argv": ["score", "{sample}", "--out", "{tmp}/o", "--backend", "tgi"]},
        2, ("argument --backend", "invalid choice: 'tgi'")),
    Bad("cli-missing-file", "cli", {"argv": ["render", "{tmp}/missing.jsonl"]},
        2, ("{tmp}/missing.jsonl", "no such file")),
    Bad("cli-score-missing-file", "cli",
        {"argv": ["score", "{tmp}/missing.jsonl", "--out", "{tmp}/o", "--server", "{server}",
                  "--backend", "score", "--quiet"]},
        2, ("{tmp}/missing.jsonl", "no such file")),
    Bad("cli-unknown-skip-key", "cli",
        {"argv": ["render", "{file}", "--skip", "nope"],
         "file": [orjson.dumps(_HEADER).decode(),
                  '{"section": "conversation", "kind": "memory", "key": "m1", "token_ids": [5]}']},
        2, ("{file}", "--skip", "['nope']", "keys: ['m1']")),
    Bad("cli-train-bad-candidates", "cli",
        {"argv": ["train", "{file}", "--server", "{server}", "--trained", "{tmp}/t.json"],
         "file": [orjson.dumps(_cand()).decode(), orjson.dumps(_cand(divergence="high")).decode()]},
        2, ("{file}:2", "field 'divergence'", "'high'")),
    # export re-imports
    Bad("candidates-bad-entry-idx", "candidates",
        [orjson.dumps(_cand()).decode(), orjson.dumps(_cand(entry_idx=-1)).decode()],
        ExportError, ("{file}:2", "field 'entry_idx'", "integer >= 0", "-1")),
    Bad("candidates-bad-json", "candidates",
        [orjson.dumps(_cand()).decode(), "", '{"schema": "scoring_kit.candidate/1",'],
        ExportError, ("{file}:3", "not valid JSON")),
    Bad("candidates-missing-field", "candidates", [orjson.dumps(_cand(divergence=...)).decode()],
        ExportError, ("{file}:1", "field 'divergence'", "missing")),
    Bad("candidates-bad-token-id", "candidates",
        [orjson.dumps(_cand(context_ids=[1, -5])).decode()],
        ExportError, ("{file}:1", "field 'context_ids[1]'", "-5")),
    Bad("chat-bad-role", "chat",
        ['{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}'],
        ExportError, ("{file}:1", "field 'messages[1].role'", "'tool'", "system, user")),
]


@pytest.fixture(scope="module")
def bad_client(server_url: str) -> Iterator[ScoreClient]:
    c = ScoreClient(server_url, api_key="")
    yield c
    asyncio.run(c.aclose())


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_bad_input_is_refused_naming_what_and_where(
    case: Bad, tmp_path: Path, tokenizer: Any, server_url: str, bad_client: ScoreClient,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    file = tmp_path / "input.jsonl"

    def fill(text: str) -> str:
        return (text.replace("{file}", str(file)).replace("{tmp}", str(tmp_path))
                .replace("{sample}", str(SAMPLE)).replace("{server}", server_url))

    message: str
    if case.kind == "cli":
        monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)
        # the embedded tokenizer is already loaded in this process: no second load
        monkeypatch.setattr("scoring_kit.engine.loader.load_tokenizer", lambda *_: tokenizer)
        if "file" in case.data:
            write_jsonl(file, case.data["file"])
        res = run_cli([fill(a) for a in case.data["argv"]], capsys)
        assert res.code == case.error, res
        assert res.out == ""
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("scoring-kit: error: "), res.err
        message = lines[0]
    else:
        assert isinstance(case.error, type)
        with pytest.raises(case.error) as info:
            if case.kind == "conversation":
                load_context(write_jsonl(file, case.data), tokenizer)
            elif case.kind == "request":
                prompt, ranges = case.data
                asyncio.run(bad_client.score(ScoreRequest.build(prompt, ranges)))
            elif case.kind == "candidates":
                read_candidates(write_jsonl(file, case.data))
            elif case.kind == "chat":
                read_chat(write_jsonl(file, case.data))
            else:
                raise AssertionError(f"unknown kind {case.kind}")
        message = str(info.value)
        assert "\n" not in message
    for part in case.says:
        assert fill(part) in message, f"{fill(part)!r} not in {message!r}"


def test_bad_input_table_spans_every_kind() -> None:
    kinds = {c.kind for c in BAD_INPUTS}
    assert kinds == {"conversation", "request", "cli", "candidates", "chat"}
    assert len(BAD_INPUTS) >= 20 and len({c.id for c in BAD_INPUTS}) == len(BAD_INPUTS)
    # every message is checked for where (file:line, field or position) and what
    assert all(len(c.says) >= 2 or c.kind == "request" for c in BAD_INPUTS)
