"""Split-prefix attention (scoring_kit/engine/attention.py) against torch's own SDPA."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from scoring_kit.engine import attention
from scoring_kit.engine.engine import Engine

torch = pytest.importorskip("torch")
F = torch.nn.functional


class _Module:
    """What transformers' attention functions read from the attention module."""

    num_key_value_groups = 3
    is_causal = True
    training = False


def _reference(q: Any, k: Any, v: Any, mask: Any, scale: float) -> Any:
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def _qkv(b: int, q: int, k: int, seed: int = 0) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 9, q, 64, generator=g),
        torch.randn(b, 3, k, 64, generator=g),
        torch.randn(b, 3, k, 64, generator=g),
    )


@pytest.mark.skipif(not attention.available("cpu"), reason="this torch lacks the CPU flash op")
@pytest.mark.parametrize("bool_mask", [True, False])
def test_split_equals_masked_sdpa_with_per_row_prefixes(bool_mask: bool) -> None:
    # two rows extend one cached prefix of 300 keys from different points (the batched
    # suffix layout): keys [0, 200) are seen by both, [200, 300) by row 0 only
    b, nq, prefix = 2, 40, 300
    q, k, v = _qkv(b, nq, prefix + nq)
    starts = torch.tensor([300, 200])
    vis = torch.arange(prefix)[None, :] < starts[:, None]
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    mask = torch.cat([vis[:, None, :].expand(b, nq, prefix), causal[None].expand(b, -1, -1)], 2)
    mask = mask[:, None]
    if not bool_mask:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    want = _reference(q, k, v, mask, 0.125)
    got, weights = attention.split_prefix_attention(
        _Module(), q, k, v, mask, scaling=0.125, visible_prefix=200
    )
    assert weights is None
    assert got.shape == (b, nq, 9, 64)
    assert float((got - want).abs().max()) < 1e-5
    # the promise broken (row 1 cannot see keys 200-299) gives a different answer: the
    # visible prefix really is attended to without the mask
    wrong, _ = attention.split_prefix_attention(
        _Module(), q, k, v, mask, scaling=0.125, visible_prefix=300
    )
    assert float((wrong - want)[1].abs().max()) > 1e-2


@pytest.mark.skipif(not attention.available("cpu"), reason="this torch lacks the CPU flash op")
def test_split_causal_rest_equals_masked_sdpa() -> None:
    nq, prefix = 64, 500
    q, k, v = _qkv(1, nq, prefix + nq, seed=1)
    mask = torch.ones(nq, prefix + nq, dtype=torch.bool).tril(prefix)[None, None]
    want = _reference(q, k, v, mask, 0.125)
    got, _ = attention.split_prefix_attention(
        _Module(), q, k, v, mask, scaling=0.125, visible_prefix=prefix, causal_rest=True
    )
    assert float((got - want).abs().max()) < 1e-5


def test_no_visible_prefix_is_plain_sdpa() -> None:
    q, k, v = _qkv(1, 16, 16, seed=2)
    got, _ = attention.split_prefix_attention(_Module(), q, k, v, None, scaling=0.125)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True, scale=0.125
    ).transpose(1, 2)
    assert float((got - want).abs().max()) < 1e-6


@pytest.fixture
def spy() -> Iterator[list[int]]:
    """The visible prefixes the engine's attention calls were given."""
    from transformers import AttentionInterface

    seen: list[int] = []

    def counting(*args: Any, visible_prefix: int = 0, **kwargs: Any) -> Any:
        seen.append(visible_prefix)
        return attention.split_prefix_attention(*args, visible_prefix=visible_prefix, **kwargs)

    AttentionInterface.register(attention.NAME, counting)
    yield seen
    AttentionInterface.register(attention.NAME, attention.split_prefix_attention)


def test_engine_runs_split_attention_and_matches_sdpa(
    engine: Engine, tokenizer: Any, spy: list[int]
) -> None:
    if engine.device != "cpu" or not attention.available("cpu"):
        pytest.skip("split-prefix attention runs on CPU only")
    assert engine.model.config._attn_implementation == attention.NAME
    rng = np.random.default_rng(3)
    base = rng.integers(100, 20000, 700)
    spans = [(600, 640), (660, 700)]
    items = [(base, spans)] + [
        (np.delete(base, np.arange(a, a + 20)), [(s - 20, e - 20) for s, e in spans])
        for a in (300, 450)
    ]
    fresh = Engine(engine.model, engine.tokenizer, chunk_tokens=256, prefix_cache_tokens=0)
    got = fresh.score_many(items)
    assert max(spy) >= 256  # chunks after the first saw a whole visible prefix
    engine.model.set_attn_implementation("sdpa")
    try:
        plain = Engine(
            engine.model,
            engine.tokenizer,
            chunk_tokens=256,
            prefix_cache_tokens=0,
            split_attention=False,
        )
        want = plain.score_many(items)
    finally:
        engine.model.set_attn_implementation(attention.NAME)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, np.ndarray) and isinstance(w, np.ndarray)
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=0)
