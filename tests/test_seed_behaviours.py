"""The seed's behaviours that the kit once missed (issue 18 part B), model-free.

Each test here failed on main 1bf55f6 and passes now. The scorer is
:class:`tests._fakes.PrefixScorer` (divergence of a memory = 0.01 x its tokens on every later
response), the tokenizer one token per character.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from _fakes import CharTokenizer, PrefixScorer
from _helpers import run_cli, write_jsonl

from scoring_kit.context.io import context_from_messages, load_context, save_context
from scoring_kit.context.model import ContextState
from scoring_kit.scoring import (
    FinetuneScoringTask,
    MemoryScoringTask,
    TrainedSet,
    ascore_memories,
    ascore_memory,
    iter_finetune_candidates,
    score_finetune_candidates,
)
from scoring_kit.scoring.finetune import dedup_key
from scoring_kit.scoring.writeback import LiveContext, write_row

TOK = CharTokenizer()


def conversation(n_pairs: int, *, ts: bool = True) -> ContextState:
    """An identity memory, then ``n_pairs`` user/assistant pairs (assistant timestamps
    1000 + entry index)."""
    rows: list[dict[str, Any]] = [{"role": "identity", "key": "m1", "content": "a fact " * 3}]
    for k in range(n_pairs):
        rows.append({"role": "user", "content": f"question {k}"})
        a: dict[str, Any] = {"role": "assistant", "content": f"answer {k}"}
        if ts:
            a["timestamp"] = 1000 + len(rows) - 1
        rows.append(a)
    return context_from_messages(rows, TOK)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default cache folder (default TrainedSet, MemoryStore) inside tmp_path."""
    monkeypatch.setenv("SCORING_KIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ── B.1 the default trained set is used unless told otherwise ─────────
def test_default_trained_set_skips_trained_responses(cache: Path) -> None:
    ctx = conversation(3)
    first, _ = score_finetune_candidates(ctx, PrefixScorer(), count=6)
    assert len(first) == 3
    top = first[0]
    TrainedSet().mark([top.timestamp_ns])  # what send_to_train does by default
    assert (cache / "trained-responses.json").exists()
    again, stats = score_finetune_candidates(ctx, PrefixScorer(), count=6)
    assert top.entry_idx not in [c.entry_idx for c in again]
    assert stats.above_threshold == 2
    # the iterator, too
    async def collect() -> list[int]:
        return [c.entry_idx async for c in iter_finetune_candidates(ctx, PrefixScorer(),
                                                                      count=6)]
    assert top.entry_idx not in asyncio.run(collect())
    # explicit opt-out: trained=False proposes everything again
    all3, _ = score_finetune_candidates(ctx, PrefixScorer(), count=6, trained=False)
    assert [c.entry_idx for c in all3] == [c.entry_idx for c in first]


def test_finetune_task_uses_default_trained_set(cache: Path) -> None:
    ctx = conversation(2)
    TrainedSet().mark([dedup_key(ctx.conversation[1])])

    async def run(task: FinetuneScoringTask) -> list[int]:
        await task.trigger(ctx, count=4)
        await task.wait()
        return [c.entry_idx for c in task.candidates]

    assert asyncio.run(run(FinetuneScoringTask(PrefixScorer()))) == [3]
    assert sorted(asyncio.run(run(FinetuneScoringTask(PrefixScorer(), trained=False)))) == [1, 3]


# ── B.3 count larger than the conversation is clamped ─────────────────
def test_count_larger_than_conversation_is_clamped(cache: Path) -> None:
    ctx = conversation(7)  # 14 entries, 7 responses (the trained set is empty)
    assert len(ctx.conversation) == 14
    cands, stats = score_finetune_candidates(ctx, PrefixScorer(), count=20)
    assert stats.responses_considered == 7
    assert stats.above_threshold == 7 == len(cands)
    same, st2 = score_finetune_candidates(ctx, PrefixScorer(), count=14)
    assert st2 == stats and [c.entry_idx for c in same] == [c.entry_idx for c in cands]


def test_cli_count_below_one_is_a_usage_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    conv = write_jsonl(tmp_path / "c.jsonl", [{"role": "user", "content": "hi"}])
    for bad in ("0", "-3"):
        r = run_cli(["candidates", conv, "--out", tmp_path / "o.jsonl", "--count", bad], capsys)
        assert r.code == 2
        assert "--count" in r.err and "must be an integer >= 1" in r.err
        assert len(r.err.strip().splitlines()) == 1


# ── B.4 single memory of an identity-only key ─────────────────────────
def test_identity_only_key_scores_zero_without_calls() -> None:
    ctx = context_from_messages([
        {"role": "identity", "key": "me", "content": "You are Ada."},
        {"role": "user", "content": "who are you?"},
        {"role": "assistant", "content": "I am Ada."},
    ], TOK)
    scorer = PrefixScorer()
    assert asyncio.run(ascore_memory(ctx, "me", scorer)) == 0.0
    assert scorer.stats.calls == 0


# ── B.2 per-response memory scores are written back ───────────────────
def two_memories() -> ContextState:
    return context_from_messages([
        {"role": "memory", "key": "big", "content": "x" * 50},  # divergence 0.5 later
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "memory", "key": "tiny", "content": ""},  # its header only: 0.15
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ], TOK)


