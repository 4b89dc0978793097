"""Render plain messages through a Jinja chat template (the model's own, or a named one).

The template is rendered by transformers' own machinery
(:func:`transformers.utils.chat_template_utils.render_jinja_template`, the function behind
``tokenizer.apply_chat_template``): the same sandboxed Jinja environment, ``raise_exception``
and special-token variables (``bos_token``, ``eos_token``, ...). Nothing here imports torch.

How a conversation becomes nodes
--------------------------------
1. Plain messages are mapped to chat messages (see the table in :mod:`.chatml` for the
   roles); memories are placed by the *memory placement*:
   ``message:system`` / ``message:user`` / ``message:tool`` (a message of that role whose
   content is ``[memory: KEY]\\n...``) or ``inline`` (a block ``[memory: KEY] ...\\n\\n`` at the
   start of the next user turn; the block's tokens are the memory's node).
2. The chat messages are rendered cumulatively: rendering messages ``0..j`` must extend the
   rendering of ``0..j-1`` (else the template re-renders earlier turns: an error), and message
   ``j``'s tokens are what it adds. Each piece is tokenized as markup / content / markup, so a
   node's tokens never merge with its neighbours'; the pieces' text adds up to the full
   rendering by construction and is checked.
3. Ablation must equal re-rendering the conversation without the memory. For every memory the
   kit compares the baseline with that memory's text cut out against a re-rendering without
   it. When all agree the context is *concatenative* (ablations cut tokens out; prefix reuse
   works); otherwise it is marked ``ablation="rerender"`` and every ablated prompt is built by
   re-rendering through the template (``render`` and the result metadata say so).

When the template rejects the conversation (many reject anything but alternating
user/assistant turns), the error quotes the template's own message and names the options.
Which template, and loading it, is :mod:`.chat_templates`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .._exceptions import ConfigError, ContextError
from .chat_templates import (
    MEMORY_PLACEMENTS,
    ChatTemplate,
    default_placement,
    render_raw,
    special_tokens,
)
from .model import SECTIONS, ContextState, Node, ScoreSpan, Section, WirePrompt
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .model import NodeSpan

__all__ = [
    "PlainMessage",
    "TemplateRendering",
    "render_template_context",
]


# ── plain messages → chat messages ───────────────────────────────
@dataclass(frozen=True, slots=True)
class PlainMessage:
    """One validated plain message (``role`` as in the plain JSONL format)."""

    role: str
    content: str
    key: str | None = None
    timestamp_ns: int | None = None

    @property
    def section(self) -> Section:
        from .chatml import section_of

        return section_of(self.role)

    @property
    def is_memory(self) -> bool:
        return self.role == "memory" or (self.role == "identity" and self.key is not None)


@dataclass(slots=True)
class _Chat:
    role: str
    content: str
    #: plain message index whose content this message carries (None: only memory blocks)
    owner: int | None
    #: extra plain messages folded into this one (merged system messages)
    folded: list[int] = field(default_factory=list)
    #: inline memory blocks at the start of the content: (plain index, block text)
    blocks: list[tuple[int, str]] = field(default_factory=list)
    #: the owner's own text inside ``content``
    own: str = ""


def _block(m: PlainMessage) -> str:
    return f"[memory: {m.key}] {m.content}\n\n"


def _chat_messages(plain: Sequence[PlainMessage], placement: str) -> list[_Chat]:
    out: list[_Chat] = []
    pending: list[tuple[int, str]] = []

    def flush() -> None:
        if pending:
            text = "".join(b for _, b in pending)
            out.append(_Chat("user", text, None, blocks=list(pending)))
            pending.clear()

    for i, m in enumerate(plain):
        if m.is_memory:
            body = f"[memory: {m.key}]\n{m.content}"
            if placement == "inline":
                pending.append((i, _block(m)))
            else:
                out.append(_Chat(placement.split(":", 1)[1], body, i, own=body))
            continue
        if m.role == "user":
            text = "".join(b for _, b in pending) + m.content
            out.append(_Chat("user", text, i, blocks=list(pending), own=m.content))
            pending.clear()
            continue
        if m.role in ("system", "identity"):  # inline blocks wait for the first user turn
            out.append(_Chat("system", m.content, i, own=m.content))
        elif m.role == "journal":
            body = f"[journal]\n{m.content}"
            out.append(_Chat("system", body, i, own=body))
        else:  # assistant, tool
            flush()
            out.append(_Chat(m.role, m.content, i, own=m.content))
    flush()
    return out


def _merge_leading_system(chats: list[_Chat]) -> list[_Chat] | None:
    n = 0
    while n < len(chats) and chats[n].role == "system" and not chats[n].blocks:
        n += 1
    if n < 2:
        return None
    head = chats[0]
    merged = _Chat("system", "\n\n".join(c.content for c in chats[:n]), head.owner,
                   folded=[c.owner for c in chats[1:n] if c.owner is not None], own="")
    merged.own = merged.content
    return [merged, *chats[n:]]


# ── rendering ───────────────────────────────────────────────────
class _Renderer:
    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer, placement: str) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.placement = placement
        self._kwargs = special_tokens(tokenizer)

    def text(self, chats: Sequence[_Chat]) -> str:
        msgs = [{"role": c.role, "content": c.content} for c in chats]
        return render_raw(self.template, msgs, self._kwargs)

    def error(self, e: Exception, plain: Sequence[PlainMessage]) -> ContextError:
        has_mem = any(m.is_memory for m in plain)
        fix = "--chat-template"
        if has_mem:
            fix = (f"--memory-placement (now {self.placement}; one of "
                   f"{', '.join(MEMORY_PLACEMENTS)}) or --chat-template")
        msg = (f"chat template {self.template.origin} rejected the conversation: "
               f"{e.__class__.__name__}: {e}; change {fix}")
        return ContextError(msg, field="chat_template")

    def chats(self, plain: Sequence[PlainMessage]) -> tuple[list[_Chat], str]:
        """The chat messages (leading system messages merged if the template needs it)."""
        import jinja2

        chats = _chat_messages(plain, self.placement)
        try:
            return chats, self.text(chats)
        except jinja2.TemplateError as e:
            merged = _merge_leading_system(chats)
            if merged is None:
                raise self.error(e, plain) from e
            try:
                return merged, self.text(merged)
            except jinja2.TemplateError:
                raise self.error(e, plain) from e
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise self.error(e, plain) from e


def _split(piece: str, content: str) -> tuple[str, str, str] | None:
    """``piece`` as (before, content as rendered, after), or None if the content is not in it."""
    for c in (content, content.strip()):
        if c:
            at = piece.find(c)
            if at >= 0:
                return piece[:at], c, piece[at + len(c):]
    return None


@dataclass(slots=True)
class _Out:
    node: Node
    section: Section
    #: plain message index this node came from; None for turn markup of inline blocks
    origin: int | None
    #: the rendered text behind the node's tokens
    text: str


def _build(
    r: _Renderer, plain: Sequence[PlainMessage]
) -> tuple[list[_Out], str, bool]:
    import jinja2

    chats, full = r.chats(plain)
    merged = any(c.folded for c in chats)
    tok = r.tokenizer
    outs: list[_Out] = []
    prev = ""
    for j in range(len(chats)):
        try:
            cur = full if j == len(chats) - 1 else r.text(chats[: j + 1])
        except jinja2.TemplateError as e:
            raise r.error(e, plain) from e
        if not cur.startswith(prev):
            msg = (f"chat template {r.template.origin} is not prefix-stable: rendering "
                   f"messages 0..{j} changes the rendering of messages 0..{j - 1} (it "
                   "re-renders earlier turns), so node spans cannot be found; use another "
                   "--chat-template")
            raise ContextError(msg, field="chat_template")
        piece = cur[len(prev):]
        prev = cur
        outs.extend(_nodes_of(chats[j], piece, plain, tok))
    if "".join(o.text for o in outs) != full:  # pragma: no cover - guarded by construction
        raise ContextError("chat template pieces do not add up to the full rendering")
    return outs, full, merged


def _plain_node(
    m: PlainMessage, i: int, ids: tuple[int, ...], text: str,
    content_ids: tuple[int, ...] | None, chat_role: str,
) -> _Out:
    if m.role == "assistant":
        child = Node("text", content_ids if content_ids is not None else ids, text=m.content)
        node = Node("assistant", ids, text=m.content, role=chat_role,
                    timestamp_ns=m.timestamp_ns, children=(child,))
    elif m.is_memory:
        node = Node("memory", ids, text=m.content, key=m.key, role=chat_role,
                    timestamp_ns=m.timestamp_ns)
    else:
        kind = "identity" if m.role == "identity" else m.role
        node = Node(kind, ids, text=m.content, role=chat_role,  # type: ignore[arg-type]
                    timestamp_ns=m.timestamp_ns)
    return _Out(node, m.section, i, text)


def _tokenize3(
    tok: Tokenizer, piece: str, own: str
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    parts = _split(piece, own) if own else None
    if parts is None:
        return tuple(tok.encode(piece)), None
    before, content, after = parts
    c = tok.encode(content)
    return (*tok.encode(before), *c, *tok.encode(after)), tuple(c)


def _nodes_of(
    chat: _Chat, piece: str, plain: Sequence[PlainMessage], tok: Tokenizer
) -> list[_Out]:
    if not chat.blocks:
        assert chat.owner is not None
        ids, cids = _tokenize3(tok, piece, chat.own)
        outs = [_plain_node(plain[chat.owner], chat.owner, ids, piece, cids, chat.role)]
        outs += [_plain_node(plain[f], f, (), "", None, chat.role) for f in chat.folded]
        return outs
    # inline memory blocks: turn opener | block | block | ... | rest of the turn
    outs = []
    pos = 0
    first = True
    for idx, block in chat.blocks:
        at = piece.find(block, pos)
        if at < 0:
            at = piece.find(block.rstrip(), pos)
            block = block.rstrip()
        if at < 0 or plain[idx].section != "conversation":
            # not separable here (the template changed the block, or it belongs to an
            # earlier section): its text stays in the turn and ablation re-renders
            outs.append(_plain_node(plain[idx], idx, (), "", None, chat.role))
            continue
        if first and at > pos:
            opener = piece[pos:at]
            outs.append(_Out(Node("text", tuple(tok.encode(opener)), role=chat.role),
                             "conversation", None, opener))
        elif at > pos:  # text between blocks: keep it with the previous block
            outs[-1].node = _with_ids(outs[-1].node, outs[-1].node.token_ids
                                      + tuple(tok.encode(piece[pos:at])))
            outs[-1].text += piece[pos:at]
        first = False
        outs.append(_plain_node(plain[idx], idx, tuple(tok.encode(block)), block, None,
                                chat.role))
        pos = at + len(block)
    rest = piece[pos:]
    if chat.owner is not None:
        ids, cids = _tokenize3(tok, rest, chat.own)
        outs.append(_plain_node(plain[chat.owner], chat.owner, ids, rest, cids, chat.role))
    elif rest:
        outs.append(_Out(Node("text", tuple(tok.encode(rest)), role=chat.role),
                         "conversation", None, rest))
    # nodes that could not be separated come after the turn's separable ones (no tokens)
    return outs


def _with_ids(node: Node, ids: tuple[int, ...]) -> Node:
    from dataclasses import replace

    return replace(node, token_ids=ids)


def _order(outs: list[_Out]) -> list[_Out]:
    """Outputs in wire order (sections in order, render order within each section)."""
    by: dict[Section, list[_Out]] = {s: [] for s in SECTIONS}
    for o in outs:
        by[o.section].append(o)
    return [o for s in SECTIONS for o in by[s]]


# ── the context ─────────────────────────────────────────────────
@dataclass(frozen=True, slots=True)
class TemplateRendering:
    """How a context was rendered: attached to :class:`ContextState` as ``template``.

    ``ablation`` is ``"cut"`` when leaving a memory's tokens out equals re-rendering without
    it (checked for every memory), else ``"rerender"``: ablated prompts are then rebuilt
    through the template by :meth:`rerender`.
    """

    name: str
    origin: str
    placement: str
    ablation: Literal["cut", "rerender"]
    system_merged: bool
    renderer: _Renderer = field(repr=False, compare=False)
    #: per (section, index) of the context: the plain message it came from (None: markup)
    origins: tuple[tuple[Section, int, int | None], ...] = field(repr=False, compare=False)
    plain: tuple[PlainMessage, ...] = field(repr=False, compare=False)

    def info(self) -> dict[str, object]:
        """What ``render`` and result metadata show."""
        return {"name": self.name, "origin": self.origin, "memory_placement": self.placement,
                "ablation": self.ablation, "system_merged": self.system_merged}

    def rerender(
        self, ctx: ContextState, entries: range, skip: Callable[[Node], bool]
    ) -> WirePrompt:
        """The prompt for ``ctx``'s kept nodes, re-rendered through the template."""
        from .model import NodeSpan

        where = {(s, i): o for s, i, o in self.origins}
        keep: list[int] = []
        dropped: set[int] = set()
        for sec, i, node in ctx.iter_nodes():
            if sec == "conversation" and i not in entries:
                o = where.get((sec, i))
                if o is not None:
                    dropped.add(o)
                continue
            o = where.get((sec, i))
            if o is None:
                continue
            (dropped.add if skip(node) else keep.append)(o)  # type: ignore[func-returns-value]
        keep = [k for k in keep if k not in dropped]
        sub = [self.plain[k] for k in keep]
        outs, _, _ = _build(self.renderer, sub)
        outs = _order(outs)
        sub_ctx = _context(outs, ctx.tokenizer_name, ctx.score_span)
        wp = sub_ctx.wire_prompt()
        back: dict[int, tuple[Section, int]] = {o: (s, i) for s, i, o in self.origins
                                               if o is not None}
        new_origin: dict[tuple[Section, int], int | None] = {}
        counts: dict[Section, int] = {s: 0 for s in SECTIONS}
        for out in outs:
            new_origin[(out.section, counts[out.section])] = (
                None if out.origin is None else keep[out.origin])
            counts[out.section] += 1
        spans: list[NodeSpan] = []
        for sp in wp.spans:
            src = new_origin.get((sp.section, sp.index))
            if src is not None:
                s, i = back[src]
                spans.append(NodeSpan(s, i, sp.start, sp.end))
        entries_out = []
        for e in wp.entries:
            src = new_origin[("conversation", e)]
            assert src is not None
            entries_out.append(back[src][1])
        return WirePrompt(wp.tokens, wp.images, wp.ranges, tuple(entries_out), tuple(spans))


