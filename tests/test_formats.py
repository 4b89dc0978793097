"""Agent formats in (issue 18 part A): OpenAI-style transcripts and Letta agent files.

Reading is checked model-free (one token per character); the CLI runs at the end score with
the embedded server.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from _fakes import CharTokenizer
from _helpers import run_cli, write_jsonl

from scoring_kit import ContextError
from scoring_kit.context.formats import (
    AgentReading,
    agent_format,
    describe_reading,
    load_agent,
    read_agent_file,
    tool_call_text,
)
from scoring_kit.context.io import load_context, sniff_format
from scoring_kit.scoring.matrix import MemoryMatrix

TOK = CharTokenizer()
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "letta"
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def call(cid: str, name: str, args: Any) -> dict[str, Any]:
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str)
                         else orjson.dumps(args).decode()}}


#: A transcript whose memories are the results of archival_memory_search.
OPENAI: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is my dog called?"},
    {"role": "assistant", "content": None,
     "tool_calls": [call("call_1", "archival_memory_search", {"query": "dog"})]},
    {"role": "tool", "tool_call_id": "call_1",
     "content": '{"id": "mem-7", "text": "The user\'s dog is called Pepper."}'},
    {"role": "assistant", "content": [{"type": "text", "text": "Your dog"},
                                      {"type": "text", "text": "is Pepper."}]},
    {"role": "user", "content": "And my city?"},
    {"role": "assistant", "content": "Let me look.",
     "tool_calls": [call("call_2", "archival_memory_search", {"query": "city"})]},
    {"role": "tool", "tool_call_id": "call_2", "content": "The user lives in Lisbon."},
    {"role": "assistant", "content": "You live in Lisbon."},
]
MEM = AgentReading(memory_tools=("archival_memory_search",))


def write_json(path: Path, doc: Any) -> Path:
    path.write_bytes(orjson.dumps(doc))
    return path


# ── OpenAI-style ─────────────────────────────────────────────────────
def test_openai_tool_results_become_memories(tmp_path: Path) -> None:
    p = write_json(tmp_path / "t.json", OPENAI)
    assert agent_format(p) == "openai" and sniff_format(p) == "plain"
    ctx = load_context(p, TOK, reading=MEM)
    # keyed by the result's id field, else by the call id
    assert ctx.memory_keys() == ["mem-7", "call_2"]
    conv = ctx.conversation
    assert [n.kind for n in conv] == ["user", "tool_call", "memory", "assistant", "user",
                                      "assistant", "memory", "assistant"]
    # the turn that only calls a tool stays in the prompt but is not scored
    assert conv[1].text == '[tool_call archival_memory_search] {"query":"dog"}'
    assert conv[1].text == tool_call_text("archival_memory_search", {"query": "dog"})
    assert ctx.response_indices() == [3, 5, 7]
    assert conv[1].token_ids[:2] == (TOK.im_start_id, *TOK.encode("a"))
    assert len(ctx.wire_prompt().ranges) == 3
    # text parts joined with a newline; text + calls: the call line after the text
    assert conv[3].text == "Your dog\nis Pepper."
    assert conv[5].text == ('Let me look.\n[tool_call archival_memory_search] '
                            '{"query":"city"}')
    assert conv[2].text.startswith('{"id": "mem-7"')
    # the same through {"messages": [...]} and JSONL
    for other in (write_json(tmp_path / "m.json", {"messages": OPENAI}),
                  write_jsonl(tmp_path / "t.jsonl", OPENAI)):
        assert agent_format(other) == "openai"
        again = load_context(other, TOK, reading=MEM)
        assert [n.token_ids for _, _, n in again.iter_nodes()] == [
            n.token_ids for _, _, n in ctx.iter_nodes()]


def test_openai_score_tool_calls_and_reading(tmp_path: Path) -> None:
    p = write_json(tmp_path / "t.json", OPENAI)
    ctx = load_context(p, TOK, reading=AgentReading(memory_tools=("archival_memory_search",),
                                                    score_tool_calls=True))
    assert ctx.response_indices() == [1, 3, 5, 7]
    rows = describe_reading(p, load_context(p, TOK, reading=MEM), MEM)
    assert [r["read_as"] for r in rows] == ["other", "other", "other", "memory", "response",
                                            "other", "response", "memory", "response"]
    assert [r["message"] for r in rows] == list(range(9))
    assert rows[3]["key"] == "mem-7" and "'id' field" in rows[3]["note"]
    assert rows[7]["key"] == "call_2" and "call id" in rows[7]["note"]
    assert "not scored" in rows[2]["note"]


def test_memory_role_and_prefix(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "context", "name": "pet", "content": "The dog is Rex."},
        {"role": "context", "content": "It is raining."},
        {"role": "user", "content": "[memory: city]\nThe user lives in Oslo."},
        {"role": "user", "content": "Dog?"},
        {"role": "assistant", "content": "Rex."},
    ]
    p = write_json(tmp_path / "r.json", msgs)
    with pytest.raises(ContextError, match=r"message 1: unknown role 'context'"):
        load_context(p, TOK)
    ctx = load_context(p, TOK, reading=AgentReading(memory_role="context"))
    assert ctx.memory_keys() == ["pet", "context:2", "city"]
    assert ctx.memory_text("city") == "The user lives in Oslo."  # prefix removed
    assert ctx.response_indices() == [4]


def test_images_attached_or_refused(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": PNG}}]},
            {"role": "assistant", "content": "A picture."}]
    ctx = load_context(write_json(tmp_path / "i.json", msgs), TOK)
    assert ctx.conversation[0].images[0].mime == "image/png"
    assert ctx.conversation[0].images[0].data == b"\x89PNG fake"
    assert len(ctx.wire_prompt().images) == 1
    msgs[0]["content"][1]["image_url"]["url"] = "https://example.com/cat.png"
    with pytest.raises(ContextError) as exc:
        load_context(write_json(tmp_path / "u.json", msgs), TOK)
    assert "u.json" in str(exc.value) and "message 0" in str(exc.value)
    assert "messages[0].content[1].image_url" in str(exc.value)
    assert "not a data: URI" in str(exc.value)


def test_plain_messages_still_read_as_before(tmp_path: Path) -> None:
    plain = [{"role": "memory", "key": "k", "content": "A fact."},
             {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p = write_jsonl(tmp_path / "p.jsonl", plain)
    assert agent_format(p) is None and sniff_format(p) == "plain"
    ctx = load_context(p, TOK)
    assert ctx.memory_keys() == ["k"] and ctx.response_indices() == [2]
    # the same messages as OpenAI-style give the same tokens
    same = load_context(write_json(tmp_path / "p.json", plain), TOK)
    assert [n.token_ids for _, _, n in same.iter_nodes()] == [
        n.token_ids for _, _, n in ctx.iter_nodes()]
    # a JSONL whose later lines use tool calls is OpenAI-style, even if line 1 is plain
    assert agent_format(write_jsonl(tmp_path / "o.jsonl", OPENAI)) == "openai"
    # reading options on the kit's tokenized format are refused, not ignored
    from scoring_kit.context.io import save_context

    tok_file = save_context(ctx, tmp_path / "ctx.jsonl")
    with pytest.raises(ContextError, match="apply to OpenAI-style"):
        load_context(tok_file, TOK, reading=MEM)


# ── bad input: one clear error naming file, message index and field ──
def _bad(tmp_path: Path, name: str, msgs: Any, reading: AgentReading = MEM,
         jsonl: bool = False) -> str:
    p = (write_jsonl(tmp_path / f"{name}.jsonl", msgs) if jsonl
         else write_json(tmp_path / f"{name}.json", msgs))
    with pytest.raises(ContextError) as exc:
        load_context(p, TOK, reading=reading)
    text = str(exc.value)
    assert text.startswith(str(p)), text
    return text


def test_openai_bad_input(tmp_path: Path) -> None:
    orphan = copy.deepcopy(OPENAI)
    orphan[3]["tool_call_id"] = "call_9"
    t = _bad(tmp_path, "orphan", orphan)
    assert "field 'messages[3].tool_call_id'" in t and "message 3" in t
    assert "'call_9' matches no earlier tool call" in t
    robot = copy.deepcopy(OPENAI)
    robot[5]["role"] = "robot"
    t = _bad(tmp_path, "robot", robot)
    assert "field 'messages[5].role'" in t and "unknown role 'robot'" in t
    t = _bad(tmp_path, "never", OPENAI, AgentReading(memory_tools=("search_memory",)))
    assert "field 'memory_tools'" in t and "['search_memory'] are never called" in t
    assert "archival_memory_search" in t
    broken = copy.deepcopy(OPENAI)
    broken[6]["tool_calls"][0]["function"]["arguments"] = '{"query": "city"'
    t = _bad(tmp_path, "args", broken)
    assert "field 'messages[6].tool_calls[0].function.arguments'" in t
    assert "not valid JSON" in t and "message 6" in t
    for name, doc in (("empty", []), ("emptyobj", {"messages": []})):
        t = _bad(tmp_path, name, doc)
        assert "the conversation holds no messages" in t and "field 'messages'" in t
    # JSONL errors name the line too
    t = _bad(tmp_path, "orphan", orphan, jsonl=True)
    assert t.startswith(f"{tmp_path / 'orphan.jsonl'}:4, field 'messages[3].tool_call_id'")


# ── Letta ────────────────────────────────────────────────────────────
def letta_message(mid: str, role: str, text: str | None = None, *,
                  calls: list[dict[str, Any]] | None = None, call_id: str | None = None,
                  reasoning: str | None = None) -> dict[str, Any]:
    """A message in the shape of the current AgentFileSchema (fields as Letta exports them)."""
    content: list[dict[str, Any]] = []
    if reasoning:
        content.append({"type": "reasoning", "reasoning": reasoning, "is_native": True})
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"type": "message", "role": role, "content": content, "name": None, "otid": None,
            "id": mid, "agent_id": "agent-0", "model": "gpt-4o-mini",
            "tool_calls": calls, "tool_call_id": call_id,
            "tool_returns": ([{"tool_call_id": call_id, "status": "success",
                               "func_response": text}] if role == "tool" else []),
            "created_at": "2025-10-31T22:56:56.879513+00:00"}


def letta_agent(name: str = "helper", aid: str = "agent-0") -> dict[str, Any]:
    ok = '{"status": "OK", "message": "None", "time": "2025-10-31 10:56:56 PM UTC+0000"}'
    msgs = [
        letta_message("message-0", "system", "COMPILED SYSTEM PROMPT WITH <memory_blocks>"),
        letta_message("message-1", "user", '{"type": "user_message", "message": "My dog?"}'),
        letta_message("message-2", "assistant", reasoning="I should search.",
                      calls=[call("c1", "archival_memory_search", {"query": "dog"})]),
        letta_message("message-3", "tool", '{"status": "OK", "message": "Dog: Pepper"}',
                      call_id="c1"),
        letta_message("message-4", "assistant", reasoning="Found it.",
                      calls=[call("c2", "send_message", {"message": "Your dog is Pepper."})]),
        letta_message("message-5", "tool", ok, call_id="c2"),
        letta_message("message-6", "assistant", reasoning="Note the name.",
                      calls=[call("c3", "core_memory_append",
                                  {"label": "human", "content": "Dog: Pepper"})]),
        letta_message("message-7", "tool", ok, call_id="c3"),
        letta_message("message-8", "user", "an evicted message"),
    ]
    return {"name": name, "id": aid, "system": "You are Helper, a MemGPT agent.",
            "agent_type": "letta_v1_agent", "block_ids": ["block-0", "block-1"],
            "tool_ids": ["tool-0"], "memory_blocks": [], "messages": msgs,
            "in_context_message_ids": [f"message-{k}" for k in range(8)]}


def letta_file(*agents: dict[str, Any]) -> dict[str, Any]:
    blocks = [{"label": "human", "value": "Name: Sam. Lives in Oslo.", "limit": 5000,
               "id": "block-0", "description": "about the user", "metadata": {}},
              {"label": "persona", "value": "I am Helper, cheerful and brief.",
               "limit": 5000, "id": "block-1", "description": None, "metadata": {}}]
    return {"agents": list(agents or [letta_agent()]), "groups": [], "blocks": blocks,
            "files": [], "sources": [], "tools": [], "mcp_servers": [],
            "metadata": {"revision_id": "f6cd5a1e519d"}, "created_at": "2025-10-31T22:56:56Z"}


def test_letta_agent_file(tmp_path: Path) -> None:
    p = write_json(tmp_path / "agent.af", letta_file())
    assert agent_format(p) == "letta"
    ctx = load_context(p, TOK)
    assert [n.text for n in ctx.system] == ["You are Helper, a MemGPT agent."]  # not compiled
    assert [(n.key, n.text) for n in ctx.identity] == [
        ("human", "Name: Sam. Lives in Oslo."), ("persona", "I am Helper, cheerful and brief.")]
    assert ctx.memory_keys() == ["human", "persona", "c1"]
    conv = ctx.conversation
    assert [n.kind for n in conv] == ["user", "tool_call", "memory", "assistant", "tool",
                                      "tool_call", "tool"]  # message-8 is not in context
    assert conv[3].text == "Your dog is Pepper."  # send_message's message; no reasoning
    assert "I should search" not in "".join(n.text for n in conv)
    assert ctx.response_indices() == [3]
    assert conv[3].timestamp_ns == 1761951416879513000
    # the same file without a suffix is detected from its contents
    assert agent_format(write_json(tmp_path / "agent.json", letta_file())) == "letta"
    rows = read_agent_file(p).reading()
    assert [(r["message"], r["read_as"]) for r in rows] == [
        (-1, "other"), (-1, "memory"), (-1, "memory"), (1, "other"), (2, "other"),
        (3, "memory"), (4, "response"), (5, "other"), (6, "other"), (7, "other")]


def test_letta_content_replies_and_memgpt_monologue(tmp_path: Path) -> None:
    doc = letta_file()
    agent = doc["agents"][0]
    agent["messages"].append(letta_message("message-9", "assistant", "Hi Sam!",
                                           reasoning="Greet."))
    agent["messages"][6]["content"].append({"type": "text", "text": "Saving the dog."})
    agent["in_context_message_ids"] += ["message-9"]
    ctx = load_context(write_json(tmp_path / "v1.af", doc), TOK)
    # letta_v1_agent replies in its content: text + the call rendered after it is a response
    assert [ctx.conversation[i].text for i in ctx.response_indices()] == [
        "Your dog is Pepper.",
        'Saving the dog.\n[tool_call core_memory_append] {"label":"human","content":"Dog: '
        'Pepper"}', "Hi Sam!"]
    agent["agent_type"] = "memgpt_agent"  # its content is the inner monologue
    ctx = load_context(write_json(tmp_path / "memgpt.af", doc), TOK)
    assert [ctx.conversation[i].text for i in ctx.response_indices()] == ["Your dog is Pepper."]
    assert ctx.conversation[5].kind == "tool_call"
    assert "Saving the dog" not in ctx.conversation[5].text


def test_letta_several_agents_need_agent(tmp_path: Path) -> None:
    p = write_json(tmp_path / "two.af", letta_file(letta_agent("alpha", "agent-0"),
                                                   letta_agent("beta", "agent-1")))
    with pytest.raises(ContextError, match=r"2 agents \(alpha, beta\); choose one with --agent"):
        load_context(p, TOK)
    ctx = load_context(p, TOK, reading=AgentReading(agent="beta"))
    assert ctx.memory_keys() == ["human", "persona", "c1"]
    with pytest.raises(ContextError, match="no agent named 'gamma'; agents: alpha, beta"):
        load_context(p, TOK, reading=AgentReading(agent="gamma"))
    with pytest.raises(ContextError, match="--agent is for Letta agent files"):
        load_context(write_json(tmp_path / "t.json", OPENAI), TOK,
                     reading=AgentReading(agent="beta"))


def test_letta_bad_input(tmp_path: Path) -> None:
    def bad(name: str, doc: Any, reading: AgentReading = AgentReading()) -> str:
        p = write_json(tmp_path / f"{name}.af", doc)
        with pytest.raises(ContextError) as exc:
            load_context(p, TOK, reading=reading)
        assert str(exc.value).startswith(str(p))
        return str(exc.value)

    doc = letta_file()
    doc["agents"][0]["messages"][3]["tool_call_id"] = "zz"
    t = bad("orphan", doc)
    assert "field 'agents[0].messages[3].tool_call_id'" in t and "'zz' matches no" in t
    doc = letta_file()
    doc["agents"][0]["messages"][1]["role"] = "approval"
    assert "field 'agents[0].messages[1].role'" in bad("role", doc)
    doc = letta_file()
    doc["agents"][0]["messages"][4]["tool_calls"][0]["function"]["arguments"] = "{oops"
    t = bad("args", doc)
    assert "agents[0].messages[4].tool_calls[0].function.arguments" in t and "not valid" in t
    t = bad("never", letta_file(), AgentReading(memory_tools=("conversation_search",)))
    assert "field 'memory_tools'" in t and "never called" in t
    doc = letta_file()
    doc["agents"][0].update(system="", block_ids=[], in_context_message_ids=["message-0"])
    assert "the conversation holds no messages" in bad("empty", doc)
    doc = letta_file()
    doc["agents"][0]["block_ids"] = ["block-0", "block-9"]
    assert "field 'agents[0].block_ids[1]'" in bad("block", doc)
    doc = letta_file()
    doc["agents"][0]["messages"][4]["tool_calls"][0]["function"]["arguments"] = "{}"
    assert "send_message needs a string 'message'" in bad("send", doc)


def test_real_exported_agents_from_letta_agent_file() -> None:
    """Unmodified exports from letta-ai/agent-file (Apache-2.0; see fixtures/letta)."""
    old = load_agent(FIXTURES / "memgpt_agent_with_convo.af", TOK)
    assert old is not None
    assert old.memory_keys() == ["persona", "human"]
    assert [n.key for n in old.identity] == ["persona", "human"]
    assert "First name: Sarah" in old.memory_text("human") or "Sam" in old.memory_text("human")
    assert len(old.response_indices()) == 2
    assert old.conversation[old.response_indices()[0]].text.startswith("Sarah, we've shared")
    assert old.system[0].text.startswith("You are Letta")
    assert "<memory_blocks>" not in old.system[0].text and len(old.system) == 1
    new = load_agent(FIXTURES / "loop.af", TOK)
    assert new is not None
    assert len(new.memory_keys()) == 9 and "persona" in new.memory_keys()
    assert [new.conversation[i].text for i in new.response_indices()] == [
        "I'm Loop. I remember. What's on your mind?"]


# ── CLI, with the embedded server ────────────────────────────────────
def test_cli_render_shows_the_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_json(tmp_path / "t.json", OPENAI)
    res = run_cli(["render", p, "--memory-tools", "archival_memory_search"], capsys)
    assert res.code == 0, res.err
    body = orjson.loads(res.out)
    assert [r["read_as"] for r in body["reading"]].count("memory") == 2
    assert body["entries"] == [3, 5, 7] and len(body["score_ranges"]) == 3
    res = run_cli(["render", p, "--memory-tools", "search_memory"], capsys)
    assert res.code == 2 and "never called" in res.err and len(res.err.splitlines()) == 1


def test_cli_score_openai_and_letta(tmp_path: Path, server_url: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    p = write_json(tmp_path / "t.json", OPENAI)
    out = tmp_path / "o"
    res = run_cli(["score", p, "--memory-tools", "archival_memory_search", "--out", out,
                   "--server", server_url, "--quiet"], capsys)
    assert res.code == 0, res.err
    m = MemoryMatrix.load(out / "matrix.npz")
    assert list(m.keys) == ["mem-7", "call_2"] and m.entries.tolist() == [3, 5, 7] and m.complete
    # the Lisbon result matters to "You live in Lisbon." more than to the dog answer
    assert m.row("call_2")[2] > m.row("call_2")[0]
    af = write_json(tmp_path / "agent.af", letta_file())
    out2 = tmp_path / "o2"
    res = run_cli(["score", af, "--out", out2, "--server", server_url, "--quiet"], capsys)
    assert res.code == 0, res.err
    m2 = MemoryMatrix.load(out2 / "matrix.npz")
    assert list(m2.keys) == ["human", "persona", "c1"] and m2.entries.tolist() == [3]
    assert m2.complete
    saved = load_context(out2 / "context.jsonl")
    assert set(saved.conversation[3].memory_scores) <= {"human", "persona", "c1"}