def test_write_row_sets_above_threshold_and_removes_the_rest() -> None:
    ctx = two_memories()
    stale = ctx.with_memory_scores({2: {"big": 9.0, "other": 1.0}, 5: {"big": 9.0}})
    out = write_row(stale, "big", [2, 5], np.asarray([0.5, 0.005]))
    assert dict(out.conversation[2].memory_scores) == {"big": 0.5, "other": 1.0}
    assert dict(out.conversation[5].memory_scores) == {}  # 0.005 <= 0.01: removed
    # a failed (NaN) row removes the memory's stale values, as the seed's zero row does
    failed = write_row(stale, "big", [2, 5], np.asarray([np.nan, np.nan]))
    assert dict(failed.conversation[2].memory_scores) == {"other": 1.0}
    assert dict(failed.conversation[5].memory_scores) == {}


def test_full_matrix_writes_scores_onto_the_live_context(tmp_path: Path) -> None:
    ctx = two_memories()
    live = LiveContext(ctx)
    seen: list[dict[str, float]] = []

    def on_row(key: str, row: Any, err: str | None) -> None:
        seen.append(dict(live.context.conversation[5].memory_scores))

    m = asyncio.run(ascore_memories(ctx, PrefixScorer(), progress=False, write_back=live,
                                    on_row=on_row))
    assert m.complete
    got = live.context
    tiny = 0.01 * len(ctx.conversation[3].token_ids)
    assert dict(got.conversation[2].memory_scores) == pytest.approx({"big": 0.01 * len(
        ctx.conversation[0].token_ids)})
    assert dict(got.conversation[5].memory_scores) == pytest.approx(
        {"big": 0.01 * len(ctx.conversation[0].token_ids), "tiny": tiny})
    # written row by row, as each finished (the seed's live AST update)
    assert list(seen[0]) == ["big"] and set(seen[1]) == {"big", "tiny"}
    # and saved in the tokenized format
    back = load_context(save_context(got, tmp_path / "ctx.jsonl"))
    assert dict(back.conversation[5].memory_scores) == pytest.approx(
        dict(got.conversation[5].memory_scores))
    line = orjson.loads((tmp_path / "ctx.jsonl").read_bytes().splitlines()[6])
    assert set(line["memory_scores"]) == {"big", "tiny"}


def test_failed_row_removes_stale_scores_in_the_flow() -> None:
    ctx = two_memories().with_memory_scores({2: {"big": 7.0}, 5: {"big": 7.0, "tiny": 3.0}})
    big_len = len(ctx.conversation[0].token_ids)
    full = ctx.wire_prompt()

    def fail_big(req: Any) -> bool:  # the ablation of "big" is the prompt that lost its tokens
        return len(req.prompt) == len(full) - big_len

    live = LiveContext(ctx)
    m = asyncio.run(ascore_memories(ctx, PrefixScorer(fail_big), progress=False,
                                    write_back=live))
    assert m.failed == ["big"]
    assert "big" not in live.context.conversation[2].memory_scores
    assert set(live.context.conversation[5].memory_scores) == {"tiny"}
    # MemoryMatrix.apply_to follows the same rule
    applied = m.apply_to(ctx)
    assert "big" not in applied.conversation[5].memory_scores


def test_background_full_task_keeps_the_written_context(cache: Path) -> None:
    ctx = two_memories()

    async def run() -> MemoryScoringTask:
        task = MemoryScoringTask(PrefixScorer())
        assert task.trigger_full(ctx) is not None
        await task.wait()
        return task

    task = asyncio.run(run())
    assert task.last_context is not None
    assert set(task.last_context.conversation[5].memory_scores) == {"big", "tiny"}
    assert not math.isnan(task.last_context.conversation[2].memory_scores["big"])


def test_cli_score_saves_the_scored_context(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``scoring-kit score`` writes DIR/context.jsonl with the scores (fake session)."""
    import scoring_kit.cli as cli

    ctx = two_memories()

    class FakeSession:
        scorer = PrefixScorer()
        tokenizer_check = None

        def __enter__(self) -> FakeSession:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def load(self, path: Any, *, reading: Any = None) -> ContextState:
            return ctx

    monkeypatch.setattr(cli, "_session", lambda args, **kw: FakeSession())
    monkeypatch.setattr("scoring_kit.analysis.charts.heatmap", lambda m, c=None, **kw: None)
    monkeypatch.setattr("scoring_kit.analysis.export.save_chart", lambda ch, p, **kw: p)
    conv = write_jsonl(tmp_path / "c.jsonl", [{"role": "user", "content": "unused"}])
    r = run_cli(["score", conv, "--out", tmp_path / "out", "--quiet"], capsys)
    assert r.code == 0, r.err
    saved = load_context(tmp_path / "out" / "context.jsonl")
    assert set(saved.conversation[5].memory_scores) == {"big", "tiny"}
