"""Render plain messages as ChatML token ids (``<|im_start|>role\\n...<|im_end|>\\n``).

Roles are rendered as follows (the ChatML role the model sees):

============  ==============  ===============================================
message role  section         rendered as
============  ==============  ===============================================
system        system          ``system``
identity      identity        ``system`` (with key: a memory, ``[memory: KEY]`` header)
journal       journal         ``system`` with a ``[journal]`` header
memory        conversation    ``system`` with a ``[memory: KEY]`` header
user          conversation    ``user``
assistant     conversation    ``assistant`` (a branch with one text child)
tool          conversation    ``tool``
============  ==============  ===============================================

Each message is tokenized in parts (markers, role line, content), so a node's tokens never
merge with its neighbours' and removing a node removes exactly its tokens.
"""

from __future__ import annotations

from typing import Literal

from .._exceptions import ContextError
from .model import Node, Section
from .tokenizer import IM_END, IM_START, Tokenizer

__all__ = ["PLAIN_ROLES", "PlainRole", "render_message", "section_of"]

PlainRole = Literal["system", "identity", "journal", "user", "assistant", "tool", "memory"]
PLAIN_ROLES: tuple[str, ...] = (
    "system",
    "identity",
    "journal",
    "user",
    "assistant",
    "tool",
    "memory",
)

_SECTION: dict[str, Section] = {
    "system": "system",
    "identity": "identity",
    "journal": "journal",
    "user": "conversation",
    "assistant": "conversation",
    "tool": "conversation",
    "memory": "conversation",
}


def section_of(role: str) -> Section:
    return _SECTION[role]


def _wrap(tok: Tokenizer, chat_role: str, body: list[int]) -> tuple[int, ...]:
    if tok.im_start_id is None or tok.im_end_id is None:
        msg = (f"tokenizer {tok.name!r} has no ChatML tokens {IM_START} / {IM_END} and no "
               "chat template was named: pass --chat-template (chatml, gemma, tokenizer, or a "
               "Jinja file)")
        raise ContextError(msg, field="chat_template")
    return (
        tok.im_start_id,
        *tok.encode(f"{chat_role}\n"),
        *body,
        tok.im_end_id,
        *tok.encode("\n"),
    )


def render_message(
    tok: Tokenizer,
    role: str,
    content: str,
    *,
    key: str | None = None,
    timestamp_ns: int | None = None,
) -> Node:
    """One plain message as a :class:`Node` with its ChatML token ids."""
    if role == "assistant":
        body = tok.encode(content)
        child = Node("text", tuple(body), text=content)
        return Node(
            "assistant",
            _wrap(tok, "assistant", body),
            text=content,
            role="assistant",
            timestamp_ns=timestamp_ns,
            children=(child,),
        )
    if role == "memory" or (role == "identity" and key):
        header = f"[memory: {key}]\n"
        return Node(
            "memory",
            _wrap(tok, "system", tok.encode(header) + tok.encode(content)),
            text=content,
            key=key,
            role="system",
            timestamp_ns=timestamp_ns,
        )
    if role == "journal":
        ids = _wrap(tok, "system", tok.encode("[journal]\n") + tok.encode(content))
        return Node("journal", ids, text=content, role="system", timestamp_ns=timestamp_ns)
    chat_role = "system" if role in ("system", "identity") else role
    return Node(
        role,  # type: ignore[arg-type]
        _wrap(tok, chat_role, tok.encode(content)),
        text=content,
        role=chat_role,
        timestamp_ns=timestamp_ns,
    )