def _context(
    outs: list[_Out], tokenizer_name: str | None, score_span: ScoreSpan
) -> ContextState:
    by: dict[Section, list[Node]] = {s: [] for s in SECTIONS}
    for o in outs:
        by[o.section].append(o.node)
    return ContextState(**{s: tuple(v) for s, v in by.items()},  # type: ignore[arg-type]
                        tokenizer_name=tokenizer_name, score_span=score_span)


def render_template_context(
    messages: Sequence[PlainMessage],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    placement: str | None = None,
    score_span: ScoreSpan = "turn",
) -> ContextState:
    """A context whose node token ids come from ``template``'s own rendering.

    Raises
    ------
    ConfigError
        Unknown memory placement.
    ContextError
        The template rejects the conversation (its message quoted), or is not prefix-stable.
    """
    place = placement or default_placement(template)
    if place not in MEMORY_PLACEMENTS:
        msg = f"--memory-placement {place!r}: expected one of {', '.join(MEMORY_PLACEMENTS)}"
        raise ConfigError(msg)
    r = _Renderer(template, tokenizer, place)
    ordered = sorted(range(len(messages)), key=lambda k: SECTIONS.index(messages[k].section))
    plain = tuple(messages[k] for k in ordered)
    outs, _full, merged = _build(r, plain)
    outs = _order(outs)
    ablation: Literal["cut", "rerender"] = "cut"
    keys = dict.fromkeys(m.key for m in plain if m.is_memory and m.key)
    for k in keys:
        cut = "".join(o.text for o in outs
                      if o.origin is None or not (plain[o.origin].is_memory
                                                  and plain[o.origin].key == k))
        without = [m for m in plain if not (m.is_memory and m.key == k)]
        _c, again = r.chats(without)
        if cut != again:
            ablation = "rerender"
            break
    origins: list[tuple[Section, int, int | None]] = []
    counts: dict[Section, int] = {s: 0 for s in SECTIONS}
    for o in outs:
        origins.append((o.section, counts[o.section], o.origin))
        counts[o.section] += 1
    info = TemplateRendering(template.name, template.origin, place, ablation, merged, r,
                             tuple(origins), plain)
    ctx = _context(outs, tokenizer.name, score_span)
    return ctx.replace(template=info)
