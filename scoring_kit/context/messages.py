"""Plain messages → a context: each message checked, tokenized and rendered (ChatML, or the
model's chat template), and ISO / integer-ns timestamps parsed.

Below :mod:`.io` (files) and :mod:`.formats` (agent transcripts), which both build their
contexts here.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._exceptions import ConfigError, ContextError
from .._types import PathLike
from .chat_templates import ChatTemplate, resolve_template
from .chatml import PLAIN_ROLES, render_message, section_of
from .model import SCORE_SPANS, SECTIONS, ContextState, Node, ScoreSpan
from .templates import PlainMessage, render_template_context
from .tokenizer import Tokenizer

__all__ = ["context_from_messages", "parse_timestamp"]


def parse_timestamp(
    value: object, *, path: str | None = None, line: int | None = None
) -> int | None:
    """ISO 8601 string or integer ns → ns since the epoch (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ContextError("timestamp must be ISO 8601 or integer ns, got a boolean",
                           path=path, line=line, field="timestamp")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        try:
            dt = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            msg = f"timestamp {value!r} is neither ISO 8601 nor integer nanoseconds"
            raise ContextError(msg, path=path, line=line, field="timestamp") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=_dt.UTC)
        delta = dt - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    msg = f"timestamp must be ISO 8601 or integer ns, got {type(value).__name__}"
    raise ContextError(msg, path=path, line=line, field="timestamp")



# ── plain messages ────────────────────────────────────────────────
def _check_message(
    obj: Mapping[str, Any], *, path: str | None, line: int | None
) -> tuple[str, str, str | None, int | None]:
    role = obj.get("role")
    if not isinstance(role, str) or role not in PLAIN_ROLES:
        msg = f"unknown role {role!r}; expected one of {', '.join(PLAIN_ROLES)}"
        raise ContextError(msg, path=path, line=line, field="role")
    content = obj.get("content")
    if not isinstance(content, str):
        got = "missing" if content is None else type(content).__name__
        msg = f"content must be a string, got {got}"
        raise ContextError(msg, path=path, line=line, field="content")
    key = obj.get("key")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise ContextError("key must be a non-empty string", path=path, line=line, field="key")
    if role == "memory" and key is None:
        raise ContextError("a memory message needs a key", path=path, line=line, field="key")
    if key is not None and role not in ("memory", "identity"):
        msg = f"key is only allowed on memory and identity messages, not on {role!r}"
        raise ContextError(msg, path=path, line=line, field="key")
    unknown = set(obj) - {"role", "content", "key", "timestamp"}
    if unknown:
        msg = f"unknown field(s) {sorted(unknown)}; allowed: role, content, key, timestamp"
        raise ContextError(msg, path=path, line=line, field=sorted(unknown)[0])
    ts = parse_timestamp(obj.get("timestamp"), path=path, line=line)
    return role, content, key, ts


def context_from_messages(
    messages: Iterable[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    path: str | None = None,
    lines: Sequence[int] | None = None,
    chat_template: str | PathLike | ChatTemplate | None = None,
    memory_placement: str | None = None,
    score_span: ScoreSpan = "turn",
) -> ContextState:
    """Build a context from plain messages, tokenized and rendered by a chat template.

    System, identity and journal messages go to their sections (in file order); memory,
    user, assistant and tool messages form the conversation.

    Parameters
    ----------
    chat_template
        A shipped template name (``chatml``, ``gemma``), ``tokenizer`` (the tokenizer's own),
        a Jinja file, or None: the kit's ChatML for a tokenizer with ChatML tokens, else the
        tokenizer's own template (see :func:`scoring_kit.context.chat_templates.resolve_template`).
    memory_placement
        Where memories go in a template: ``message:system`` (default; ``inline`` for
        Gemma), ``message:user``, ``message:tool`` or ``inline``.
    score_span
        ``turn`` (the whole assistant turn as rendered) or ``content`` (its content and the
        end-of-turn token).
    """
    if score_span not in SCORE_SPANS:
        msg = f"--score-span {score_span!r}: expected one of {', '.join(SCORE_SPANS)}"
        raise ConfigError(msg)
    plain: list[PlainMessage] = []
    for k, obj in enumerate(messages):
        line = lines[k] if lines is not None else k + 1
        role, content, key, ts = _check_message(obj, path=path, line=line)
        plain.append(PlainMessage(role, content, key, ts))
    tpl = resolve_template(chat_template, tokenizer, memory_placement)
    if tpl is not None:
        return render_template_context(
            plain, tokenizer, tpl, placement=memory_placement, score_span=score_span
        )
    sections: dict[str, list[Node]] = {s: [] for s in SECTIONS}
    for m in plain:
        node = render_message(tokenizer, m.role, m.content, key=m.key, timestamp_ns=m.timestamp_ns)
        sections[section_of(m.role)].append(node)
    return ContextState(
        **{s: tuple(v) for s, v in sections.items()},  # type: ignore[arg-type]
        tokenizer_name=tokenizer.name,
        score_span=score_span,
    )


