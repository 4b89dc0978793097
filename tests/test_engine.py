"""The embedded engine against an independent computation on the real SmolLM2 model.

The reference is the plainest thing that can be written: one ``model(input_ids).logits``
forward of the whole prompt, a log-softmax, a gather and a sum per span. The log-softmax is
taken in float64 because torch's float32 CPU ``log_softmax`` is biased by about 1e-5 per
token (its error grows with the span length); the engine's ``x - logsumexp(x)`` is within
about 2e-6 of the float64 value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from scoring_kit._exceptions import ConfigError, ModelLoadError, PromptError
from scoring_kit.engine.engine import Engine, EngineStats
from scoring_kit.engine.plan import lcp

TOL = 1e-3

_TEXT = (
    "the agent remembers that alice moved to lisbon in march and likes green tea while bob "
    "plays chess on tuesdays with his sister near the old harbour library every week because "
    "the weather there is mild and the coffee is strong enough for long evening talks"
)
_WORDS = _TEXT.split(" ")


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_WORDS, n))


@dataclass
class Convo:
    """A ChatML prompt built from nodes, with assistant spans and memory node runs."""

    nodes: list[list[int]]
    kinds: list[str]  # "system" | "memory" | "user" | "assistant"

    def render(self, skip: Sequence[int] = ()) -> tuple[list[int], list[tuple[int, int]]]:
        toks: list[int] = []
        spans: list[tuple[int, int]] = []
        for i, (node, kind) in enumerate(zip(self.nodes, self.kinds, strict=True)):
            if i in skip:
                continue
            if kind == "assistant":
                spans.append((len(toks), len(toks) + len(node)))
            toks.extend(node)
        return toks, spans

    def run(self, i: int) -> tuple[int, int]:
        """[start, end) of node ``i`` in the full rendering."""
        start = sum(len(n) for n in self.nodes[:i])
        return start, start + len(self.nodes[i])

    def memories(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "memory"]


def make_convo(tok: Any, *, pairs: int, memories_at: Sequence[int], seed: int = 0) -> Convo:
    """System, then user/assistant pairs with a memory node before each pair in ``memories_at``."""
    rng = np.random.default_rng(seed)

    def node(role: str, body: str) -> list[int]:
        return [tok.im_start_id, *tok.encode(f"{role}\n{body}"), tok.im_end_id, *tok.encode("\n")]

    nodes = [node("system", "You are a helpful agent with a memory.")]
    kinds = ["system"]
    for p in range(pairs):
        if p in memories_at:
            nodes.append(node("system", "memory: " + _text(rng, 12)))
            kinds.append("memory")
        nodes.append(node("user", _text(rng, 10)))
        kinds.append("user")
        nodes.append(node("assistant", _text(rng, 14)))
        kinds.append("assistant")
    return Convo(nodes, kinds)


def reference_totals(
    engine: Engine, prompt: Sequence[int], spans: Sequence[tuple[int, int]]
) -> Any:
    """Independent: full forward, logits at every position, log_softmax, gather, sum."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        logits = engine.model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        tok_lp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
    # tok_lp[t - 1] = log P(prompt[t] | prompt[:t])
    return np.array([tok_lp[a - 1 : b - 1].sum() for a, b in spans])


def n_scored(spans: Sequence[tuple[int, int]]) -> int:
    return sum(b - a for a, b in spans)


@pytest.fixture(scope="module")
def convo(tokenizer: Any) -> Convo:
    # ~450 tokens: memories early, in the middle (two in a row) and late
    return make_convo(tokenizer, pairs=7, memories_at=(0, 2, 3, 5), seed=1)


@pytest.fixture(scope="module")
def reference(engine: Engine) -> Any:
    """``reference_totals``, memoised per (prompt, spans) across this module's tests."""
    memo: dict[tuple[tuple[int, ...], tuple[tuple[int, int], ...]], Any] = {}

    def ref(prompt: Sequence[int], spans: Sequence[tuple[int, int]]) -> Any:
        key = (tuple(int(t) for t in prompt), tuple(spans))
        if key not in memo:
            memo[key] = reference_totals(engine, prompt, spans)
        return memo[key]

    return ref


@pytest.fixture()
def fresh(engine: Engine) -> Engine:
    """The session engine with its prefix cache emptied and its stats zeroed."""
    engine.clear_cache()
    engine.reset_stats()
    return engine


# ---------------------------------------------------------------------------- score


