"""The agent context: sections of nodes, each carrying its own token ids.

This ports the reference's ``ContextState`` / ``AstNode``. A context has four sections in
wire order: ``system``, ``identity``, ``journal`` and ``conversation``. Each section is a
tuple of :class:`Node`. Leaves are memories (with a ``key``), user text, tool output and
plain section text; assistant messages are *branches* whose ``children`` are the visible
parts of the reply, with a timestamp (ns) and per-memory scores.

Every node carries the token ids it contributes to the prompt, already rendered as ChatML
(``<|im_start|>role\\n ... <|im_end|>\\n``), so building a prompt is concatenation and removing
a node removes exactly its tokens. Records are frozen; edits return a new context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, Protocol, get_args

import numpy as np

from .._exceptions import ContextError, PromptError
from .._types import IntArray, Span
from ..wire import ScoreRequest, WireImage

__all__ = [
    "KINDS",
    "SCORE_SPANS",
    "SECTIONS",
    "ContextState",
    "Node",
    "NodeKind",
    "NodeSpan",
    "ScoreSpan",
    "Section",
    "WirePrompt",
    "is_assistant",
    "is_memory_node",
    "memory_key",
    "render_branch_text",
    "render_prior_context",
    "skip_key",
    "visible_text",
]

Section = Literal["system", "identity", "journal", "conversation"]
SECTIONS: tuple[Section, ...] = get_args(Section)

#: Node kinds. ``assistant`` is the only branch kind; ``text`` is a part of an assistant
#: branch (or plain section text); ``tool_call`` is an invisible part of a branch.
NodeKind = Literal[
    "system", "identity", "journal", "memory", "user", "tool", "assistant", "text", "tool_call"
]
KINDS: tuple[str, ...] = get_args(NodeKind)


@dataclass(frozen=True, slots=True)
class Node:
    """One entry of a context section (a leaf), or an assistant message (a branch).

    Parameters
    ----------
    kind
        One of :data:`KINDS`.
    token_ids
        The ids this node contributes to the prompt, markers included.
    text
        Human-readable content (for memories: the note; for branches: see
        :func:`render_branch_text`).
    key
        Memory key (memories only; identity memories have one too).
    role
        The ChatML role it is rendered as.
    timestamp_ns
        Creation time in ns since the epoch, if known.
    children
        Parts of an assistant branch (``text`` / ``tool_call`` leaves).
    images
        Images attached to this node (sent as data URIs).
    memory_scores
        Per-memory divergence on this response (assistant branches; written by the full
        matrix flow, cells above 0.01).
    """

    kind: NodeKind
    token_ids: tuple[int, ...]
    text: str = ""
    key: str | None = None
    role: str | None = None
    timestamp_ns: int | None = None
    children: tuple[Node, ...] = ()
    images: tuple[WireImage, ...] = ()
    memory_scores: Mapping[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            msg = f"unknown node kind {self.kind!r}; expected one of {', '.join(KINDS)}"
            raise ContextError(msg, field="kind")
        if self.kind == "memory" and not self.key:
            raise ContextError("a memory node needs a non-empty key", field="key")

    @property
    def tokens(self) -> int:
        """Number of tokens (the seed's ``node.tokens()``)."""
        return len(self.token_ids)

    @property
    def is_branch(self) -> bool:
        return self.kind == "assistant"


def memory_key(node: Node) -> str | None:
    """The memory key of ``node``, or None when it is not a memory."""
    return node.key if node.kind == "memory" else None


def skip_key(key: str) -> Callable[[Node], bool]:
    """A ``skip`` predicate for :meth:`ContextState.wire_prompt` that drops memory ``key``."""

    def skip(node: Node) -> bool:
        return memory_key(node) == key

    return skip


def is_memory_node(node: Node) -> bool:
    return node.kind == "memory"


def is_assistant(node: Node) -> bool:
    return node.kind == "assistant"


def render_branch_text(children: Sequence[Node]) -> str:
    """The visible text of an assistant branch: its ``text`` children, joined."""
    return "".join(c.text for c in children if c.kind == "text")


def visible_text(node: Node) -> str:
    """What a reader sees of ``node``: an assistant branch's text parts, else its text."""
    return render_branch_text(node.children) if node.is_branch else node.text


def render_prior_context(entries: Sequence[Node], entry_idx: int, exchanges: int = 2) -> str:
    """The last ``exchanges`` user/assistant exchanges before ``entry_idx``, with roles.

    Rendered as ``user: ...`` / ``assistant: ...`` blocks separated by blank lines, oldest
    first (what a reviewer needs to judge a finetune candidate).
    """
    picked: list[str] = []
    want = 2 * exchanges
    for i in range(min(entry_idx, len(entries)) - 1, -1, -1):
        n = entries[i]
        if n.kind in ("user", "assistant"):
            picked.append(f"{n.kind}: {visible_text(n).strip()}")
            if len(picked) >= want:
                break
    return "\n\n".join(reversed(picked))


@dataclass(frozen=True, slots=True)
class NodeSpan:
    """Where one node landed in a wire prompt."""

    section: Section
    index: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class WirePrompt:
    """A prompt as sent over the wire, with what each span of it came from.

    ``ranges[k]`` is the half-open token span of the k-th assistant branch kept in the
    prompt, and ``entries[k]`` is that branch's conversation index.
    """

    tokens: IntArray
    images: tuple[WireImage, ...]
    ranges: tuple[Span, ...]
    entries: tuple[int, ...]
    spans: tuple[NodeSpan, ...]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def request(self, *, priority: int | None = 5) -> ScoreRequest:
        """The :class:`ScoreRequest` for this prompt."""
        return ScoreRequest(
            tuple(self.tokens.tolist()), self.ranges, self.images, priority
        )

    def body(self, model: str = "default") -> dict[str, object]:
        """The exact ``/score`` body the kit sends for this prompt."""
        return self.request().body(model)


SkipFn = Callable[[Node], bool]

#: What is scored for a response: the whole assistant turn as rendered (markers included),
#: or its content plus the one token after it (the end-of-turn token).
ScoreSpan = Literal["turn", "content"]
SCORE_SPANS: tuple[str, ...] = get_args(ScoreSpan)


class Rerenderer(Protocol):
    """How a context was rendered through a chat template (see ``context.templates``)."""

    ablation: str

    def info(self) -> dict[str, object]: ...

    def rerender(self, ctx: ContextState, entries: range, skip: SkipFn) -> WirePrompt: ...


def _content_span(node: Node) -> tuple[int, int]:
    """Offsets in ``node.token_ids`` of its text content plus the token after it."""
    ids = node.token_ids
    body = tuple(t for c in node.children if c.kind == "text" for t in c.token_ids)
    n = len(body)
    if n == 0 or n > len(ids):
        return 0, len(ids)
    for off in range(len(ids) - n, -1, -1):
        if ids[off:off + n] == body:
            return off, min(off + n + 1, len(ids))
    return 0, len(ids)


def _never(_: Node) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class ContextState:
    """An agent context: ``system``, ``identity``, ``journal`` and ``conversation`` sections."""

    system: tuple[Node, ...] = ()
    identity: tuple[Node, ...] = ()
    journal: tuple[Node, ...] = ()
    conversation: tuple[Node, ...] = ()
    #: name of the tokenizer the token ids belong to, when known
    tokenizer_name: str | None = None
    #: what is scored for each response (``turn``: the whole rendered message)
    score_span: ScoreSpan = "turn"
    #: the chat template rendering (None: the kit's own ChatML, or a tokenized file)
    template: Rerenderer | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for sec in ("system", "identity", "journal"):
            for i, n in enumerate(getattr(self, sec)):
                if n.is_branch:
                    msg = f"{sec}[{i}] is an assistant branch; only the conversation holds them"
                    raise ContextError(msg, field="section")

    # ── sections ───────────────────────────────────────────────
    def section(self, name: Section) -> tuple[Node, ...]:
        if name not in SECTIONS:
            msg = f"unknown section {name!r}; expected one of {', '.join(SECTIONS)}"
            raise ContextError(msg, field="section")
        return getattr(self, name)  # type: ignore[no-any-return]

    def iter_nodes(self) -> Iterator[tuple[Section, int, Node]]:
        for sec in SECTIONS:
            for i, n in enumerate(getattr(self, sec)):
                yield sec, i, n

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the conversation (system + identity + journal)."""
        return sum(n.tokens for s in ("system", "identity", "journal") for n in getattr(self, s))

    @property
    def total_tokens(self) -> int:
        return self.prefix_tokens + sum(n.tokens for n in self.conversation)

    # ── queries the flows need ─────────────────────────────────
    def memory_keys(self) -> list[str]:
        """Memory keys of identity and conversation, deduplicated, first-seen order."""
        seen: dict[str, None] = {}
        for n in (*self.identity, *self.conversation):
            k = memory_key(n)
            if k is not None:
                seen.setdefault(k, None)
        return list(seen)

    def response_indices(self) -> list[int]:
        """Conversation indices of the assistant branches."""
        return [i for i, n in enumerate(self.conversation) if n.is_branch]

    def find_memory(self, key: str) -> tuple[Section, int] | None:
        """First (section, index) of memory ``key`` in identity or conversation."""
        for sec in ("identity", "conversation"):
            for i, n in enumerate(getattr(self, sec)):
                if memory_key(n) == key:
                    return sec, i  # type: ignore[return-value]
        return None

    def memory_text(self, key: str) -> str:
        """The text of memory ``key`` (first occurrence), or '' if absent."""
        loc = self.find_memory(key)
        return "" if loc is None else self.section(loc[0])[loc[1]].text

    # ── the wire prompt ────────────────────────────────────────
    def wire_prompt(
        self, entries: range | slice | None = None, skip: SkipFn | None = None
    ) -> WirePrompt:
        """Token ids, images and score ranges for a scoring call.

        Includes system, identity and journal, then the conversation entries in
        ``entries`` (default: all), leaving out every node for which ``skip(node)`` is
        true (in any section: identity memories can be ablated too). One half-open range is
        produced per kept assistant branch, covering its whole rendered message (or, with
        ``score_span="content"``, its content and end-of-turn token). A context rendered by a
        non-concatenative chat template re-renders instead of cutting tokens out.

        Parameters
        ----------
        entries
            Conversation entries to include (a ``range`` or ``slice``; default all).
        skip
            Predicate selecting nodes to leave out (e.g. ``lambda n: memory_key(n) == k``).
        """
        skip_fn = skip or _never
        n_conv = len(self.conversation)
        if entries is None:
            idx: range = range(n_conv)
        elif isinstance(entries, slice):
            idx = range(*entries.indices(n_conv))
        else:
            idx = entries
            if idx.step != 1 or idx.start < 0 or idx.stop > n_conv or idx.start > idx.stop:
                msg = (
                    f"conversation range {idx.start}..{idx.stop} is out of bounds for a "
                    f"conversation of {n_conv} entries"
                )
                raise PromptError(msg)
        if self.template is not None and self.template.ablation == "rerender" and (
            skip is not None or len(idx) != n_conv
        ):
            return self.template.rerender(self, idx, skip_fn)
        content = self.score_span == "content"
        parts: list[tuple[int, ...]] = []
        images: list[WireImage] = []
        ranges: list[Span] = []
        owners: list[int] = []
        spans: list[NodeSpan] = []
        pos = 0

        def add(sec: Section, i: int, node: Node) -> None:
            nonlocal pos
            if skip_fn(node):
                return
            start = pos
            parts.append(node.token_ids)
            pos += len(node.token_ids)
            images.extend(node.images)
            for c in node.children:
                images.extend(c.images)
            spans.append(NodeSpan(sec, i, start, pos))
            if sec == "conversation" and node.is_branch and pos > start:
                if start == 0:
                    msg = (
                        f"conversation[{i}] is an assistant message at prompt position 0: "
                        "position 0 has no prediction, so it cannot be scored"
                    )
                    raise PromptError(msg)
                if content:
                    a, b = _content_span(node)
                    ranges.append((start + a, start + b))
                else:
                    ranges.append((start, pos))
                owners.append(i)

        for sec in ("system", "identity", "journal"):
            for i, node in enumerate(getattr(self, sec)):
                add(sec, i, node)  # type: ignore[arg-type]
        for i in idx:
            add("conversation", i, self.conversation[i])
        tokens = (
            np.fromiter((t for p in parts for t in p), dtype=np.int64, count=pos)
            if pos
            else np.zeros(0, dtype=np.int64)
        )
        return WirePrompt(tokens, tuple(images), tuple(ranges), tuple(owners), tuple(spans))

    # ── edits (copies) ─────────────────────────────────────────
    def replace(self, **changes: object) -> ContextState:
        """A copy with the given sections replaced."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def truncated(self, n_entries: int) -> ContextState:
        """A copy keeping only the first ``n_entries`` conversation entries."""
        return replace(self, conversation=self.conversation[:n_entries])

    def with_memory_scores(self, scores: Mapping[int, Mapping[str, float]]) -> ContextState:
        """A copy whose assistant branches carry ``scores[entry_index]`` as memory scores."""
        conv = list(self.conversation)
        for i, sc in scores.items():
            if not 0 <= i < len(conv) or not conv[i].is_branch:
                msg = f"conversation[{i}] is not an assistant message; cannot attach scores"
                raise ContextError(msg, field="memory_scores")
            conv[i] = replace(conv[i], memory_scores=MappingProxyType(dict(sc)))
        return replace(self, conversation=tuple(conv))

    def summary(self) -> dict[str, int]:
        return {
            "system": len(self.system),
            "identity": len(self.identity),
            "journal": len(self.journal),
            "conversation": len(self.conversation),
            "memories": len(self.memory_keys()),
            "responses": len(self.response_indices()),
            "tokens": self.total_tokens,
        }
