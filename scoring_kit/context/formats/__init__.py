"""Agent formats in: OpenAI-style transcripts (:mod:`.openai`) and Letta agent files
(:mod:`.letta`), read into the kit's plain-message roles and then tokenized and rendered by the
plain-message path (:func:`scoring_kit.context.io.context_from_messages`).

Detection (:func:`agent_format`), from the file's first bytes:

- a ``.af`` file, or a JSON document with an ``agents`` list (or the earlier
  ``core_memory`` / ``in_context_message_indices``) → Letta;
- ``[`` (a JSON list of messages) or a JSON object with ``messages`` → OpenAI-style;
- JSONL of ``{"role": ...}`` objects → OpenAI-style when any line uses what only OpenAI
  messages have (``tool_calls``, ``tool_call_id``, ``name``, content parts or null, the
  ``developer`` role) or an :class:`AgentReading` option is given; otherwise the kit's
  plain messages, read (and validated) as before;
- anything else (the tokenized format included) is not an agent format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ..._exceptions import ContextError
from ..._types import PathLike
from ..model import ContextState
from ..tokenizer import Tokenizer
from ._common import (
    AgentFormat,
    AgentReading,
    AgentTranscript,
    ReadMessage,
    context_from_transcript,
)
from .letta import is_letta_document, read_letta
from .openai import read_openai, tool_call_text

__all__ = [
    "AgentFormat",
    "AgentReading",
    "AgentTranscript",
    "ReadMessage",
    "agent_format",
    "context_from_transcript",
    "describe_reading",
    "load_agent",
    "read_agent_file",
    "tool_call_text",
]

_OPENAI_FIELDS = ("tool_calls", "tool_call_id", "name", "refusal", "function_call")


def _openai_line(obj: object) -> bool:
    """Whether ``obj`` uses what only OpenAI-style messages have: tool calls or results,
    ``name``, null or list content, the ``developer`` role. Anything else, valid or not, is
    left to the plain loader (which names a bad line precisely)."""
    if not isinstance(obj, Mapping):
        return False
    content = obj.get("content")
    return (any(f in obj for f in _OPENAI_FIELDS) or obj.get("role") == "developer"
            or ("content" in obj and (content is None or isinstance(content, list))))


def agent_format(path: PathLike, reading: AgentReading | None = None) -> AgentFormat | None:
    """``"openai"``, ``"letta"`` or None (plain messages, tokenized, or unreadable: the
    plain/tokenized loader reports those). Never raises."""
    p = Path(path)
    if p.suffix == ".af":
        return "letta"
    try:
        raw = p.read_bytes()
    except OSError:
        return None
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        # a JSON list of message objects; anything else (a JSONL line that is an array, a
        # list of strings) is left to the plain loader, which names the line
        try:
            listed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        ok = isinstance(listed, list) and all(isinstance(m, Mapping) for m in listed)
        return "openai" if ok else None
    if head not in (b"{", b'"'):
        return None
    try:
        doc: Any = orjson.loads(raw)
        if isinstance(doc, str):
            doc = orjson.loads(doc)
    except orjson.JSONDecodeError:
        doc = None
    if is_letta_document(doc):
        return "letta"
    if isinstance(doc, Mapping) and "messages" in doc:
        return "openai"
    lines = []
    for line in raw.splitlines():
        if line.strip():
            try:
                lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                return None  # the plain loader names the bad line
    if not lines or not isinstance(lines[0], Mapping) or "role" not in lines[0]:
        return None
    if reading is not None and not reading.is_default:
        return "openai"
    return "openai" if any(_openai_line(o) for o in lines) else None


def read_agent_file(
    path: PathLike, reading: AgentReading | None = None, fmt: AgentFormat | None = None
) -> AgentTranscript:
    """Read an OpenAI-style or Letta file into :class:`ReadMessage` s (not tokenized)."""
    p = Path(path)
    rd = reading or AgentReading()
    kind = fmt or agent_format(p, rd)
    if kind is None:
        raise ContextError("not an OpenAI-style transcript or a Letta agent file", path=str(p))
    if rd.agent is not None and kind != "letta":
        raise ContextError("--agent is for Letta agent files (.af) only", path=str(p),
                           field="agent")
    return read_letta(p, rd) if kind == "letta" else read_openai(p, rd)


def load_agent(
    path: PathLike, tokenizer: Tokenizer | None, reading: AgentReading | None = None
) -> ContextState | None:
    """The context of an agent-format file, or None when ``path`` is not one (the hook of
    :func:`scoring_kit.context.io.load_context`).

    A non-default ``reading`` on a file that is not an agent format is an error (its options
    would otherwise be ignored silently).
    """
    p = Path(path)
    kind = agent_format(p, reading)
    if kind is None:
        if reading is not None and not reading.is_default and p.exists():
            msg = ("--memory-tools / --memory-role / --score-tool-calls / --agent apply to "
                   "OpenAI-style transcripts and Letta agent files, not to this file")
            raise ContextError(msg, path=str(p))
        return None
    tr = read_agent_file(p, reading, kind)
    if tokenizer is None:
        msg = (
            f"{kind} files are tokenized like plain messages and need a tokenizer: pass "
            "tokenizer= (e.g. scoring_kit.engine.loader.load_tokenizer()), or load the file "
            "with a session (sess.load(path))"
        )
        raise ContextError(msg, path=str(p))
    return context_from_transcript(tr, tokenizer)


def describe_reading(
    path: PathLike, ctx: ContextState, reading: AgentReading | None = None
) -> list[dict[str, Any]]:
    """How each message was read (memory / response / other), for ``scoring-kit render``.

    Agent formats list each source message (``message`` is its index in the file, -1 for a
    Letta system prompt or block) with a note; the kit's own formats list each node.
    """
    if agent_format(path, reading) is not None:
        return read_agent_file(path, reading).reading()
    out: list[dict[str, Any]] = []
    for sec, i, node in ctx.iter_nodes():
        read_as = ("memory" if node.kind == "memory"
                   else "response" if node.is_branch else "other")
        row: dict[str, Any] = {"role": node.role, "read_as": read_as, "section": sec,
                               "index": i}
        if node.key is not None:
            row["key"] = node.key
        out.append(row)
    return out
