"""What every agent-format reader produces: messages in the kit's plain-message roles, each
with how it was read, and the step that turns them into a :class:`ContextState` through the
plain-message path (:func:`scoring_kit.context.io.context_from_messages`)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..._exceptions import ContextError
from ...wire import WireImage
from ..chatml import section_of
from ..model import SECTIONS, ContextState, Node
from ..tokenizer import Tokenizer

__all__ = ["AgentReading", "AgentTranscript", "ReadAs", "ReadMessage", "context_from_transcript"]

ReadAs = Literal["memory", "response", "other"]
AgentFormat = Literal["openai", "letta"]


@dataclass(frozen=True, slots=True)
class AgentReading:
    """Which messages of an agent transcript are memories and which are scored, stated once.

    Parameters
    ----------
    memory_tools
        Tool names whose results are memories (``--memory-tools``). Each result of a call to
        one of them is a memory node, keyed by the result's ``key`` or ``id`` field when the
        result is a JSON object that has one, else by the call id. Letta files default to
        ``("archival_memory_search",)``.
    memory_role
        A message role whose messages are memories (``--memory-role``), keyed by the
        message's ``key`` or ``name`` field, else ``ROLE:INDEX``; for ``tool`` the key rule
        of ``memory_tools`` applies.
    score_tool_calls
        Also score assistant turns that only call tools (``--score-tool-calls``).
    agent
        The agent to read from a Letta file holding several (``--agent``, name or id).

    Whatever is chosen, a message whose content starts with ``[memory: KEY]`` is memory KEY
    (the prefix is removed; the kit renders memories with that same header).
    """

    memory_tools: tuple[str, ...] = ()
    memory_role: str | None = None
    score_tool_calls: bool = False
    agent: str | None = None

    @property
    def is_default(self) -> bool:
        return self == AgentReading()


@dataclass(frozen=True, slots=True)
class ReadMessage:
    """One message of the source file as the kit reads it.

    ``role`` is a plain-message role (system, identity, journal, user, assistant, tool,
    memory); ``source_role`` what the file said; ``index`` its position in the file's
    message list (-1 for what a Letta file holds outside its messages: system, blocks).
    """

    index: int
    source_role: str
    role: str
    content: str
    read_as: ReadAs
    key: str | None = None
    timestamp_ns: int | None = None
    #: False for an assistant turn that only calls tools (kept in the prompt, not scored)
    scored: bool = True
    images: tuple[WireImage, ...] = ()
    note: str = ""

    def plain(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.key is not None:
            out["key"] = self.key
        if self.timestamp_ns is not None:
            out["timestamp"] = self.timestamp_ns
        return out


@dataclass(frozen=True, slots=True)
class AgentTranscript:
    """A file read in one of the agent formats."""

    path: str
    format: AgentFormat
    messages: tuple[ReadMessage, ...]
    agent: str | None = None
    #: where each message landed: (section, index in that section)
    placement: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def reading(self) -> list[dict[str, Any]]:
        """How each message was read, for ``scoring-kit render``."""
        place = self.placement or _placement(self.messages)
        out = []
        for m, (sec, i) in zip(self.messages, place, strict=True):
            row: dict[str, Any] = {"message": m.index, "role": m.source_role,
                                   "read_as": m.read_as, "section": sec, "index": i}
            if m.key is not None:
                row["key"] = m.key
            if m.note:
                row["note"] = m.note
            out.append(row)
        return out


def _placement(messages: Sequence[ReadMessage]) -> tuple[tuple[str, int], ...]:
    counts = dict.fromkeys(SECTIONS, 0)
    out = []
    for m in messages:
        sec = section_of(m.role)
        out.append((sec, counts[sec]))
        counts[sec] += 1
    return tuple(out)


def context_from_transcript(tr: AgentTranscript, tokenizer: Tokenizer) -> ContextState:
    """Tokenize and render ``tr`` through the plain-message path, then mark the assistant
    turns that are not scored (a ``tool_call`` leaf with the same tokens, so it stays in
    the prompt without a score range) and attach images."""
    from ..messages import context_from_messages

    if not tr.messages:
        raise ContextError("the conversation holds no messages", path=tr.path, field="messages")
    ctx = context_from_messages([m.plain() for m in tr.messages], tokenizer, path=tr.path)
    place = _placement(tr.messages)
    sections: dict[str, list[Node]] = {s: list(ctx.section(s)) for s in SECTIONS}
    for m, (sec, i) in zip(tr.messages, place, strict=True):
        node = sections[sec][i]
        if m.role == "assistant" and not m.scored:
            node = Node("tool_call", node.token_ids, text=node.text, role="assistant",
                        timestamp_ns=node.timestamp_ns)
        if m.images:
            node = replace(node, images=m.images)
        sections[sec][i] = node
    return ctx.replace(**{s: tuple(v) for s, v in sections.items()})


def image_from_url(url: object) -> WireImage:
    """A ``data:`` URI image part as a :class:`WireImage`; ValueError names what is wrong
    (other URLs cannot be sent: the kit fetches nothing)."""
    if not isinstance(url, str) or not url:
        raise ValueError("an image part needs a url string")
    if not url.startswith("data:"):
        raise ValueError(f"image {url[:60]!r} is not a data: URI; the kit sends images inline "
                         "and fetches nothing: embed it as data:<mime>;base64,...")
    head, _, payload = url[5:].partition(",")
    mime, _, enc = head.partition(";")
    if enc != "base64" or not mime:
        raise ValueError("an image data: URI must be data:<mime>;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data: URI holds bad base64") from None
    return WireImage(mime, data)
