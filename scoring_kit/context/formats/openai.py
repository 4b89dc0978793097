"""OpenAI-style chat transcripts: a JSON list of messages, ``{"messages": [...]}``, or JSONL
with one message per line.

Each message is ``{"role", "content", ...}`` with

- ``role``: ``system`` / ``developer`` (→ the system section), ``user``, ``assistant``,
  ``tool``, or one of the kit's own ``memory`` (with ``key``), ``identity``, ``journal``;
- ``content``: a string, null, or a list of parts: ``text`` (also ``input_text`` /
  ``output_text``) parts are joined with newlines; ``image_url`` (also ``input_image``)
  parts with a ``data:`` URI are attached as images (the backend must take images; the
  text-only backends say so); ``reasoning`` parts are left out;
- ``tool_calls`` on assistant messages: ``[{"id", "type": "function", "function": {"name",
  "arguments"}}]``; ``arguments`` must be JSON (a string of JSON, or an object). The kit
  renders them into the assistant message as text, one line per call after the content::

      [tool_call NAME] {"compact": "json", "arguments": 1}

- ``tool`` messages: ``tool_call_id`` names an earlier call; the content is the result.

Memories are chosen once per file (:class:`AgentReading`): results of ``memory_tools``,
messages of ``memory_role``, or any message whose content starts with ``[memory: KEY]``.
An assistant turn with no text that only calls tools stays in the prompt but is not a
scored response unless ``score_tool_calls``. Unknown extra fields (``name``, ``refusal``,
ids, timestamps other than ``timestamp``) are ignored. Every bad message raises one
:class:`ContextError` naming the file, the message index and the field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from ..._exceptions import ContextError
from ...wire import WireImage
from ._common import AgentReading, AgentTranscript, ReadAs, ReadMessage, image_from_url

__all__ = ["MEMORY_PREFIX", "OPENAI_ROLES", "read_openai", "read_openai_messages",
           "tool_call_text"]

#: Roles an OpenAI-style transcript may use (plus ``--memory-role``).
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "memory", "identity",
                "journal")
#: ``[memory: KEY]`` at the start of a message's content makes it memory KEY.
MEMORY_PREFIX = re.compile(r"\A\s*\[memory:\s*([^\]\n]+?)\s*\]\s*\n?")
_TEXT_PARTS = ("text", "input_text", "output_text")
_IMAGE_PARTS = ("image_url", "input_image")
_SKIP_PARTS = ("reasoning", "omitted_reasoning", "redacted_reasoning")
_RESULT_KEY_FIELDS = ("key", "id", "memory_id")


def tool_call_text(name: str, arguments: object) -> str:
    """The documented text form of one tool call: ``[tool_call NAME] {compact JSON}``."""
    return f"[tool_call {name}] {orjson.dumps(arguments).decode()}"


@dataclass(slots=True)
class _Call:
    name: str
    index: int
    arguments: Any


class _Reader:
    def __init__(self, path: str, reading: AgentReading, lines: Sequence[int] | None,
                 *, indices: Sequence[int] | None = None, response_tools: Collection[str] = (),
                 default_memory_tools: Collection[str] = (), prefix: str = "messages",
                 monologue: bool = False) -> None:
        self.path = path
        self.reading = reading
        self.lines = lines
        self.indices = indices
        self.response_tools = set(response_tools)
        self.memory_tools = set(reading.memory_tools) or set(default_memory_tools)
        self.prefix = prefix
        self.monologue = monologue
        self.calls: dict[str, _Call] = {}

    def src(self, i: int) -> int:
        """The index of reading position ``i`` in the file's message list."""
        return self.indices[i] if self.indices is not None else i

    def err(self, i: int, fld: str, msg: str) -> ContextError:
        line = self.lines[i] if self.lines is not None else None
        k = self.src(i)
        return ContextError(f"message {k}: {msg}", path=self.path, line=line,
                            field=f"{self.prefix}[{k}].{fld}")

    # ── content ─────────────────────────────────────────────────
    def content(self, i: int, obj: Mapping[str, Any]) -> tuple[str, tuple[WireImage, ...]]:
        raw = obj.get("content")
        if raw is None:
            return "", ()
        if isinstance(raw, str):
            return raw, ()
        if not isinstance(raw, list):
            raise self.err(i, "content", f"content must be a string, null or a list of parts, "
                                         f"got {type(raw).__name__}")
        texts: list[str] = []
        images: list[WireImage] = []
        for j, part in enumerate(raw):
            fld = f"content[{j}]"
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise self.err(i, fld, f"a content part must be an object, got "
                                       f"{type(part).__name__}")
            kind = part.get("type")
            if kind in _TEXT_PARTS:
                text = part.get("text")
                if not isinstance(text, str):
                    raise self.err(i, f"{fld}.text", "a text part needs a string 'text'")
                texts.append(text)
            elif kind in _IMAGE_PARTS:
                url = part.get("image_url")
                if isinstance(url, Mapping):
                    url = url.get("url")
                try:
                    images.append(image_from_url(url))
                except ValueError as exc:
                    raise self.err(i, f"{fld}.image_url", str(exc)) from None
            elif kind in _SKIP_PARTS:
                continue
            else:
                allowed = ", ".join((*_TEXT_PARTS, *_IMAGE_PARTS, *_SKIP_PARTS))
                raise self.err(i, f"{fld}.type",
                               f"unknown content part type {kind!r}; expected one of {allowed}")
        return "\n".join(texts), tuple(images)

    def tool_calls(self, i: int, obj: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
        raw = obj.get("tool_calls")
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.err(i, "tool_calls", "tool_calls must be a list")
        out = []
        for j, call in enumerate(raw):
            fld = f"tool_calls[{j}]"
            if not isinstance(call, Mapping):
                raise self.err(i, fld, "a tool call must be an object")
            cid = call.get("id")
            if not isinstance(cid, str) or not cid:
                raise self.err(i, f"{fld}.id", "a tool call needs a non-empty string id")
            fn = call.get("function")
            if not isinstance(fn, Mapping):
                raise self.err(i, f"{fld}.function", "a tool call needs a 'function' object")
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise self.err(i, f"{fld}.function.name", "a tool call needs a function name")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = orjson.loads(args) if args.strip() else {}
                except orjson.JSONDecodeError as exc:
                    raise self.err(i, f"{fld}.function.arguments",
                                   f"arguments of {name!r} are not valid JSON ({exc})") from None
            elif not isinstance(args, Mapping):
                raise self.err(i, f"{fld}.function.arguments",
                               "arguments must be a JSON string or an object")
            if cid in self.calls:
                raise self.err(i, f"{fld}.id", f"tool call id {cid!r} is used twice (first in "
                                               f"message {self.calls[cid].index})")
            self.calls[cid] = _Call(name, self.src(i), args)
            out.append((cid, name, args))
        return out

    # ── one message ─────────────────────────────────────────────
    def message(self, i: int, obj: object) -> ReadMessage:
        if not isinstance(obj, Mapping):
            raise self.err(i, "role", f"a message must be an object, got {type(obj).__name__}")
        role = obj.get("role")
        allowed = OPENAI_ROLES + ((self.reading.memory_role,) if self.reading.memory_role
                                  else ())
        if not isinstance(role, str) or role not in allowed:
            raise self.err(i, "role", f"unknown role {role!r}; expected one of "
                                      f"{', '.join(allowed)}")
        text, images = self.content(i, obj)
        ts = self.timestamp(i, obj)
        calls = self.tool_calls(i, obj) if role == "assistant" else []
        if role == "assistant":
            return self.assistant(i, text, calls, images, ts)
        if role == "tool":
            return self.tool(i, obj, text, images, ts)
        if role in ("memory", "identity", "journal"):
            return self.kit_role(i, obj, role, text, images, ts)
        key, body, how = self.memory_of(i, obj, role, text)
        if key is not None:
            return ReadMessage(i, role, "memory", body, "memory", key=key, timestamp_ns=ts,
                               images=images, note=how)
        plain = "system" if role in ("system", "developer") else "user"
        note = "" if plain == role else f"{role} → {plain}"
        if role == self.reading.memory_role:  # a custom memory role that is user/system
            note = note or "memory role"
        return ReadMessage(i, role, plain, text, "other", timestamp_ns=ts, images=images,
                           note=note)

    def memory_of(self, i: int, obj: Mapping[str, Any], role: str,
                  text: str) -> tuple[str | None, str, str]:
        m = MEMORY_PREFIX.match(text)
        if m:
            return m.group(1), text[m.end():], "[memory: KEY] prefix"
        if self.reading.memory_role is not None and role == self.reading.memory_role:
            key = obj.get("key", obj.get("name"))
            if key is not None and (not isinstance(key, str | int) or isinstance(key, bool)
                                    or not str(key).strip()):
                raise self.err(i, "key", "a memory key must be a non-empty string")
            return (str(key) if key is not None else f"{role}:{i}"), text, "memory role"
        return None, text, ""

    def kit_role(self, i: int, obj: Mapping[str, Any], role: str, text: str,
                 images: tuple[WireImage, ...], ts: int | None) -> ReadMessage:
        key = obj.get("key")
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise self.err(i, "key", "key must be a non-empty string")
        if role == "memory" and key is None:
            raise self.err(i, "key", "a memory message needs a key")
        if role == "journal" and key is not None:
            raise self.err(i, "key", "key is only allowed on memory and identity messages")
        read_as: ReadAs = "memory" if key is not None else "other"
        return ReadMessage(i, role, role, text, read_as, key=key, timestamp_ns=ts,
                           images=images)

    def assistant(self, i: int, text: str, calls: list[tuple[str, str, Any]],
                  images: tuple[WireImage, ...], ts: int | None) -> ReadMessage:
        said: list[str] = []
        rendered: list[str] = []
        for j, (_, name, args) in enumerate(calls):
            if name in self.response_tools:
                msg = args.get("message") if isinstance(args, Mapping) else None
                if not isinstance(msg, str):
                    raise self.err(i, f"tool_calls[{j}].function.arguments.message",
                                   f"{name} needs a string 'message' argument")
                said.append(msg)
            else:
                rendered.append(tool_call_text(name, args))
        if said or self.monologue:
            text = ""  # Letta: next to send_message, the content is the inner monologue
        body = "\n".join(p for p in ("\n".join(said) if said else text, *rendered) if p)
        if said or text.strip():
            note = "send_message → response" if said else ""
            if rendered:
                note = (note + "; " if note else "") + "tool calls rendered as text"
            return ReadMessage(i, "assistant", "assistant", body, "response", timestamp_ns=ts,
                               images=images, note=note)
        if not calls and self.monologue:
            return ReadMessage(i, "assistant", "assistant", body, "other", timestamp_ns=ts,
                               scored=False, images=images,
                               note="inner monologue only (no send_message); not scored")
        if not calls:
            return ReadMessage(i, "assistant", "assistant", body, "response", timestamp_ns=ts,
                               images=images, note="empty assistant message")
        scored = self.reading.score_tool_calls
        note = ("tool call only; scored (score_tool_calls)" if scored
                else "tool call only; in the prompt, not scored (score_tool_calls to score)")
        return ReadMessage(i, "assistant", "assistant", body,
                           "response" if scored else "other", timestamp_ns=ts, scored=scored,
                           images=images, note=note)

    def tool(self, i: int, obj: Mapping[str, Any], text: str,
             images: tuple[WireImage, ...], ts: int | None) -> ReadMessage:
        cid = obj.get("tool_call_id")
        if not isinstance(cid, str) or not cid:
            raise self.err(i, "tool_call_id", "a tool message needs a tool_call_id")
        call = self.calls.get(cid)
        if call is None:
            known = ", ".join(list(self.calls)[-5:]) or "none"
            raise self.err(i, "tool_call_id",
                           f"tool_call_id {cid!r} matches no earlier tool call (last ids: "
                           f"{known})")
        pre = MEMORY_PREFIX.match(text)
        if pre:
            return ReadMessage(i, "tool", "memory", text[pre.end():], "memory",
                               key=pre.group(1), timestamp_ns=ts, images=images,
                               note="[memory: KEY] prefix")
        if call.name in self.memory_tools or self.reading.memory_role == "tool":
            key, how = _result_key(text)
            return ReadMessage(i, "tool", "memory", text, "memory", key=key or cid,
                               timestamp_ns=ts, images=images,
                               note=f"result of {call.name} (message {call.index}); key from "
                                    f"{how or 'the call id'}")
        return ReadMessage(i, "tool", "tool", text, "other", timestamp_ns=ts, images=images,
                           note=f"result of {call.name}")

    def timestamp(self, i: int, obj: Mapping[str, Any]) -> int | None:
        from ..messages import parse_timestamp

        for fld in ("timestamp", "created_at"):
            value = obj.get(fld)
            if value is None or (fld == "created_at" and not isinstance(value, str)):
                continue  # OpenAI's integer created_at is seconds, not the kit's ns
            try:
                return parse_timestamp(value)
            except ContextError:
                raise self.err(i, fld, f"{fld} {value!r} is neither ISO 8601 nor integer "
                                       "nanoseconds") from None
        return None

    def finish(self) -> None:
        called = {c.name for c in self.calls.values()}
        missing = [t for t in self.reading.memory_tools if t not in called]
        if missing:
            raise ContextError(
                f"memory tool(s) {missing} are never called in this conversation; tools "
                f"called: {sorted(called) or 'none'}", path=self.path, field="memory_tools")


def _result_key(text: str) -> tuple[str | None, str]:
    """The memory key of a tool result: its ``key`` / ``id`` / ``memory_id`` field when it is
    a JSON object with one."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, ""
    if isinstance(obj, Mapping):
        for f in _RESULT_KEY_FIELDS:
            v = obj.get(f)
            if isinstance(v, str | int) and not isinstance(v, bool) and str(v).strip():
                return str(v), f"its {f!r} field"
    return None, ""


def read_openai_messages(
    messages: Sequence[object],
    reading: AgentReading,
    *,
    path: str,
    lines: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    response_tools: Collection[str] = (),
    default_memory_tools: Collection[str] = (),
    field_prefix: str = "messages",
    monologue: bool = False,
) -> list[ReadMessage]:
    """Read OpenAI-style message objects (see the module docstring).

    ``indices[i]`` is the file's index of ``messages[i]`` (default ``i``), used in errors
    and in :attr:`ReadMessage.index`; ``lines`` are JSONL line numbers. The ``message``
    argument of a call to one of ``response_tools`` is the response (the content beside it
    is left out); with ``monologue`` an assistant's content is never the response.
    """
    if not messages:
        raise ContextError("the conversation holds no messages", path=path, field=field_prefix)
    r = _Reader(path, reading, lines, indices=indices, response_tools=response_tools,
                default_memory_tools=default_memory_tools, prefix=field_prefix,
                monologue=monologue)
    out = [replace(r.message(i, m), index=r.src(i)) for i, m in enumerate(messages)]
    r.finish()
    return out


def load_messages_json(path: Path) -> tuple[list[object], list[int] | None]:
    """The message objects of an OpenAI-style file and, for JSONL, their line numbers."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ContextError("no such file", path=str(path)) from None
    except OSError as exc:
        raise ContextError(f"cannot read: {exc}", path=str(path)) from exc
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    else:
        if isinstance(doc, list):
            return doc, None
        if isinstance(doc, Mapping) and "messages" in doc:
            msgs = doc["messages"]
            if not isinstance(msgs, list):
                raise ContextError("'messages' must be a list", path=str(path), field="messages")
            return msgs, None
    out: list[object] = []
    nums: list[int] = []
    for no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise ContextError(f"bad JSON: {exc}", path=str(path), line=no) from None
        nums.append(no)
    return out, nums


def read_openai(path: Path, reading: AgentReading) -> AgentTranscript:
    """Read an OpenAI-style transcript file."""
    msgs, lines = load_messages_json(path)
    read = read_openai_messages(msgs, reading, path=str(path), lines=lines)
    return AgentTranscript(str(path), "openai", tuple(read))
