"""Chat-template rendering: ChatML, Gemma, a Llama-3-style and a Mistral-style template.

Node spans must be exactly what the template adds, ablation must equal re-rendering the
conversation without the memory, and a non-concatenative template must be detected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from _helpers import TEMPLATE_MESSAGES

from scoring_kit._exceptions import ConfigError, ContextError
from scoring_kit.context.chat_templates import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    ChatTemplate,
    load_template,
)
from scoring_kit.context.io import context_from_messages, load_context, load_messages
from scoring_kit.context.model import ContextState, skip_key

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "sample_conversation.jsonl"

LLAMA3 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"
    "<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
#: numbers the turns: removing a memory renumbers every later turn (not concatenative)
NUMBERED = (
    "{% for message in messages %}"
    "{{ '#' ~ loop.index ~ ' ' ~ message['role'] ~ ': ' ~ message['content'] ~ '\n' }}"
    "{% endfor %}"
)

SMALL = TEMPLATE_MESSAGES
ALTERNATING = [m for m in SMALL if m["role"] != "system"]


def tpl(name: str, source: str) -> ChatTemplate:
    return ChatTemplate(name, source, origin=f"test {name}")


def reference_text(tokenizer: Any, source: str, messages: list[dict[str, str]]) -> str:
    """The template rendered by transformers' ``apply_chat_template`` (independent path)."""
    return str(tokenizer.hf.apply_chat_template(messages, chat_template=source, tokenize=False))


def without(messages: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("key") != key]


def assert_ablation_equals_rerender(
    ctx: ContextState, messages: list[dict[str, Any]], tokenizer: Any, **kw: Any
) -> None:
    for k in ctx.memory_keys():
        ablated = ctx.wire_prompt(skip=skip_key(k))
        again = context_from_messages(without(messages, k), tokenizer, **kw).wire_prompt()
        assert ablated.tokens.tolist() == again.tokens.tolist(), k
        assert ablated.ranges == again.ranges, k
        assert len(ablated.entries) == len(again.entries)


# ── ChatML ──────────────────────────────────────────────────────────
def test_default_chatml_path_is_todays_rendering(tokenizer: Any) -> None:
    """No template named → the kit's own ChatML (token ids unchanged); ``chatml`` is the same."""
    msgs = load_messages(SAMPLE)
    a = context_from_messages(msgs, tokenizer)
    b = context_from_messages(msgs, tokenizer, chat_template="chatml")
    assert a.template is None and b.template is None
    assert a.wire_prompt().tokens.tolist() == b.wire_prompt().tokens.tolist()


def test_jinja_chatml_equals_the_kits_chatml(tokenizer: Any) -> None:
    msgs = load_messages(SAMPLE)
    legacy = context_from_messages(msgs, tokenizer).wire_prompt()
    ctx = context_from_messages(msgs, tokenizer, chat_template=tpl("chatml2", CHATML_TEMPLATE))
    assert ctx.template is not None and ctx.template.info()["ablation"] == "cut"
    wp = ctx.wire_prompt()
    assert tokenizer.decode(wp.tokens.tolist()) == tokenizer.decode(legacy.tokens.tolist())
    assert wp.ranges == legacy.ranges
    assert wp.tokens.tolist() == legacy.tokens.tolist()


# ── node spans exact ───────────────────────────────────────────────
@pytest.mark.parametrize(
    ("source", "messages", "placement", "turn"),
    [
        (CHATML_TEMPLATE, SMALL, "message:system", "<|im_start|>assistant\n{}<|im_end|>\n"),
        (GEMMA_TEMPLATE, SMALL, "inline", "<start_of_turn>model\n{}<end_of_turn>\n"),
        (LLAMA3, SMALL, "message:system",
         "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>"),
        (MISTRAL, ALTERNATING, "inline", "{}<|im_end|>"),
    ],
    ids=["chatml", "gemma", "llama3", "mistral"],
)
def test_node_spans_are_what_the_template_adds(
    tokenizer: Any, source: str, messages: list[dict[str, Any]], placement: str, turn: str
) -> None:
    ctx = context_from_messages(messages, tokenizer, chat_template=tpl("t", source),
                                memory_placement=placement)
    wp = ctx.wire_prompt()
    # the whole prompt is the template's rendering (transformers' apply_chat_template)
    chat = [dict(m) for m in messages]
    for m in chat:
        if m["role"] == "memory":
            m["role"] = placement.split(":")[-1]
            m["content"] = f"[memory: {m.pop('key')}]\n{m['content']}"
    if placement != "inline":
        assert tokenizer.decode(wp.tokens.tolist()) == reference_text(tokenizer, source, chat)
    # each assistant range is exactly its rendered turn
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(wp.ranges) == len(answers)
    for (a, b), text in zip(wp.ranges, answers, strict=True):
        assert tokenizer.decode(wp.tokens[a:b].tolist()) == turn.format(text)
    # each node's tokens are what rendering up to it adds
    pos = 0
    for sp in wp.spans:
        assert sp.start == pos
        pos = sp.end
    assert pos == len(wp)


