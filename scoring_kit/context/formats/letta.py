"""Letta (MemGPT) agent files, ``.af`` (https://github.com/letta-ai/agent-file).

Two shapes are read:

- the current ``AgentFileSchema``: ``{"agents": [...], "blocks": [...], "tools": [...],
  ...}``; each agent has ``system``, ``block_ids`` (into the top-level ``blocks``),
  ``messages`` (each with an ``id``) and ``in_context_message_ids``;
- the earlier single-agent export: the agent at the top level with ``core_memory`` (its
  blocks), ``messages`` and ``in_context_message_indices``.

(A file holding the JSON document as one JSON string, as some published examples do, is
decoded first.)

What the kit reads:

- the agent's ``system`` → the system prompt;
- each memory block → an identity memory keyed by its ``label`` (content: its ``value``);
- the in-context messages, in context order. The first, when it is a system message, is the
  system prompt *compiled with the blocks* that Letta sends; it is replaced by the two items
  above, so that ablating a block removes all of it. The others are read as OpenAI-style
  messages (:mod:`.openai`) with Letta's conventions: the ``message`` argument of an
  assistant's ``send_message`` call is the response (the content beside it, the inner
  monologue, and reasoning parts are left out); agents that reply in the content
  (``letta_v1_agent``) have it as the response, MemGPT agents (``memgpt_agent``,
  ``memgpt_v2_agent``) never do; results of ``archival_memory_search`` (or the tools named
  in ``--memory-tools``) are memories; an assistant turn with other tool calls only is kept
  in the prompt, not scored.

A file with several agents needs ``agent`` (``--agent NAME``, name or id).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ..._exceptions import ContextError
from ._common import AgentReading, AgentTranscript, ReadMessage
from .openai import read_openai_messages

__all__ = ["LETTA_MEMORY_TOOLS", "LETTA_RESPONSE_TOOLS", "is_letta_document", "read_letta"]

#: Tools whose results are memories unless ``--memory-tools`` says otherwise.
LETTA_MEMORY_TOOLS = ("archival_memory_search",)
#: Tools whose ``message`` argument is what the agent said.
LETTA_RESPONSE_TOOLS = ("send_message",)
#: Agent types whose assistant content is the inner monologue (they reply only through
#: ``send_message``); other types (``letta_v1_agent``, ...) reply in the content.
MONOLOGUE_AGENT_TYPES = ("memgpt_agent", "memgpt_v2_agent")


def is_letta_document(doc: object) -> bool:
    """Whether a parsed JSON document has an agent file's shape."""
    if not isinstance(doc, Mapping):
        return False
    if isinstance(doc.get("agents"), list):
        return True
    return "core_memory" in doc or "in_context_message_indices" in doc