def test_score_matches_reference(fresh: Engine, convo: Convo, reference: Any) -> None:
    prompt, spans = convo.render()
    got = fresh.score(prompt, spans)
    assert got.dtype == np.float64 and got.shape == (len(spans),)
    np.testing.assert_allclose(got, reference(prompt, spans), atol=TOL, rtol=0)
    assert np.all(got < 0)
    # logits only at the scored rows; nothing after the last scored token is run
    assert fresh.stats.logit_rows == n_scored(spans)
    assert fresh.stats.forward_tokens == spans[-1][1] - 1
    assert fresh.stats.calls == 1


def test_score_naive_equals_score(fresh: Engine, convo: Convo) -> None:
    prompt, spans = convo.render(skip=(convo.memories()[0],))
    fast = fresh.score(prompt, spans)
    fresh.reset_stats()
    naive = fresh.score_naive(prompt, spans)
    np.testing.assert_allclose(naive, fast, atol=TOL, rtol=0)
    assert fresh.stats.logit_rows == len(prompt)  # logits at every position
    assert fresh.stats.forward_tokens == len(prompt)


def test_score_many_prefix_reuse_matches_scratch(
    fresh: Engine, convo: Convo, reference: Any
) -> None:
    mems = convo.memories()
    base, base_spans = convo.render()
    items: list[tuple[list[int], list[tuple[int, int]]]] = [(base, base_spans)]
    items += [convo.render(skip=(m,)) for m in mems]
    import warnings

    with warnings.catch_warnings():
        # the engine passes the KV cache by this transformers' own keyword: no
        # "`past_key_values` is deprecated" FutureWarning in cells or CLI output
        warnings.simplefilter("error", FutureWarning)
        results = fresh.score_many(items)
    st = fresh.stats.copy()
    # every item equals its own from-scratch computation
    for (prompt, spans), got in zip(items, results, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, reference(prompt, spans), atol=TOL, rtol=0)
    # exact-LOO minimum: the baseline once, then for each ablation what follows the removed run
    big_l = len(base)
    minimum = big_l + sum(big_l - convo.run(m)[1] for m in mems)
    assert st.forward_tokens <= minimum < sum(len(p) for p, _ in items)
    assert st.cache_hits_tokens >= sum(convo.run(m)[0] for m in mems)
    # each scored token's logits are computed once, or reused from the shared prefix
    total_scored = sum(n_scored(s) for _, s in items)
    assert st.logit_rows + st.reused_logprobs == total_scored
    assert st.logit_rows == n_scored(base_spans) + sum(
        sum(1 for a, b in spans for t in range(a, b) if t >= lcp(np.array(p), np.array(base)))
        for p, spans in items[1:]
    )
    assert st.calls == len(items)


def test_score_many_any_order_nested_and_bad_items(
    fresh: Engine, convo: Convo, reference: Any
) -> None:
    mems = convo.memories()
    base, base_spans = convo.render()
    one, one_spans = convo.render(skip=(mems[1],))
    two, two_spans = convo.render(skip=(mems[1], mems[3]))
    late, late_spans = convo.render(skip=(mems[3],))
    items: list[tuple[Any, Any]] = [
        (two, two_spans),  # nested ablation first
        ([], []),  # bad: empty prompt
        (late, late_spans),
        (base, [(0, 3)]),  # bad: start 0
        (np.asarray(base), base_spans),  # baseline last, as a numpy array
        (one, one_spans),
        (one, []),  # no ranges: empty result
    ]
    results = fresh.score_many(items)
    assert isinstance(results[1], PromptError)
    assert isinstance(results[3], PromptError) and "starts at 0" in str(results[3])
    assert isinstance(results[6], np.ndarray) and results[6].shape == (0,)
    scored = [r for r in results if isinstance(r, np.ndarray)]
    assert len(scored) == 5
    for k in (0, 2, 4, 5):
        prompt, spans = items[k]
        got = results[k]
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, reference(prompt, spans), atol=TOL, rtol=0)
    # the nested ablation extends the single ablation (its prefix is longer than the base's)
    s1, e1 = convo.run(mems[1])
    s3 = convo.run(mems[3])[0]
    bound = len(base) + (len(one) - s1) + (len(two) - (s3 - (e1 - s1))) + (len(late) - s3)
    assert fresh.stats.forward_tokens <= bound


def test_persistent_prefix_cache(fresh: Engine, convo: Convo) -> None:
    """The seed's /score traffic: the baseline alone, then its ablations one call each."""
    base, spans = convo.render()
    first = fresh.score(base, spans)
    mems = convo.memories()
    for mem in (mems[0], mems[-1]):  # early, then late: both extend the kept baseline
        abl, abl_spans = convo.render(skip=(mem,))
        before = fresh.stats.copy()
        fresh.score(abl, abl_spans)
        delta = fresh.stats.minus(before)
        assert delta.cache_hits_tokens >= convo.run(mem)[0]
        assert delta.forward_tokens <= len(base) - convo.run(mem)[1]
    # the baseline again: everything is known already
    before = fresh.stats.copy()
    np.testing.assert_allclose(fresh.score(base, spans), first, atol=TOL, rtol=0)
    assert fresh.stats.minus(before).forward_tokens == 0
    fresh.clear_cache()
    fresh.reset_stats()
    fresh.score(abl, abl_spans)
    assert fresh.stats.cache_hits_tokens == 0


