"""The engine's prefix-sharing plan (``scoring_kit.engine.plan``), without a model or torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from scoring_kit._types import Span
from scoring_kit.engine.plan import (
    FULLY_REUSED,
    NO_SOURCE,
    Cached,
    Job,
    Plan,
    batches,
    best_source,
    gain,
    group_plans,
    keep_between_calls,
    lcp,
    lcp_matrix,
    make_job,
    order_jobs,
    plan_job,
    span_positions,
    totals,
)


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def job(slot: int, tokens: Sequence[int], spans: list[Span]) -> Job:
    return make_job(slot, np.asarray(tokens, dtype=np.int64), spans)


def cached(tokens: Sequence[int], kv_len: int, known: int | None = None) -> Cached:
    """A computed prefix whose log-probabilities are known below ``known`` (``-t/10``)."""
    arr = np.asarray(tokens, dtype=np.int64)
    lp = np.full(arr.shape[0] + 1, np.nan)
    upto = kv_len + 1 if known is None else known
    lp[1:upto] = -np.arange(1, upto) / 10
    return Cached(arr, None, kv_len, lp)


def ablation(base: list[int], start: int, end: int) -> list[int]:
    return base[:start] + base[end:]


BASE = list(range(1, 31))  # 30 tokens, no repeats
#: one response span near the end of every prompt
TAIL: list[Span] = [(25, 28)]


@pytest.mark.parametrize("module", ["plan", "stats", "execute", "forward", "sampling", "engine"])
def test_engine_modules_import_no_torch(module: str) -> None:
    """The plan never needs torch; the torch modules import it lazily, when they run."""
    code = (
        f"import sys, scoring_kit.engine.{module}; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- LCPs


def test_lcp_helpers() -> None:
    a = np.array([1, 2, 3, 4], dtype=np.int64)
    assert lcp(a, np.array([1, 2, 9], dtype=np.int64)) == 2
    assert lcp(a, a[:2]) == 2
    assert lcp(a, np.array([], dtype=np.int64)) == 0
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 3, size=int(rng.integers(0, 8))).astype(np.int64) for _ in range(30)]
    m = lcp_matrix(arrays)
    for i, x in enumerate(arrays):
        for j, y in enumerate(arrays):
            assert m[i, j] == lcp(x, y), (i, j)


def test_lcp_no_shared_prefix_and_identical() -> None:
    assert lcp(ids(1, 2, 3), ids(4, 2, 3)) == 0
    assert lcp(ids(1, 2, 3), ids(1, 2, 3)) == 3
    # tokens above 2**8 sort as big-endian words, not bytes: lcp is still exact
    assert lcp(ids(300, 1), ids(300, 2)) == 1


def test_lcp_matrix_edge_cases() -> None:
    assert lcp_matrix([]).shape == (0, 0)
    np.testing.assert_array_equal(lcp_matrix([ids(5, 6, 7)]), [[3]])
    same = lcp_matrix([ids(1, 2, 3), ids(1, 2, 3), ids(1, 2, 3)])
    np.testing.assert_array_equal(same, np.full((3, 3), 3))
    disjoint = lcp_matrix([ids(1, 2), ids(2, 1), ids(3, 3, 3)])
    np.testing.assert_array_equal(disjoint, np.diag([2, 2, 3]))
    # a prefix of another: the shorter length, both ways
    m = lcp_matrix([ids(1, 2, 3, 4), ids(1, 2), ids(1, 2, 3, 9)])
    np.testing.assert_array_equal(m, [[4, 2, 3], [2, 2, 2], [3, 2, 4]])


def test_span_positions_and_totals() -> None:
    np.testing.assert_array_equal(span_positions([(1, 3), (5, 6)]), [1, 2, 5])
    assert span_positions([]).shape == (0,)
    lp = np.array([np.nan, -1.0, -2.0, -3.0, -4.0])
    np.testing.assert_array_equal(totals(lp, [(1, 3), (3, 5)]), [-3.0, -7.0])
    j = job(4, BASE, [(3, 5), (9, 12)])
    assert (j.slot, j.need) == (4, 11)
    np.testing.assert_array_equal(j.targets, [3, 4, 9, 10, 11])


# ---------------------------------------------------------------------------- ordering


def test_order_puts_the_baseline_first_and_makes_it_the_only_parent() -> None:
    cuts = [(3, 6), (10, 12), (18, 21)]
    ablations = [job(k, ablation(BASE, a, b), [(20, 24)]) for k, (a, b) in enumerate(cuts)]
    baseline = job(9, BASE, TAIL)
    jobs = [ablations[0], ablations[1], baseline, ablations[2]]  # the baseline sent third
    got = order_jobs(jobs, [], hub_cache_tokens=0)
    assert got.top == 2 and got.order[0] == 2
    assert got.is_parent == [False, False, True, False]
    # the ablations follow by how much the others reuse from them: the latest cut first
    assert got.order == [2, 3, 1, 0]


def test_order_single_item() -> None:
    one = [job(0, BASE, TAIL)]
    assert order_jobs(one, [], hub_cache_tokens=0).is_parent == [False]
    # kept for the next call when its prefix fits the persistent cache, not otherwise
    assert order_jobs(one, [], hub_cache_tokens=100).is_parent == [True]
    assert order_jobs(one, [], hub_cache_tokens=26).is_parent == [False]
    got = order_jobs(one, [], hub_cache_tokens=27)
    assert (got.order, got.top, got.is_parent) == ([0], 0, [True])


def test_order_identical_prompts() -> None:
    jobs = [job(k, BASE, TAIL) for k in range(3)]
    got = order_jobs(jobs, [], hub_cache_tokens=0)
    assert got.order == [0, 1, 2]  # ties keep the request order
    assert got.is_parent == [True, False, False]


def test_order_no_shared_prefix() -> None:
    short = job(0, [7, 8, 9, 10, 11], [(2, 4)])
    long = job(1, [50, 51, 52, 53, 54, 55, 56, 57], [(3, 7)])
    other = job(2, [90, 91, 92, 93], [(1, 3)])
    got = order_jobs([short, long, other], [], hub_cache_tokens=0)
    assert got.order == [1, 0, 2]  # nothing shared: the longer job first
    assert got.is_parent == [False, False, False]


def test_order_counts_kept_prefixes() -> None:
    kept = cached(BASE, kv_len=27)
    jobs = [job(0, ablation(BASE, 20, 22), [(20, 24)]), job(1, ablation(BASE, 5, 7), [(20, 24)])]
    got = order_jobs(jobs, [kept], hub_cache_tokens=0)
    # each extends the kept prefix the most: neither is a parent of the other
    assert got.is_parent == [False, False]
    assert got.order == [0, 1]
    assert best_source(jobs[0], [kept]) is kept


# ---------------------------------------------------------------------------- plans


def test_plan_without_source_computes_everything() -> None:
    j = job(0, BASE, [(5, 8)])
    p = plan_job(j, None)
    assert p.source is None and p.reuse == 0 and p.end == 7
    np.testing.assert_array_equal(p.compute, [5, 6, 7])
    assert p.lp.shape == (31,) and np.isnan(p.lp).all()


def test_plan_reuses_the_shared_prefix_and_its_logprobs() -> None:
    src = cached(BASE, kv_len=29)
    j = job(0, ablation(BASE, 12, 14), [(8, 11), (20, 23)])
    p = plan_job(j, src)
    # scored tokens before the cut come from the source; the rest are computed
    np.testing.assert_array_equal(p.compute, [20, 21, 22])
    np.testing.assert_allclose(p.lp[8:11], [-0.8, -0.9, -1.0])
    assert p.source is src and p.reuse == 12 and p.end == 22
    assert gain(j, src) == 12


def test_plan_fully_reused_and_unknown_logprobs() -> None:
    src = cached(BASE, kv_len=29)
    same = plan_job(job(0, BASE, [(3, 6)]), src)
    assert same.compute.size == 0 and same.end == 0 and same.reuse == 0
    assert same.source is src
    # log-probs unknown in the source (NaN) are computed, reusing the KV before them
    partial = cached(BASE, kv_len=29, known=4)
    p = plan_job(job(0, BASE, [(3, 6)]), partial)
    np.testing.assert_array_equal(p.compute, [4, 5])
    assert p.reuse == 3 and p.end == 5 and p.source is partial


def test_plan_drops_a_source_it_cannot_use() -> None:
    src = cached([99, *BASE[1:]], kv_len=29)  # differs at the first token
    p = plan_job(job(0, BASE, [(1, 3)]), src)
    assert p.source is None and p.reuse == 0
    np.testing.assert_array_equal(p.compute, [1, 2])


def test_best_source_prefers_the_longest_reuse() -> None:
    j = job(0, BASE, TAIL)
    a = cached(BASE[:10], kv_len=10)
    b = cached([*BASE[:20], 0], kv_len=20)
    c = cached([*BASE[:20], 1], kv_len=20)
    assert best_source(j, [a, b, c]) is b  # the first of the best
    assert best_source(j, [cached([0, 0], kv_len=2)]) is None
    assert best_source(j, []) is None
    assert gain(j, cached(BASE, kv_len=29)) == 27  # never more than the job needs


def test_group_plans_keys() -> None:
    src = cached(BASE, kv_len=29)
    plans = [
        plan_job(job(0, ablation(BASE, 12, 14), TAIL), src),
        plan_job(job(1, BASE, [(3, 5)]), src),  # fully reused
        plan_job(job(2, [70, 71, 72, 73], [(1, 3)]), None),
        plan_job(job(3, ablation(BASE, 15, 16), TAIL), src),
    ]
    groups = group_plans(plans)
    assert list(groups) == [id(src), FULLY_REUSED, NO_SOURCE]
    assert [p.job.slot for p in groups[id(src)]] == [0, 3]
    assert [p.job.slot for p in groups[FULLY_REUSED]] == [1]
    assert [p.job.slot for p in groups[NO_SOURCE]] == [2]


# ---------------------------------------------------------------------------- batches


def _suffix_plan(slot: int, reuse: int, length: int) -> Plan:
    toks = np.arange(reuse + length + 2, dtype=np.int64)
    j = make_job(slot, toks, [(reuse + length, reuse + length + 1)])
    return Plan(j, None, reuse, np.zeros(0), j.targets, reuse + length)


def slots(groups: list[list[Plan]]) -> list[list[int]]:
    return [[p.job.slot for p in g] for g in groups]


def test_batches_off_runs_each_alone_in_order() -> None:
    plans = [_suffix_plan(k, 10, n) for k, n in enumerate([3, 9, 5])]
    for budget, rows in ((0, 64), (1, 64), (1000, 1)):
        got = batches(plans, batch_tokens=budget, max_batch=rows, batch_kv_tokens=10**6)
        assert slots(got) == [[0], [1], [2]]
    one = batches(plans[:1], batch_tokens=1000, max_batch=64, batch_kv_tokens=10**6)
    assert slots(one) == [[0]]


def test_batches_longest_first_within_budgets() -> None:
    plans = [_suffix_plan(k, 10, n) for k, n in enumerate([3, 9, 5, 8, 2])]
    roomy = batches(plans, batch_tokens=1000, max_batch=64, batch_kv_tokens=10**6)
    assert slots(roomy) == [[1, 3, 2, 0, 4]]
    by_rows = batches(plans, batch_tokens=1000, max_batch=2, batch_kv_tokens=10**6)
    assert slots(by_rows) == [[1, 3], [2, 0], [4]]
    # padded suffix tokens: rows x longest suffix <= 20: 2 x 9, then 3 x 5
    by_tokens = batches(plans, batch_tokens=20, max_batch=64, batch_kv_tokens=10**6)
    assert slots(by_tokens) == [[1, 3], [2, 0, 4]]
    # KV rows: rows x (prefix 10 + longest suffix) <= 40: 2 x 19, then 2 x 15 (3 x 15 > 40)
    by_kv = batches(plans, batch_tokens=1000, max_batch=64, batch_kv_tokens=40)
    assert slots(by_kv) == [[1, 3], [2, 0], [4]]
    # a plan alone may exceed the budgets: it still runs
    tiny = batches(plans, batch_tokens=2, max_batch=64, batch_kv_tokens=10**6)
    assert slots(tiny) == [[1], [3], [2], [0], [4]]


# ---------------------------------------------------------------------------- kept prefixes


def test_keep_between_calls() -> None:
    a, b, c, d = (cached(BASE, kv_len=n) for n in (10, 25, 5, 3))
    kept = keep_between_calls([a, a, b, c, d], max_tokens=20, max_entries=4)
    assert [id(x) for x in kept] == [id(a), id(c), id(d)]  # a once; b does not fit beside a
    two = keep_between_calls([a, c, d], max_tokens=100, max_entries=2)
    assert [id(x) for x in two] == [id(a), id(c)]
    assert keep_between_calls([], max_tokens=100, max_entries=2) == []


@pytest.mark.parametrize("limit", [0, 4])
def test_keep_between_calls_nothing_fits(limit: int) -> None:
    assert keep_between_calls([cached(BASE, kv_len=10)], max_tokens=limit, max_entries=4) == []