def load_document(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ContextError("no such file", path=str(path)) from None
    except OSError as exc:
        raise ContextError(f"cannot read: {exc}", path=str(path)) from exc
    try:
        doc = orjson.loads(raw)
        if isinstance(doc, str):  # the document stored as one JSON string
            doc = orjson.loads(doc)
    except orjson.JSONDecodeError as exc:
        raise ContextError(f"not a JSON agent file: {exc}", path=str(path)) from None
    if not is_letta_document(doc):
        got = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
        raise ContextError(f"not a Letta agent file (no 'agents' list or 'core_memory'); got "
                           f"{got}", path=str(path))
    return doc


def _pick_agent(doc: Mapping[str, Any], want: str | None, path: str) -> tuple[int, Any]:
    agents = doc.get("agents")
    if agents is None:  # the earlier single-agent shape
        return -1, doc
    if not agents:
        raise ContextError("the agent file holds no agents", path=path, field="agents")
    names = [str(a.get("name") or a.get("id") or f"#{k}") if isinstance(a, Mapping) else f"#{k}"
             for k, a in enumerate(agents)]
    if want is None:
        if len(agents) > 1:
            raise ContextError(f"the file holds {len(agents)} agents ({', '.join(names)}); "
                               "choose one with --agent NAME", path=path, field="agents")
        k = 0
    else:
        hits = [k for k, a in enumerate(agents)
                if isinstance(a, Mapping) and want in (a.get("name"), a.get("id"))]
        if not hits:
            raise ContextError(f"no agent named {want!r}; agents: {', '.join(names)}",
                               path=path, field="agents")
        k = hits[0]
    agent = agents[k]
    if not isinstance(agent, Mapping):
        raise ContextError("an agent must be an object", path=path, field=f"agents[{k}]")
    return k, agent


def _blocks(doc: Mapping[str, Any], agent: Mapping[str, Any], where: str,
            path: str) -> list[tuple[str, str, str]]:
    """``(label, value, field)`` of the agent's memory blocks, in file order."""
    out: list[tuple[str, str, str]] = []
    if "core_memory" in agent:
        raw = [(b, f"{where}core_memory[{j}]") for j, b in enumerate(agent["core_memory"] or [])]
    else:
        by_id = {b.get("id"): (b, f"blocks[{j}]") for j, b in enumerate(doc.get("blocks") or [])
                 if isinstance(b, Mapping)}
        raw = []
        for j, bid in enumerate(agent.get("block_ids") or []):
            if bid not in by_id:
                raise ContextError(f"block id {bid!r} is not in the file's blocks", path=path,
                                   field=f"{where}block_ids[{j}]")
            raw.append(by_id[bid])
        raw += [(b, f"{where}memory_blocks[{j}]")
                for j, b in enumerate(agent.get("memory_blocks") or [])]
    for b, fld in raw:
        if not isinstance(b, Mapping):
            raise ContextError("a memory block must be an object", path=path, field=fld)
        label, value = b.get("label"), b.get("value")
        if not isinstance(label, str) or not label.strip():
            raise ContextError("a memory block needs a label", path=path, field=f"{fld}.label")
        if not isinstance(value, str):
            raise ContextError("a memory block's value must be a string", path=path,
                               field=f"{fld}.value")
        out.append((label, value, fld))
    return out


def _in_context(agent: Mapping[str, Any], where: str, path: str) -> list[tuple[int, Any]]:
    """``(index into messages, message)`` of the in-context messages, in context order."""
    msgs = agent.get("messages")
    if not isinstance(msgs, list):
        raise ContextError("the agent has no 'messages' list", path=path,
                           field=f"{where}messages")
    if "in_context_message_indices" in agent:
        order = agent["in_context_message_indices"]
        for j, k in enumerate(order or []):
            if not isinstance(k, int) or not 0 <= k < len(msgs):
                raise ContextError(f"index {k!r} is outside the {len(msgs)} messages",
                                   path=path, field=f"{where}in_context_message_indices[{j}]")
        return [(k, msgs[k]) for k in order or []]
    ids = agent.get("in_context_message_ids")
    if ids is None:
        return list(enumerate(msgs))
    by_id = {m.get("id"): k for k, m in enumerate(msgs) if isinstance(m, Mapping)}
    out = []
    for j, mid in enumerate(ids):
        if mid not in by_id:
            raise ContextError(f"message id {mid!r} is not among the agent's messages",
                               path=path, field=f"{where}in_context_message_ids[{j}]")
        out.append((by_id[mid], msgs[by_id[mid]]))
    return out


def _as_openai(m: object) -> object:
    """A Letta message as an OpenAI-style one (tool results from ``tool_returns`` when the
    content is empty)."""
    if not isinstance(m, Mapping):
        return m
    out = {k: m.get(k) for k in ("role", "content", "tool_calls", "tool_call_id", "created_at")
           if m.get(k) is not None}
    if m.get("role") == "tool" and not out.get("content"):
        rets = [str(r["func_response"]) for r in m.get("tool_returns") or []
                if isinstance(r, Mapping) and isinstance(r.get("func_response"), str)]
        out["content"] = "\n".join(rets)
    if m.get("role") != "assistant":
        out.pop("tool_calls", None)
    return out


def read_letta(path: Path, reading: AgentReading) -> AgentTranscript:
    """Read a Letta agent file (see the module docstring)."""
    p = str(path)
    doc = load_document(path)
    k, agent = _pick_agent(doc, reading.agent, p)
    where = "" if k < 0 else f"agents[{k}]."
    name = agent.get("name") if isinstance(agent.get("name"), str) else None
    system = agent.get("system")
    if system is not None and not isinstance(system, str):
        raise ContextError("the agent's system prompt must be a string", path=p,
                           field=f"{where}system")
    out: list[ReadMessage] = []
    if system:
        out.append(ReadMessage(-1, "system", "system", system, "other",
                               note="the agent's system prompt"))
    for label, value, fld in _blocks(doc, agent, where, p):
        out.append(ReadMessage(-1, "block", "identity", value, "memory", key=label,
                               note=f"memory block {fld}"))
    ctx_msgs = _in_context(agent, where, p)
    if ctx_msgs and isinstance(ctx_msgs[0][1], Mapping) and ctx_msgs[0][1].get("role") == "system":
        ctx_msgs = ctx_msgs[1:]  # the compiled system prompt: replaced by system + blocks
    if not ctx_msgs and not out:
        raise ContextError("the conversation holds no messages", path=p,
                           field=f"{where}messages")
    if ctx_msgs:
        read = read_openai_messages(
            [_as_openai(m) for _, m in ctx_msgs], reading, path=p,
            indices=[j for j, _ in ctx_msgs], response_tools=LETTA_RESPONSE_TOOLS,
            default_memory_tools=LETTA_MEMORY_TOOLS, field_prefix=f"{where}messages",
            monologue=agent.get("agent_type") in MONOLOGUE_AGENT_TYPES)
        out.extend(read)
    elif reading.memory_tools:
        raise ContextError(f"memory tool(s) {list(reading.memory_tools)} are never called in "
                           "this conversation; tools called: none", path=p,
                           field="memory_tools")
    return AgentTranscript(p, "letta", tuple(out), agent=name)

