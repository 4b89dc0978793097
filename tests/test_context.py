"""Context model, wire prompt and both conversation formats (real SmolLM2 tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from scoring_kit import ContextError, PromptError
from scoring_kit.context.io import (
    context_from_messages,
    detect_format,
    dump_context,
    load_context,
    parse_timestamp,
    save_context,
)
from scoring_kit.context.model import (
    ContextState,
    Node,
    is_memory_node,
    memory_key,
    render_prior_context,
    skip_key,
)

DATA = Path(__file__).resolve().parents[1] / "data"
PLAIN = DATA / "sample_conversation.jsonl"
TOKENIZED = DATA / "sample_conversation.tokens.jsonl"


@pytest.fixture(scope="module")
def ctx(tokenizer: Any) -> ContextState:
    return load_context(PLAIN, tokenizer)


def write_lines(tmp_path: Path, lines: list[Any], name: str = "c.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(
        b"\n".join(x if isinstance(x, bytes) else orjson.dumps(x) for x in lines) + b"\n"
    )
    return p


# ── wire_prompt ────────────────────────────────────────────────────
def test_ranges_land_exactly_on_assistant_messages(ctx: ContextState, tokenizer: Any) -> None:
    wp = ctx.wire_prompt()
    assert len(wp.ranges) == len(ctx.response_indices()) == 13
    assert list(wp.entries) == ctx.response_indices()
    for (a, b), e in zip(wp.ranges, wp.entries, strict=True):
        span = wp.tokens[a:b].tolist()
        assert span == list(ctx.conversation[e].token_ids)
        text = tokenizer.decode(span)
        assert text.startswith("<|im_start|>assistant\n")
        assert text.endswith("<|im_end|>\n")
        assert ctx.conversation[e].text in text
    # the prompt is exactly the concatenation of every node, in section order
    concat = [t for _, _, n in ctx.iter_nodes() for t in n.token_ids]
    assert wp.tokens.tolist() == concat


def test_skip_removes_exactly_the_skipped_tokens_and_shifts_later_ranges(
    ctx: ContextState,
) -> None:
    base = ctx.wire_prompt()
    loc = ctx.find_memory("D2:5")
    assert loc == ("conversation", 6)
    node = ctx.conversation[6]
    cut = next(s for s in base.spans if s.section == "conversation" and s.index == 6)
    wp = ctx.wire_prompt(skip=skip_key("D2:5"))
    assert len(base) - len(wp) == node.tokens
    expect = np.concatenate([base.tokens[: cut.start], base.tokens[cut.end :]])
    assert np.array_equal(wp.tokens, expect)
    for (a0, b0), (a1, b1) in zip(base.ranges, wp.ranges, strict=True):
        shift = node.tokens if a0 >= cut.end else 0
        assert (a1, b1) == (a0 - shift, b0 - shift)
    assert wp.entries == base.entries


def test_skip_applies_to_identity_memories(ctx: ContextState) -> None:
    base = ctx.wire_prompt()
    wp = ctx.wire_prompt(skip=skip_key("identity:melanie"))
    assert len(base) - len(wp) == ctx.identity[0].tokens
    assert all(r1[0] == r0[0] - ctx.identity[0].tokens
               for r0, r1 in zip(base.ranges, wp.ranges, strict=True))


def test_skip_all_memories_and_entry_range(ctx: ContextState) -> None:
    wp = ctx.wire_prompt(range(10, 20), is_memory_node)
    kept = [i for i in range(10, 20) if not is_memory_node(ctx.conversation[i])]
    conv_spans = [s.index for s in wp.spans if s.section == "conversation"]
    assert conv_spans == kept
    assert all(not is_memory_node(ctx.identity[s.index])
               for s in wp.spans if s.section == "identity")
    assert list(wp.entries) == [i for i in kept if ctx.conversation[i].is_branch]


def test_wire_prompt_out_of_bounds_range_is_named(ctx: ContextState) -> None:
    with pytest.raises(PromptError, match=r"0\.\.99 is out of bounds .* 34 entries"):
        ctx.wire_prompt(range(0, 99))


def test_memory_keys_dedup_first_seen_and_body(ctx: ContextState) -> None:
    assert ctx.memory_keys() == [
        "identity:melanie", "D1:14", "D2:1", "D2:5", "D3:16", "D4:3", "D4:8", "D2:8",
    ]
    body = ctx.wire_prompt().body("m")
    assert set(body) == {"model", "prompt", "score_ranges", "logprobs", "priority"}
    assert body["logprobs"] == 1 and body["priority"] == 5


def test_prior_context_shows_last_two_exchanges(ctx: ContextState) -> None:
    last = ctx.response_indices()[-1]
    text = render_prior_context(ctx.conversation, last, 2)
    blocks = text.split("\n\n")
    assert len(blocks) == 4
    assert blocks[0].startswith("assistant: You are Melanie")
    assert blocks[-1] == "user: Good night!"


# ── formats ────────────────────────────────────────────────────────
def test_plain_and_tokenized_files_agree(ctx: ContextState, tokenizer: Any) -> None:
    tok_ctx = load_context(TOKENIZED, tokenizer)
    assert tok_ctx == ctx
    assert np.array_equal(tok_ctx.wire_prompt().tokens, ctx.wire_prompt().tokens)


def test_tokenized_round_trip(ctx: ContextState, tmp_path: Path) -> None:
    scored = ctx.with_memory_scores({5: {"D1:14": 1.5}})
    p = save_context(scored, tmp_path / "ctx.jsonl")
    back = load_context(p)
    assert back == scored
    assert dict(back.conversation[5].memory_scores) == {"D1:14": 1.5}
    assert dump_context(back) == dump_context(scored)


def test_format_detection() -> None:
    assert detect_format({"role": "user", "content": "x"}) == "plain"
    assert detect_format({"format": "scoring_kit.context", "version": 1}) == "tokenized"
    assert detect_format({"section": "system", "kind": "system", "token_ids": []}) == "tokenized"
    with pytest.raises(ContextError, match="cannot tell the format"):
        detect_format({"speaker": "x"})


def test_timestamps() -> None:
    assert parse_timestamp("1970-01-01T00:00:01Z") == 1_000_000_000
    assert parse_timestamp(5) == 5
    assert parse_timestamp("123") == 123
    assert parse_timestamp(None) is None
    with pytest.raises(ContextError, match="neither ISO 8601"):
        parse_timestamp("yesterday", path="f", line=3)


# ── bad input: each names file, line and field ─────────────────────
BAD_PLAIN: list[tuple[str, Any, str]] = [
    ("unknown role", {"role": "narrator", "content": "x"}, r"c\.jsonl:2, field 'role'.*unknown role"),
    ("missing content", {"role": "user"}, r":2, field 'content'.*missing"),
    ("content not str", {"role": "user", "content": 3}, r":2, field 'content'.*int"),
    ("memory without key", {"role": "memory", "content": "x"}, r":2, field 'key'.*needs a key"),
    ("key on user", {"role": "user", "content": "x", "key": "k"}, r":2, field 'key'"),
    ("empty key", {"role": "memory", "content": "x", "key": " "}, r":2, field 'key'"),
    ("bad timestamp", {"role": "user", "content": "x", "timestamp": "soon"}, r":2, field 'timestamp'"),
    ("unknown field", {"role": "user", "content": "x", "colour": 1}, r":2, field 'colour'"),
]


@pytest.mark.parametrize(("what", "line", "pattern"), BAD_PLAIN, ids=[b[0] for b in BAD_PLAIN])
def test_bad_plain_messages(
    tmp_path: Path, tokenizer: Any, what: str, line: Any, pattern: str
) -> None:
    p = write_lines(tmp_path, [{"role": "system", "content": "hi"}, line])
    with pytest.raises(ContextError, match=pattern):
        load_context(p, tokenizer)


def test_bad_json_names_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    p = write_lines(tmp_path, [{"role": "user", "content": "a"}, b'{"role": "user", "content": '])
    with pytest.raises(ContextError, match=r"c\.jsonl:2: bad JSON"):
        load_context(p, tokenizer)


def test_empty_and_missing_files(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ContextError, match="holds no messages"):
        load_context(tmp_path / "e.jsonl", tokenizer)
    with pytest.raises(ContextError, match="no such file"):
        load_context(tmp_path / "nope.jsonl", tokenizer)



def test_plain_file_needs_a_tokenizer_tokenized_file_does_not(tmp_path: Path) -> None:
    """The context layer loads no model: a plain file without a tokenizer is refused,
    naming the file; a tokenized file loads without one."""
    with pytest.raises(ContextError, match=r"sample_conversation\.jsonl: plain messages need a "
                                           r"tokenizer"):
        load_context(PLAIN)
    assert load_context(TOKENIZED).memory_keys()


BAD_NODES: list[tuple[str, Any, str]] = [
    ("unknown kind", {"section": "conversation", "kind": "thought", "token_ids": [1]}, r":2, field 'kind'"),
    ("unknown section", {"section": "attic", "kind": "user", "token_ids": [1]}, r":2, field 'section'"),
    ("id out of vocab", {"section": "conversation", "kind": "user", "token_ids": [1, 49152]},
     r":2, field 'token_ids'.*49152 is outside the vocabulary \[0, 49152\)"),
    ("negative id", {"section": "conversation", "kind": "user", "token_ids": [-1]}, r"field 'token_ids'"),
    ("non-int id", {"section": "conversation", "kind": "user", "token_ids": ["a"]}, r"not an integer"),
    ("missing ids", {"section": "conversation", "kind": "user"}, r"field 'token_ids'.*missing"),
    ("memory no key", {"section": "conversation", "kind": "memory", "token_ids": [1]}, r"field 'key'"),
    ("assistant in system", {"section": "system", "kind": "assistant", "token_ids": [1]},
     r"field 'section'.*conversation section"),
    ("children on leaf", {"section": "conversation", "kind": "user", "token_ids": [1],
                          "children": [{"kind": "text", "token_ids": [1]}]}, r"field 'children'"),
]


@pytest.mark.parametrize(("what", "line", "pattern"), BAD_NODES, ids=[b[0] for b in BAD_NODES])
def test_bad_tokenized_nodes(
    tmp_path: Path, tokenizer: Any, what: str, line: Any, pattern: str
) -> None:
    p = write_lines(tmp_path, [{"format": "scoring_kit.context", "version": 1}, line])
    with pytest.raises(ContextError, match=pattern):
        load_context(p, tokenizer)


def test_bad_header_version(tmp_path: Path) -> None:
    p = write_lines(tmp_path, [{"format": "scoring_kit.context", "version": 9}])
    with pytest.raises(ContextError, match=r":1, field 'version'.*unsupported version 9"):
        load_context(p)


def test_assistant_at_position_zero_cannot_be_scored(tokenizer: Any) -> None:
    ctx = context_from_messages([{"role": "assistant", "content": "hi"}], tokenizer)
    with pytest.raises(PromptError, match="position 0 has no prediction"):
        ctx.wire_prompt()


def test_node_invariants() -> None:
    with pytest.raises(ContextError, match="unknown node kind"):
        Node("thought", (1,))  # type: ignore[arg-type]
    with pytest.raises(ContextError, match="needs a non-empty key"):
        Node("memory", (1,))
    assert memory_key(Node("memory", (1,), key="k")) == "k"
