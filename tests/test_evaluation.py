"""Attribution evaluation: metrics, methods on a synthetic scorer, LoCoMo cases, harness,
and one small real-model smoke run."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from scoring_kit import ScoringKitError
from scoring_kit._exceptions import BackendError, ContextError, ScoringError
from scoring_kit.backends.base import CompletionRequest, ScoreRequest, ScorerStats
from scoring_kit.evaluation import (
    BASELINE_LABEL,
    METHODS,
    Case,
    EvaluationResult,
    PreparedCase,
    build_cases,
    default_locomo_path,
    evaluate,
    get_method,
    gold_rank,
    hit_at_k,
    lexical_scores,
    random_baseline,
    recall_at_k,
    reciprocal_rank,
    run_evaluate_cli,
    surrogate,
)
from scoring_kit.evaluation.metrics import expected_reciprocal_rank

LOCOMO = default_locomo_path()
needs_locomo = pytest.mark.skipif(not LOCOMO.exists(), reason=f"no LoCoMo data at {LOCOMO}")


# ── a synthetic world ─────────────────────────────────────────────
class CharTokenizer:
    """One token per character (id = code point + 3); ChatML markers are ids 1 and 2."""

    name = "chars"
    vocab_size = 0x110000 + 3
    im_start_id = 1
    im_end_id = 2

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 3 for c in text]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i - 3) if i >= 3 else "" for i in ids)


class LinearScorer:
    """The response log-prob is ``base + sum(weight[k] for present memories) + noise``."""

    name = "linear"

    def __init__(
        self,
        weights: dict[str, float],
        *,
        base: float = -30.0,
        noise: float = 0.0,
        seed: int = 0,
        fail_on: str | None = None,
    ) -> None:
        self.weights = weights
        self.base = base
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.fail_on = fail_on
        self.stats = ScorerStats()
        self.tokenizer = CharTokenizer()

    def present(self, request: ScoreRequest) -> list[str]:
        text = self.tokenizer.decode(request.prompt)
        return [k for k in self.weights if f"[memory: {k}]" in text]

    async def score(self, request: ScoreRequest) -> np.ndarray:
        self.stats.calls += 1
        keys = self.present(request)
        if self.fail_on is not None and self.fail_on not in keys:
            raise BackendError("synthetic failure", backend=self.name)
        v = self.base + sum(self.weights[k] for k in keys) + self.rng.normal(0, self.noise)
        return np.array([v] * len(request.ranges))

    async def score_batch(self, requests: Sequence[ScoreRequest]) -> list[Any]:
        out: list[Any] = []
        for r in requests:
            try:
                out.append(await self.score(r))
            except BackendError as exc:
                out.append(exc)
        return out

    async def complete(self, request: CompletionRequest) -> str:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def make_case(n: int, gold: int, *, case_id: str = "synthetic/q0", category: int = 2) -> Case:
    memories = tuple((f"M{i}", f"memory number {i} about topic {i}") for i in range(n))
    question, answer = "What about topic?", f"topic {gold}"
    messages = (
        {"role": "system", "content": "sys"},
        *({"role": "memory", "key": k, "content": t} for k, t in memories),
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    )
    return Case(case_id, category, question, answer, memories, f"M{gold}", messages)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ── metrics ───────────────────────────────────────────────────────
def test_metrics_known_answers() -> None:
    s = [0.1, 0.7, 0.3, 0.9]
    assert gold_rank(s, 3) == 1 and gold_rank(s, 1) == 2 and gold_rank(s, 0) == 4
    assert hit_at_k(s, 3, 1) == 1.0
    assert hit_at_k(s, 1, 1) == 0.0 and hit_at_k(s, 1, 2) == 1.0
    assert recall_at_k(s, 2, 3) == 1.0 and recall_at_k(s, 0, 3) == 0.0
    assert recall_at_k(s, [3, 1], 2) == 1.0
    assert recall_at_k(s, [3, 0], 2) == 0.5
    assert reciprocal_rank(s, 1) == 0.5 and reciprocal_rank(s, 0) == 0.25
    assert reciprocal_rank(s, [0, 1]) == 0.5


def test_metrics_ties_are_pessimistic_and_nan_is_last() -> None:
    # gold tied with one other memory: ranked after it
    assert gold_rank([0.5, 0.5, 0.1], 0) == 2
    assert hit_at_k([0.5, 0.5, 0.1], 0, 1) == 0.0
    # all tied (e.g. clamped divergence all zero): last
    assert gold_rank([0.0] * 5, 2) == 5
    assert reciprocal_rank([0.0] * 5, 2) == pytest.approx(0.2)
    # NaN (failed ablation) is below every real score
    assert gold_rank([np.nan, -5.0, 1.0], 0) == 3
    assert gold_rank([np.nan, -5.0, 1.0], 1) == 2


def test_metrics_errors_name_the_problem() -> None:
    with pytest.raises(ScoringError, match="out of range for 3 scores"):
        hit_at_k([1, 2, 3], 3, 1)
    with pytest.raises(ScoringError, match="k must be"):
        hit_at_k([1, 2, 3], 0, 0)
    with pytest.raises(ScoringError, match="empty"):
        reciprocal_rank([], 0)


def test_random_baseline_matches_monte_carlo() -> None:
    b = random_baseline(5)
    assert b["hit@1"] == pytest.approx(0.2)
    assert b["recall@3"] == pytest.approx(0.6)
    assert b["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5)
    assert random_baseline(2)["recall@3"] == 1.0
    rng = np.random.default_rng(0)
    rr = [reciprocal_rank(rng.random(5), 0) for _ in range(20_000)]
    assert np.mean(rr) == pytest.approx(expected_reciprocal_rank(5), abs=0.01)


# ── methods on the synthetic scorer ───────────────────────────────
def test_surrogate_recovers_planted_weights() -> None:
    n = 8
    planted = np.array([2.5, 0.0, 0.0, 1.2, 0.0, -0.8, 0.0, 0.4])
    case = make_case(n, gold=0)
    scorer = LinearScorer({f"M{i}": float(w) for i, w in enumerate(planted)}, noise=0.02)
    prepared = PreparedCase.build(case, scorer.tokenizer)
    out = run(surrogate(64, alpha=0.001).arun(scorer, prepared, seed=3))
    np.testing.assert_allclose(out.scores, planted, atol=0.05)
    assert out.extra["r2"] > 0.99
    assert 0 < out.n_calls <= 64  # identical masks are scored once
    assert out.n_calls == scorer.stats.calls
    # the default registry entry too (32 masks, alpha 0.01): right order, near values
    out32 = run(METHODS["surrogate"].arun(scorer, prepared, seed=3))
    assert np.argmax(out32.scores) == 0
    np.testing.assert_allclose(out32.scores, planted, atol=0.25)


def test_loo_and_sufficiency_are_exact_on_a_linear_model() -> None:
    planted = {"M0": 0.0, "M1": 3.0, "M2": -1.0, "M3": 0.5}
    scorer = LinearScorer(planted)
    prepared = PreparedCase.build(make_case(4, gold=1), scorer.tokenizer)
    cache: dict[str, Any] = {}
    loo = run(get_method("loo").arun(scorer, prepared, cache=cache))
    np.testing.assert_allclose(loo.extra["delta"], [0.0, 3.0, -1.0, 0.5])
    np.testing.assert_allclose(loo.scores, [0.0, 3.0, 0.0, 0.5])  # clamped
    assert loo.n_calls == 5
    signed = run(get_method("loo_signed").arun(scorer, prepared, cache=cache))
    np.testing.assert_allclose(signed.scores, [0.0, 3.0, -1.0, 0.5])
    assert signed.n_calls == 5 and scorer.stats.calls == 5  # reused, not rescored
    suff = run(get_method("sufficiency").arun(scorer, prepared, cache=cache))
    np.testing.assert_allclose(suff.scores, [0.0, 3.0, -1.0, 0.5])
    combo = run(get_method("loo+sufficiency").arun(scorer, prepared, cache=cache))
    assert np.argmax(combo.scores) == 1 and np.argmin(combo.scores) == 2
    assert combo.n_calls == 10


def test_lexical_and_random() -> None:
    s = lexical_scores(
        ["Caroline is researching adoption agencies.", "Melanie painted a lake sunrise."],
        "What did Caroline research? Adoption agencies",
    )
    assert s[0] > 0 and s[1] == 0
    prepared = PreparedCase(make_case(6, gold=2), None, tuple(f"M{i}" for i in range(6)), 2)
    a = run(get_method("random").arun(None, prepared, seed=1))  # type: ignore[arg-type]
    b = run(get_method("random").arun(None, prepared, seed=1))  # type: ignore[arg-type]
    c = run(get_method("random").arun(None, prepared, seed=2))  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_get_method_lists_valid_names() -> None:
    with pytest.raises(ScoringKitError, match=r"unknown attribution method 'nope'.*loo.*random"):
        get_method("nope")
    assert {"loo", "sufficiency", "surrogate", "lexical", "random"} <= set(METHODS)


# ── harness ───────────────────────────────────────────────────────
def test_evaluate_synthetic(tmp_path: Path) -> None:
    cases = [make_case(5, gold=g, case_id=f"s/q{g}", category=1 + g % 2) for g in range(5)]
    weights = {f"M{i}": 0.1 * i for i in range(5)}
    # gold memory g gets a large weight on its own case: emulate by one scorer per case is
    # overkill; instead make memory M4 dominant, so loo hits only on the case with gold 4
    weights["M4"] = 5.0
    scorer = LinearScorer(weights)
    res = evaluate(scorer, cases, ("loo", "loo_signed", "sufficiency", "lexical", "random"),
                   progress=False)
    pc = res.per_case
    assert pc.height == 25
    assert set(pc.columns) >= {"case_id", "category", "method", "gold_rank", "hit1",
                                "recall3", "rr", "n_calls", "seconds"}
    loo = pc.filter(pc["method"] == "loo")
    assert loo["hit1"].to_list() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert loo["n_calls"].to_list() == [6] * 5
    summ = res.summary
    assert summ["method"].to_list()[-1] == BASELINE_LABEL
    base = summ.filter(summ["method"] == BASELINE_LABEL).row(0, named=True)
    assert base["hit@1"] == pytest.approx(0.2)
    assert {"hit@1_cat1", "hit@1_cat2", "recall@3", "MRR", "calls_per_case"} <= set(summ.columns)
    row = summ.filter(summ["method"] == "loo").row(0, named=True)
    assert row["hit@1"] == pytest.approx(0.2) and row["n_cases"] == 5
    chart = res.chart()
    assert chart.to_dict()["facet"]["column"]["field"] == "metric"
    out = res.save(tmp_path / "eval.parquet")
    back = EvaluationResult.load(out)
    assert back.per_case.equals(res.per_case)
    assert back.meta["methods"] == res.meta["methods"]


def test_evaluate_records_failures_without_losing_other_cases() -> None:
    cases = [make_case(3, gold=0, case_id="s/q0")]
    scorer = LinearScorer({"M0": 1.0, "M1": 0.0, "M2": 0.0}, fail_on="M0")
    res = evaluate(scorer, cases, ("loo", "lexical"), progress=False)
    loo = res.per_case.filter(res.per_case["method"] == "loo").row(0, named=True)
    assert loo["error"] is not None and "without M0" in loo["error"]
    assert loo["hit1"] is None
    summ = res.summary.filter(res.summary["method"] == "loo").row(0, named=True)
    assert summ["n_failed"] == 1 and summ["n_cases"] == 0
    lex = res.per_case.filter(res.per_case["method"] == "lexical").row(0, named=True)
    assert lex["error"] is None


# ── LoCoMo cases ──────────────────────────────────────────────────
def test_missing_locomo_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ContextError, match=r"LoCoMo data not found.*SCORING_KIT_LOCOMO"):
        build_cases(tmp_path / "nope.json")


@needs_locomo
def test_build_cases_is_deterministic_and_holds_gold() -> None:
    a = build_cases(n_cases=30, memories_per_case=6, seed=7)
    b = build_cases(n_cases=30, memories_per_case=6, seed=7)
    c = build_cases(n_cases=30, memories_per_case=6, seed=8)
    assert a == b and a != c
    assert build_cases(n_cases=10, memories_per_case=6, seed=7) == a[:10]
    assert len({x.id for x in a}) == 30
    for case in a:
        assert case.category in (1, 2, 3)
        assert len(case.memories) == 6 and len(set(case.keys)) == 6
        assert case.gold_key in case.keys
        assert case.keys[case.gold_index] == case.gold_key
        assert case.messages[-1] == {"role": "assistant", "content": case.answer}
        assert case.messages[-2] == {"role": "user", "content": case.question}
        mem_msgs = [m for m in case.messages if m["role"] == "memory"]
        assert [(m["key"], m["content"]) for m in mem_msgs] == list(case.memories)
    # the gold position is shuffled, not always first
    assert len({x.gold_index for x in a}) > 1
    # stratified: every category with eligible pairs is represented
    assert {x.category for x in a} == {1, 2, 3}


@needs_locomo
def test_build_cases_too_many_names_the_count() -> None:
    with pytest.raises(ContextError, match=r"only \d+ QA pairs are eligible"):
        build_cases(n_cases=100_000)


@needs_locomo
def test_cli_model_free(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = SimpleNamespace(method=["lexical", "random"], cases=6, memories=4, seed=0,
                           out=str(tmp_path / "e.parquet"), locomo=None, progress=False)
    assert run_evaluate_cli(args) == 0
    printed = capsys.readouterr().out
    assert "lexical" in printed and BASELINE_LABEL in printed
    res = EvaluationResult.load(tmp_path / "e.parquet")
    assert res.per_case.height == 12
    bad = SimpleNamespace(method=["nope"], cases=1, memories=2, seed=0, out=None, locomo=None)
    assert run_evaluate_cli(bad) == 1
    assert "valid methods" in capsys.readouterr().err


# ── real model ────────────────────────────────────────────────────
@needs_locomo
def test_real_model_smoke(engine: Any) -> None:
    from scoring_kit.backends.local import LocalScorer

    cases = build_cases(n_cases=2, memories_per_case=3, seed=0)
    res = evaluate(LocalScorer(engine), cases, ("loo",), progress=False)
    pc = res.per_case
    assert pc.height == 2 and pc["error"].null_count() == 2
    assert pc["n_calls"].to_list() == [4, 4]
    for scores in pc["scores"].to_list():
        assert len(scores) == 3 and all(math.isfinite(v) and v >= 0 for v in scores)