def test_score_many_counted_reports_this_call(fresh: Engine, convo: Convo) -> None:
    base, spans = convo.render()
    abl, abl_spans = convo.render(skip=(convo.memories()[0],))
    fresh.score(base, spans)  # something counted before the call
    before = fresh.stats.copy()
    bad = ([1, 2, 3], [(0, 2)])  # start 0 has no context: invalid
    results, delta = fresh.score_many_counted([(abl, abl_spans), bad, (base, spans)])
    assert delta == fresh.stats.minus(before)
    assert delta.calls == 3
    assert 0 < delta.forward_tokens <= len(abl)
    assert isinstance(results[1], PromptError)
    # the same results as score_many
    again = fresh.score_many([(abl, abl_spans), bad, (base, spans)])
    for got, want in ((results[0], again[0]), (results[2], again[2])):
        assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray)
        np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)


def test_batched_suffixes_match_reference(engine: Engine, convo: Convo, reference: Any) -> None:
    """The GPU path (right-padded suffix batches with a custom mask) run on CPU."""
    batched = Engine(
        engine.model,
        engine.tokenizer,
        batch_tokens=1 << 20,
        chunk_tokens=128,  # several chunks per batch: mask offsets across chunks
        prefix_cache_tokens=0,
    )
    base, base_spans = convo.render()
    mems = convo.memories()
    items = [(base, base_spans)] + [convo.render(skip=(m,)) for m in mems]
    got = batched.score_many(items)
    st = batched.stats
    assert st.pad_tokens > 0  # it really batched
    # the baseline in chunks, then all the ablations' suffixes together
    longest = max(len(p) - convo.run(m)[1] for (p, _), m in zip(items[1:], mems, strict=True))
    base_passes = -(-(base_spans[-1][1] - 1) // 128)
    assert st.forward_passes <= base_passes + -(-longest // 128)
    big_l = len(base)
    assert st.forward_tokens <= big_l + sum(big_l - convo.run(m)[1] for m in mems)
    for (prompt, spans), g in zip(items, got, strict=True):
        assert isinstance(g, np.ndarray)
        np.testing.assert_allclose(g, reference(prompt, spans), atol=TOL, rtol=0)


def test_long_prompt_chunked_matches_unchunked(engine: Engine, tokenizer: Any) -> None:
    long = make_convo(tokenizer, pairs=52, memories_at=range(0, 52, 6), seed=7)
    prompt, spans = long.render()
    assert 2100 <= len(prompt) <= 2600  # > 2 default chunks, 4+ chunks of 512
    # long spans too: merge neighbouring assistant spans with what lies between them
    spans = [(spans[0][0], spans[10][1]), *spans[11:]]
    small = Engine(
        engine.model, engine.tokenizer, chunk_tokens=512, logit_chunk_rows=64, prefix_cache_tokens=0
    )
    whole = Engine(engine.model, engine.tokenizer, chunk_tokens=8192, prefix_cache_tokens=0)
    a = small.score(prompt, spans)
    b = whole.score(prompt, spans)
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    assert small.stats.forward_passes == -(-(spans[-1][1] - 1) // 512)
    assert whole.stats.forward_passes == 1


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("prompt", "ranges", "needles"),
    [
        ([], [], ["empty", "2 tokens"]),
        ([1, 2, 3], [(0, 2)], ["starts at 0", "1 or later"]),
        ([1, 2, 3], [(2, 2)], ["[2, 2)", "end must be > start"]),
        ([1, 2, 3], [(1, 4)], ["end 4", "prompt length 3"]),
        ([1, 2, 3, 4, 5], [(1, 3), (2, 4)], ["overlaps", "ends at 3"]),
        ([1, 2, 3, 4, 5], [(3, 4), (1, 2)], ["[1, 2)", "ends at 4"]),
        ([1, 49152, 3], [(1, 2)], ["49152", "position 1", "[0, 49152)"]),
        ([1, -1, 3], [(1, 2)], ["-1", "position 1", "[0, 49152)"]),
        ([1] * 8193, [(1, 2)], ["8193", "8192"]),
    ],
    ids=[
        "empty",
        "start<1",
        "end<=start",
        "end>len",
        "overlap",
        "unsorted",
        "id>=vocab",
        "negative-id",
        "too-long",
    ],
)
def test_invalid_requests_name_limit_and_value(
    engine: Engine, prompt: list[int], ranges: list[tuple[int, int]], needles: list[str]
) -> None:
    with pytest.raises(PromptError) as info:
        engine.score(prompt, ranges)
    for needle in needles:
        assert needle in str(info.value)
    with pytest.raises(PromptError):
        engine.score_naive(prompt, ranges)
    out = engine.score_many([(prompt, ranges), ([1, 2, 3], [(1, 3)])])
    assert isinstance(out[0], PromptError) and str(out[0]) == str(info.value)
    assert isinstance(out[1], np.ndarray) and out[1].shape == (1,)


# ---------------------------------------------------------------------------- generate


def _chat_prompt(tok: Any) -> list[int]:
    return [
        tok.im_start_id,
        *tok.encode("user\nWhat is the capital of France? Answer in one sentence."),
        tok.im_end_id,
        *tok.encode("\n"),
        tok.im_start_id,
        *tok.encode("assistant\n"),
    ]


def test_generate_greedy_stop_and_max_tokens(engine: Engine, tokenizer: Any) -> None:
    prompt = _chat_prompt(tokenizer)
    kw: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    ids, text = engine.generate(prompt, max_tokens=12, **kw)
    assert len(ids) == 12
    assert text == tokenizer.decode(ids)
    again, _ = engine.generate(prompt, max_tokens=12, **kw)
    assert again == ids  # greedy is deterministic
    short, _ = engine.generate(prompt, max_tokens=5, **kw)
    assert short == ids[:5]
    # stop at the first occurrence of a token, which is not returned
    k = 3
    stop = ids[k]
    first = ids.index(stop)
    stopped, stext = engine.generate(prompt, max_tokens=12, stop_token_ids=[stop], **kw)
    assert stopped == ids[:first]
    assert stext == tokenizer.decode(ids[:first])
    none, ntext = engine.generate(prompt, max_tokens=0, **kw)
    assert none == [] and ntext == ""


def test_generate_sampling_seeded(engine: Engine, tokenizer: Any) -> None:
    prompt = _chat_prompt(tokenizer)
    kw: dict[str, Any] = {"max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "top_k": 20}
    a, _ = engine.generate(prompt, seed=5, **kw)
    b, _ = engine.generate(prompt, seed=5, **kw)
    assert a == b and 0 < len(a) <= 8
    assert all(0 <= t < engine.vocab_size for t in a)
    with pytest.raises(PromptError, match="top_p"):
        engine.generate(prompt, max_tokens=2, temperature=1.0, top_p=0.0, top_k=0)
    with pytest.raises(PromptError, match="empty"):
        engine.generate([], max_tokens=2, temperature=0.0, top_p=1.0, top_k=0)


def test_stats_helpers() -> None:
    a = EngineStats(calls=2, forward_tokens=10, seconds=1.5)
    b = a.copy()
    b.add(EngineStats(calls=1, forward_tokens=5))
    d = b.minus(a)
    assert (d.calls, d.forward_tokens, d.seconds) == (1, 5, 0.0)


def test_engine_attributes(engine: Engine) -> None:
    assert engine.name == "SmolLM2-135M-Instruct"
    assert engine.vocab_size == 49152
    assert engine.max_len == 8192
    assert engine.device.split(":")[0] in ("cpu", "cuda", "mps")
    assert engine.tokenizer.im_end_id == 2
    assert "SmolLM2" in repr(engine)


def test_model_path_and_device_come_from_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from scoring_kit.engine import loader

    assert loader.MODEL_PATH_ENV == "SCORING_KIT_MODEL_PATH"
    monkeypatch.setenv("SCORING_KIT_MODEL_PATH", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match=r"nope\.gguf"):
        loader.resolve_model()
    monkeypatch.setenv("SCORING_KIT_MODEL_PATH", "")  # empty counts as unset
    assert loader.resolve_model().name == loader.DEFAULT_MODEL_NAME
    import torch

    if torch.cuda.is_available():
        return
    monkeypatch.setenv("SCORING_KIT_DEVICE", "cuda:7")
    with pytest.raises(ModelLoadError, match="cuda:7"):
        Engine.load()


@pytest.mark.parametrize("option", ["chunk_tokens", "logit_chunk_rows"])
def test_bad_engine_options_are_config_errors(engine: Engine, option: str) -> None:
    with pytest.raises(ConfigError, match=f"{option} must be >= 1, got 0") as info:
        Engine(engine.model, engine.tokenizer, **{option: 0})
    assert isinstance(info.value, ValueError)