def test_gemma_turns_bos_model_role_and_folded_system(tokenizer: Any) -> None:
    ctx = context_from_messages(SMALL, tokenizer, chat_template="gemma")
    text = tokenizer.decode(ctx.wire_prompt().tokens.tolist())
    bos = tokenizer.hf.bos_token
    assert text.startswith(f"{bos}<start_of_turn>user\nAnswer briefly.\n\n[memory: m1] Mel paints")
    assert "<start_of_turn>model\nYou paint lakes.<end_of_turn>\n" in text
    assert "system" not in text
    # inline memory blocks are the memories' own nodes
    m2 = ctx.conversation[[n.key for n in ctx.conversation].index("m2")]
    assert tokenizer.decode(list(m2.token_ids)) == "[memory: m2] Mel plays the violin.\n\n"
    info = ctx.template.info() if ctx.template else {}
    assert info["memory_placement"] == "inline" and info["ablation"] == "cut"
    assert_ablation_equals_rerender(ctx, SMALL, tokenizer, chat_template="gemma")


# ── ablation equals re-rendering ───────────────────────────────────
@pytest.mark.parametrize(
    ("source", "messages", "placement"),
    [(LLAMA3, SMALL, "message:system"), (LLAMA3, SMALL, "message:user"),
     (MISTRAL, ALTERNATING, "inline"), (CHATML_TEMPLATE, SMALL, "message:tool")],
)
def test_cutting_a_memory_equals_rerendering_without_it(
    tokenizer: Any, source: str, messages: list[dict[str, Any]], placement: str
) -> None:
    t = tpl("t", source)
    ctx = context_from_messages(messages, tokenizer, chat_template=t, memory_placement=placement)
    assert ctx.template is not None and ctx.template.ablation == "cut"
    assert_ablation_equals_rerender(ctx, messages, tokenizer, chat_template=t,
                                    memory_placement=placement)


def test_non_concatenative_template_is_detected_and_rerendered(tokenizer: Any) -> None:
    t = tpl("numbered", NUMBERED)
    ctx = context_from_messages(SMALL, tokenizer, chat_template=t)
    assert ctx.template is not None and ctx.template.ablation == "rerender"
    base = ctx.wire_prompt()
    for k in ctx.memory_keys():
        ablated = ctx.wire_prompt(skip=skip_key(k))
        cut = [t for sp in base.spans
               if ctx.section(sp.section)[sp.index].key != k
               for t in base.tokens[sp.start:sp.end].tolist()]
        assert ablated.tokens.tolist() != cut  # cutting would be wrong here
    assert_ablation_equals_rerender(ctx, SMALL, tokenizer, chat_template=t)
    # entries still name the original conversation indices
    abl = ctx.wire_prompt(skip=skip_key("m1"))
    assert abl.entries == base.entries


def test_sample_on_gemma_rerenders_and_says_so(tokenizer: Any) -> None:
    """The sample's system, journal and identity memory all fold into the first user turn."""
    msgs = load_messages(SAMPLE)
    ctx = context_from_messages(msgs, tokenizer, chat_template="gemma")
    assert ctx.template is not None
    info = ctx.template.info()
    assert info["ablation"] == "rerender" and info["system_merged"] is True
    assert_ablation_equals_rerender(ctx, msgs, tokenizer, chat_template="gemma")
    first = ctx.response_indices()[0]
    part = ctx.wire_prompt(range(0, first + 1), skip=skip_key("D1:14"))
    assert part.entries == (first,)
    assert "lake sunrise" not in tokenizer.decode(part.tokens[: part.ranges[0][0]].tolist())


