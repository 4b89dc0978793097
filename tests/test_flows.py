"""Every scoring flow against the embedded server over real HTTP, on the sample conversation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from scoring_kit import ScoringError, StoreError
from scoring_kit.backends.http import ScoreClient
from scoring_kit.context.io import context_from_messages, load_context
from scoring_kit.context.model import ContextState, is_memory_node, skip_key
from scoring_kit.scoring import (
    FinetuneScoringTask,
    MemoryMatrix,
    MemoryScoringTask,
    MemoryStore,
    TrainedSet,
    ascore_finetune,
    ascore_memories,
    ascore_memory,
    divergence,
    ewma_weight,
    score_finetune_candidates,
    score_memories,
    score_memories_incremental,
    score_memory,
    send_to_train,
)
from scoring_kit.scoring.finetune import dedup_key
from scoring_kit.scoring.windows import nth_response_end

DATA = Path(__file__).resolve().parents[1] / "data"

#: responses of the sample that state a fact only one memory holds
DEPENDS = {2: "D1:14", 5: "D2:1", 8: "D2:5", 13: "D3:16", 16: "D4:3", 22: "D4:8",
           27: "D2:8", 29: "identity:melanie"}


@pytest.fixture(scope="module")
def ctx(tokenizer: Any) -> ContextState:
    return load_context(DATA / "sample_conversation.jsonl", tokenizer)


@pytest.fixture()
def client(server_url: str) -> Iterator[ScoreClient]:
    c = ScoreClient(server_url)
    yield c
    asyncio.run(c.aclose())


@pytest.fixture(scope="module")
def matrix(sample_matrix: MemoryMatrix) -> MemoryMatrix:
    return sample_matrix


def msgs(*pairs: tuple[str, str], **keys: str) -> list[dict[str, str]]:
    out = []
    for role, content in pairs:
        m = {"role": role, "content": content}
        if role == "memory":
            m["key"] = keys[content.split()[0]]
        out.append(m)
    return out


# ── full matrix ─────────────────────────────────────────────────────
def test_matrix_shape_and_arrays(matrix: MemoryMatrix, ctx: ContextState) -> None:
    assert list(matrix.keys) == ctx.memory_keys()
    assert matrix.entries.tolist() == ctx.response_indices()
    assert matrix.without.shape == matrix.divergence.shape == (8, 13)
    assert matrix.complete and matrix.failed == []
    assert np.allclose(matrix.divergence, np.maximum(matrix.delta, 0))
    assert np.allclose(matrix.memory_weights, matrix.divergence.sum(axis=1))
    assert np.allclose(matrix.response_scores, matrix.divergence.sum(axis=0))
    assert (matrix.baseline < 0).all()


def test_dependent_memory_stands_out(matrix: MemoryMatrix) -> None:
    for entry, key in DEPENDS.items():
        j = matrix.entries.tolist().index(entry)
        col = matrix.divergence[:, j]
        i = matrix.keys.index(key)
        others = np.delete(col, i)
        assert col[i] > 1.0, (entry, key, col)
        assert col[i] > 2 * others.max(), (entry, key, col)
        assert matrix.important_memories_for(entry)[0][0] == key


def test_no_dependence_response_has_small_divergence(matrix: MemoryMatrix) -> None:
    j = matrix.entries.tolist().index(24)  # "Two plus two is four."
    assert matrix.divergence[:, j].max() < 1.0


def test_matrix_equals_pairwise_calls(matrix: MemoryMatrix, ctx: ContextState,
                                      client: ScoreClient) -> None:
    key = "D2:5"
    base = asyncio.run(client.score(ctx.wire_prompt().request()))
    without = asyncio.run(client.score(ctx.wire_prompt(skip=skip_key(key)).request()))
    assert np.allclose(base, matrix.baseline, atol=1e-3)
    assert np.allclose(divergence(base, without), matrix.row(key), atol=1e-3)


def test_frame_save_load_lossless(matrix: MemoryMatrix, tmp_path: Path) -> None:
    frame = matrix.to_frame()
    assert frame.columns == ["memory_key", "entry_index", "baseline", "without", "delta",
                             "divergence", "error"]
    assert frame.height == 8 * 13
    for suffix in (".npz", ".parquet"):
        back = MemoryMatrix.load(matrix.save(tmp_path / f"m{suffix}"))
        assert back.keys == matrix.keys and back.errors == matrix.errors
        assert np.array_equal(back.without, matrix.without)
        assert np.array_equal(back.baseline, matrix.baseline)
        assert np.array_equal(back.entries, matrix.entries)


def test_apply_to_writes_memory_scores(matrix: MemoryMatrix, ctx: ContextState) -> None:
    scored = matrix.apply_to(ctx)
    assert scored.conversation[8].memory_scores["D2:5"] == pytest.approx(
        float(matrix.row("D2:5")[2]))
    for e in ctx.response_indices():
        assert all(v > 0.01 for v in scored.conversation[e].memory_scores.values())
    assert ctx.conversation[8].memory_scores == {}  # original untouched


def test_matrix_edge_cases(tokenizer: Any, client: ScoreClient) -> None:
    no_mem = context_from_messages(msgs(("user", "hi"), ("assistant", "hello")), tokenizer)
    m = asyncio.run(ascore_memories(no_mem, client, progress=False))
    assert m.shape == (0, 1)
    no_resp = context_from_messages(
        msgs(("memory", "a fact"), ("user", "hi"), a="k1"), tokenizer)
    m = asyncio.run(ascore_memories(no_resp, client, progress=False))
    assert m.shape == (1, 0) and m.divergence.size == 0
    with pytest.raises(ScoringError, match="unknown memory key"):
        asyncio.run(ascore_memories(no_resp, client, keys=["nope"], progress=False))


class FailingTransport(httpx.AsyncBaseTransport):
    """Forwards to the real server, but answers 500 to ablations that drop ``fail_len`` tokens
    (a fault the embedded server cannot be made to produce)."""

    def __init__(self, fail_prompt_lens: set[int]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fail = fail_prompt_lens
        self.prompts: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/score"):
            body = orjson.loads(await request.aread())
            self.prompts.append(len(body["prompt"]))
            if len(body["prompt"]) in self.fail:
                return httpx.Response(500, json={"error": "GPU fell over"})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_failed_rows_are_nan_and_rerun_completes_only_them(
    ctx: ContextState, server_url: str, matrix: MemoryMatrix, tmp_path: Path
) -> None:
    bad = {"D2:5", "D4:8"}
    lens = {len(ctx.wire_prompt(skip=skip_key(k))) for k in bad}
    assert len(lens) == 2 and len(ctx.wire_prompt()) not in lens
    ckpt = tmp_path / "run.npz"
    t1 = FailingTransport(lens)
    c1 = ScoreClient(server_url, transport=t1, batch=False,
                     retry=None)
    first = score_memories(ctx, c1, checkpoint=ckpt, progress=False)
    assert set(first.failed) == bad
    for k in bad:
        i = first.keys.index(k)
        assert np.isnan(first.divergence[i]).all()
        assert "500" in (first.errors[i] or "") and "GPU fell over" in (first.errors[i] or "")
    assert not np.isnan(np.delete(first.divergence, [first.keys.index(k) for k in bad], 0)).any()
    assert np.isnan(first.memory_weights[first.keys.index("D2:5")])
    # rerun on the checkpoint with a healthy server: only the two failed rows are sent
    t2 = FailingTransport(set())
    c2 = ScoreClient(server_url, transport=t2, batch=False)
    second = score_memories(ctx, c2, checkpoint=ckpt, progress=False)
    assert sorted(t2.prompts) == sorted(lens)
    assert second.complete
    assert np.allclose(second.divergence, matrix.divergence, atol=1e-3)
    asyncio.run(c1.aclose())
    asyncio.run(c2.aclose())


def test_checkpoint_of_other_context_is_refused(
    ctx: ContextState, client: ScoreClient, matrix: MemoryMatrix, tmp_path: Path
) -> None:
    ckpt = matrix.save(tmp_path / "c.npz")
    with pytest.raises(StoreError, match="belongs to another context"):
        asyncio.run(ascore_memories(ctx.truncated(20), client, checkpoint=ckpt, progress=False))


# ── single memory (reference v1) ───────────────────────────────────
def test_single_memory(ctx: ContextState, client: ScoreClient) -> None:
    got = score_memory(ctx, "D2:5", client)
    pos = ctx.find_memory("D2:5")[1]  # type: ignore[index]
    end, _ = nth_response_end(ctx.conversation, pos, 50)
    base = ctx.wire_prompt(range(pos, end))
    without = ctx.wire_prompt(range(pos, end), skip_key("D2:5"))
    b = asyncio.run(client.score(base.request()))
    w = asyncio.run(client.score(without.request()))
    assert got == pytest.approx(float(divergence(b, w).sum()), abs=1e-3)
    assert got > 1.0
    assert score_memory(ctx, "not-there", client) == 0.0


def test_single_memory_with_no_later_response(tokenizer: Any, client: ScoreClient) -> None:
    c = context_from_messages(
        msgs(("user", "hi"), ("assistant", "hello"), ("memory", "late fact"), ("user", "bye"),
             late="k-late"), tokenizer)
    assert asyncio.run(ascore_memory(c, "k-late", client)) == 0.0


# ── incremental (reference v2) ─────────────────────────────────────
def test_incremental_scores_due_memories_and_updates_store(
    ctx: ContextState, client: ScoreClient, tmp_path: Path
) -> None:
    store = MemoryStore(tmp_path / "store.json")
    seen: list[tuple[str, float]] = []
    res = score_memories_incremental(ctx, client, store, now=10_000, progress=False,
                                     on_score=lambda k, s: seen.append((k, s)))
    assert seen == res.scored
    scored = dict(res.scored)
    skipped = dict(res.skipped)
    # memories past 60% of the conversation tokens are skipped
    assert set(skipped) == {"D4:8", "D2:8"}
    assert all("past the 60% cutoff" in why for why in skipped.values())
    assert set(scored) == {"identity:melanie", "D1:14", "D2:1", "D2:5", "D3:16", "D4:3"}
    assert scored["D2:5"] > 1.0
    rec = store.get("D2:5")
    assert rec is not None and rec.last_scored == 10_000
    assert rec.weight == pytest.approx(ewma_weight(0.5, scored["D2:5"]))
    # the same run an hour later minus one second: nothing is due
    res2 = score_memories_incremental(ctx, client, store, now=10_000 + 3599, progress=False)
    assert res2.scored == [] and set(res2.not_due) == set(scored)
    # the store survives a new instance (a restart)
    assert MemoryStore(tmp_path / "store.json").get("D2:5") == rec


def test_incremental_window_max_and_no_response(tokenizer: Any, client: ScoreClient,
                                                tmp_path: Path) -> None:
    c = context_from_messages(
        msgs(("memory", "Rex is my dog's name."), ("user", "What's my dog called?"),
             ("assistant", "Your dog is called Rex."), ("user", "Thanks"),
             ("assistant", "You're welcome."), ("memory", "tail note"), ("user", "x"),
             ("user", "y " * 200), Rex="dog", tail="tail"), tokenizer)
    store = MemoryStore(tmp_path / "s.json")
    res = score_memories_incremental(c, client, store, now=99_999, progress=False,
                                     response_window=1)
    assert [k for k, _ in res.scored] == ["dog"]
    # window of 1 response: the score is that response's divergence
    base = c.wire_prompt(range(0, 3))
    without = c.wire_prompt(range(0, 3), skip_key("dog"))
    want = divergence(asyncio.run(client.score(base.request())),
                      asyncio.run(client.score(without.request()))).max()
    assert dict(res.scored)["dog"] == pytest.approx(float(want), abs=1e-3)
    assert dict(res.skipped)["tail"]


def test_incremental_oldest_first(ctx: ContextState, client: ScoreClient, tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "s.json")
    store.update("D2:1", 0.3, now=100)
    store.update("D1:14", 0.3, now=50)
    order: list[str] = []
    score_memories_incremental(ctx, client, store, now=100_000, progress=False,
                               on_score=lambda k, s: order.append(k))
    # never-scored (last_scored 0) first in position order, then 50, then 100
    assert order[-2:] == ["D1:14", "D2:1"]


def test_corrupt_store_is_reported_not_reset(tmp_path: Path) -> None:
    p = tmp_path / "store.json"
    p.write_text('{"version": 1, "memories": {"a": ')
    with pytest.raises(StoreError, match=r"store\.json.*corrupt or truncated"):
        MemoryStore(p).last_scored("a")
    assert p.read_text().endswith('"a": ')


# ── finetune ───────────────────────────────────────────────────────
def test_finetune_scores_sorted(ctx: ContextState, client: ScoreClient) -> None:
    n = len(ctx.conversation) // 2
    res = asyncio.run(ascore_finetune(ctx, client, n))
    assert [d for _, d in res] == sorted((d for _, d in res), reverse=True)
    assert {e for e, _ in res} == {i for i in ctx.response_indices() if i >= 34 - n}
    base = ctx.wire_prompt(range(34 - n, 34))
    without = ctx.wire_prompt(range(34 - n, 34), is_memory_node)
    div = divergence(asyncio.run(client.score(base.request())),
                     asyncio.run(client.score(without.request())))
    assert dict(res) == pytest.approx(dict(zip(base.entries, div.tolist(), strict=True)), abs=1e-3)


def test_finetune_candidates_skip_trained_and_blank(
    ctx: ContextState, client: ScoreClient, tmp_path: Path, tokenizer: Any
) -> None:
    trained = TrainedSet(tmp_path / "trained.json")
    cands, stats = score_finetune_candidates(ctx, client, trained=trained)
    assert stats.responses_considered == 7 and stats.error is None
    assert stats.above_threshold == len(cands) > 0
    assert [c.divergence for c in cands] == sorted((c.divergence for c in cands), reverse=True)
    by_entry = {c.entry_idx: c for c in cands}
    # the two answers that only the memories can give lead, far above small talk:
    # 29 "You are Melanie, ..." (identity) and 27 "Caroline is researching adoption agencies." (D2:8)
    assert {cands[0].entry_idx, cands[1].entry_idx} == {27, 29}
    assert min(by_entry[27].divergence, by_entry[29].divergence) > 5.0
    assert all(c.divergence < 5.0 for c in cands[2:])
    top = cands[0]
    cand = by_entry[27]
    node = ctx.conversation[27]
    assert cand.continuation_ids == node.token_ids
    assert list(cand.context_ids) == ctx.wire_prompt(range(0, 27)).tokens.tolist()
    assert cand.timestamp_ns == node.timestamp_ns
    assert cand.prior_context.splitlines()[-1] == "user: What is Caroline researching?"
    # already trained → skipped
    trained.mark([top.timestamp_ns])
    again, st2 = score_finetune_candidates(ctx, client, trained=trained)
    assert top.entry_idx not in [c.entry_idx for c in again]
    assert st2.above_threshold == stats.above_threshold - 1
    # a blank response is never a candidate
    blank = context_from_messages(
        msgs(("memory", "Rex is the dog."), ("user", "Dog?"), ("assistant", "Rex."),
             ("user", "again"), ("assistant", "   "), Rex="dog"), tokenizer)
    cands3, _ = score_finetune_candidates(blank, client, count=5, threshold=-1.0, trained=False)
    assert [c.entry_idx for c in cands3] == [2]


def test_finetune_no_responses(tokenizer: Any, client: ScoreClient) -> None:
    c = context_from_messages(msgs(("user", "a"), ("user", "b")), tokenizer)
    cands, stats = score_finetune_candidates(c, client, trained=False)
    assert cands == [] and stats.responses_considered == 0 and stats.max_divergence == 0.0


def test_alternates_and_train_handoff(
    ctx: ContextState, client: ScoreClient, tokenizer: Any, tmp_path: Path, server: Any
) -> None:
    trained = TrainedSet(tmp_path / "trained.json")
    cands, _ = score_finetune_candidates(
        ctx, client, count=8, trained=trained, alternates=True,
        stop_token_ids=(tokenizer.im_end_id,))
    assert cands
    for c in cands:
        assert c.alternate_error is None and isinstance(c.alternate_text, str)
        assert "<|im_end|>" not in (c.alternate_text or "")
    job = send_to_train(cands, client, trained)
    assert isinstance(job, str) and job
    assert trained.load() == {c.timestamp_ns for c in cands}
    status = httpx.get(f"{server.url}/train/status", params={"job_id": job}).json()
    assert status["samples"] == len(cands)


def test_dedup_key_without_timestamp(tokenizer: Any) -> None:
    c = context_from_messages(msgs(("user", "a"), ("assistant", "b")), tokenizer)
    k = dedup_key(c.conversation[1])
    assert k == dedup_key(c.conversation[1]) and 0 <= k < 2**63


# ── background triggers ────────────────────────────────────────────
def test_memory_trigger_is_noop_while_running(ctx: ContextState, server_url: str,
                                              tmp_path: Path) -> None:
    async def run() -> None:
        c = ScoreClient(server_url)
        task = MemoryScoringTask(c, MemoryStore(tmp_path / "s.json"))
        t1 = task.trigger(ctx.truncated(12), now=1_000_000)
        assert t1 is not None and task.in_flight
        assert task.trigger(ctx) is None and task.trigger_full(ctx) is None
        await task.wait()
        assert not task.in_flight and task.last_incremental is not None
        assert task.state.runs == 1 and task.state.error is None
        t2 = task.trigger_full(ctx.truncated(12))
        assert t2 is not None
        await task.wait()
        assert task.last_matrix is not None and task.last_matrix.shape[1] == 4
        await c.aclose()

    asyncio.run(run())


def test_finetune_trigger_aborts_and_restarts(ctx: ContextState, server_url: str) -> None:
    async def run() -> None:
        c = ScoreClient(server_url)
        task = FinetuneScoringTask(c, trained=False)
        t1 = await task.trigger(ctx)
        t2 = await task.trigger(ctx)  # aborts t1
        assert t1.cancelled() and t1 is not t2
        await task.wait()
        assert task.last_run is not None and task.last_run.error is None
        assert len(task.candidates) == task.last_run.above_threshold
        await c.aclose()

    asyncio.run(run())