def test_score_span_content_is_the_answer_and_end_of_turn(tokenizer: Any) -> None:
    for kw, end in (({}, "<|im_end|>"), ({"chat_template": "gemma"}, "<end_of_turn>")):
        ctx = context_from_messages(SMALL, tokenizer, score_span="content", **kw)
        wp = ctx.wire_prompt()
        got = [tokenizer.decode(wp.tokens[a:b].tolist()) for a, b in wp.ranges]
        # the end-of-turn token (on SmolLM2's vocabulary Gemma's marker is several tokens)
        eot = tokenizer.decode(tokenizer.encode(end)[:1])
        assert got == [f"You paint lakes.{eot}", f"The violin.{eot}"]
        abl = ctx.wire_prompt(skip=skip_key("m2"))
        assert [tokenizer.decode(abl.tokens[a:b].tolist()) for a, b in abl.ranges] == got


# ── errors ──────────────────────────────────────────────────────────
def test_unknown_template_name(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match=r"'nope'.*no such template name or file.*gemma"):
        load_template("nope", tokenizer)


def test_bad_template_file_names_file_and_line(tokenizer: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"bad\.jinja.*line 2"):
        load_template(bad, tokenizer)
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        load_template(empty, tokenizer)


def test_template_that_raises_is_quoted_with_the_option(tokenizer: Any, tmp_path: Path) -> None:
    f = tmp_path / "mistral.jinja"
    f.write_text(MISTRAL)
    with pytest.raises(ContextError, match=r"Conversation roles must alternate.*"
                                           r"--memory-placement"):
        context_from_messages(SMALL, tokenizer, chat_template=str(f))
    with pytest.raises(ContextError, match=r"Gemma has no system role.*--memory-placement "
                                           r"\(now message:system"):
        context_from_messages(SMALL, tokenizer, chat_template="gemma",
                              memory_placement="message:system")
    with pytest.raises(ConfigError, match="--memory-placement 'sideways'"):
        context_from_messages(SMALL, tokenizer, chat_template="gemma", memory_placement="sideways")


def test_tokenizer_without_chatml_or_template_needs_a_template(tokenizer: Any) -> None:
    class Bare:
        name = "bare"
        vocab_size = tokenizer.vocab_size
        im_start_id = None
        im_end_id = None
        hf = None

        def encode(self, text: str) -> list[int]:
            return list(tokenizer.encode(text))

        def decode(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
            return str(tokenizer.decode(ids))

    with pytest.raises(ConfigError, match=r"'bare' has no ChatML tokens.*--chat-template"):
        context_from_messages(SMALL, Bare())
    ctx = context_from_messages(SMALL, Bare(), chat_template="gemma")
    assert len(ctx.wire_prompt().ranges) == 2


def test_load_context_takes_the_template_options(tokenizer: Any, tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_bytes(b"".join(orjson.dumps(m) + b"\n" for m in SMALL))
    ctx = load_context(p, tokenizer, chat_template="gemma", score_span="content")
    assert ctx.score_span == "content" and ctx.template is not None


# ── CLI ─────────────────────────────────────────────────────────────
def _render(capsys: Any, *argv: str) -> tuple[int, Any, str]:
    from scoring_kit.cli import main

    rc = main(["render", str(SAMPLE), *argv])
    cap = capsys.readouterr()
    return rc, (orjson.loads(cap.out) if rc == 0 else None), cap.err


def test_cli_render_shows_template_and_scored_text(capsys: Any, tokenizer: Any,
                                                   tmp_path: Path) -> None:
    rc, body, _ = _render(capsys, "--chat-template", "gemma", "--score-span", "content")
    assert rc == 0
    assert body["chat_template"]["name"] == "gemma"
    assert body["chat_template"]["ablation"] == "rerender"
    assert body["score_span"] == "content"
    assert body["scored"][2].startswith("You play the violin.")
    rc, default, _ = _render(capsys)
    assert default["chat_template"]["ablation"] == "cut"
    assert default["scored"][0] == (
        "<|im_start|>assistant\nYou painted a lake sunrise last year.<|im_end|>\n")
    # --tokenizer: the same tokenizer as a tokenizer.json gives the same ids
    tokenizer.hf.save_pretrained(tmp_path / "tok")
    rc, same, _ = _render(capsys, "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"))
    assert rc == 0 and same["prompt"] == default["prompt"]


def test_cli_bad_template_exits_2_with_one_line(capsys: Any, tmp_path: Path) -> None:
    rc, _, err = _render(capsys, "--chat-template", "nope")
    assert rc == 2 and "no such template name or file" in err and err.count("\n") == 1
    rc, _, err = _render(capsys, "--chat-template", "gemma", "--memory-placement",
                         "message:system")
    assert rc == 2 and "Gemma has no system role" in err and "--memory-placement" in err
    rc, _, err = _render(capsys, "--tokenizer", str(tmp_path / "missing"))
    assert rc == 2 and "--tokenizer" in err
