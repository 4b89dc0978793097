"""Load and save contexts: tokenized context JSONL and plain messages JSONL.

Two formats, detected from the first non-empty line:

**Plain messages** (what a user brings)::

    {"role": "memory", "content": "Caroline moved from Sweden 4 years ago.", "key": "D1:3"}
    {"role": "user", "content": "Where did she move from?", "timestamp": "2023-05-08T13:56:00Z"}
    {"role": "assistant", "content": "From Sweden.", "timestamp": 1683554160000000000}

``role`` is one of system, identity, journal, user, assistant, tool, memory; ``key`` is
required for memory and allowed on identity (an identity memory); ``timestamp`` is optional,
ISO 8601 or integer ns. The file is tokenized with the model's tokenizer and rendered as
ChatML (see :mod:`scoring_kit.context.chatml`).

**Tokenized context** (what the kit saves; exact token ids)::

    {"format": "scoring_kit.context", "version": 1, "tokenizer": "SmolLM2-135M-Instruct"}
    {"section": "system", "kind": "system", "role": "system", "text": "...", "token_ids": [...]}
    {"section": "conversation", "kind": "memory", "key": "D1:3", "role": "system",
     "text": "...", "token_ids": [...]}
    {"section": "conversation", "kind": "assistant", "token_ids": [...],
     "timestamp_ns": 1683554160000000000, "memory_scores": {"D1:3": 0.8},
     "children": [{"kind": "text", "text": "...", "token_ids": [...]}]}

(shown wrapped here; in the file each object is on one line)

The header line is optional. Every bad line raises :class:`ContextError` naming the file,
line and field.

OpenAI-style transcripts and Letta agent files are read too (:mod:`.formats`, detected from
the first bytes; ``reading=`` says which messages are memories).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .._exceptions import ContextError
from .._files import atomic_write_bytes
from .._types import PathLike
from ..wire import WireImage
from .chat_templates import ChatTemplate
from .messages import _check_message, context_from_messages, parse_timestamp
from .model import KINDS, SECTIONS, ContextState, Node, ScoreSpan
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .formats import AgentReading

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "context_from_messages",
    "detect_format",
    "dump_context",
    "load_context",
    "load_messages",
    "parse_timestamp",
    "save_context",
    "sniff_format",
]

FORMAT_NAME = "scoring_kit.context"
FORMAT_VERSION = 1
Format = Literal["plain", "tokenized"]


def _read_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ContextError("no such file", path=str(path)) from None
    except OSError as exc:
        raise ContextError(f"cannot read: {exc}", path=str(path)) from exc
    out: list[tuple[int, dict[str, Any]]] = []
    for no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ContextError(f"bad JSON: {exc}", path=str(path), line=no) from None
        if not isinstance(obj, dict):
            msg = f"each line must be a JSON object, got {type(obj).__name__}"
            raise ContextError(msg, path=str(path), line=no)
        out.append((no, obj))
    if not out:
        raise ContextError("the file holds no messages", path=str(path))
    return out


def detect_format(first: Mapping[str, Any], *, path: str | None = None, line: int = 1) -> Format:
    """Which format a file is in, from its first object."""
    if first.get("format") == FORMAT_NAME or "token_ids" in first or "section" in first:
        return "tokenized"
    if "role" in first:
        return "plain"
    msg = (
        "cannot tell the format: expected a plain message ({'role', 'content', ...}) or a "
        "tokenized node ({'section', 'kind', 'token_ids', ...}) / header "
        f"({{'format': '{FORMAT_NAME}'}}); got keys {sorted(first)}"
    )
    raise ContextError(msg, path=path, line=line)


def sniff_format(path: PathLike) -> Format | None:
    """The format of ``path`` from its first non-empty line, or None when that cannot be told
    (missing or unreadable file, bad JSON, unknown shape): :func:`load_context` then names
    the problem, and no tokenizer needs loading first. OpenAI-style transcripts and Letta
    agent files (:mod:`.formats`) are tokenized like plain messages: "plain" too."""
    from .formats import agent_format

    if agent_format(path) is not None:
        return "plain"
    try:
        with open(path, "rb") as fh:
            first = next((ln for ln in fh if ln.strip()), b"{}")
        obj = orjson.loads(first)
        return detect_format(obj) if isinstance(obj, dict) else None
    except (OSError, orjson.JSONDecodeError, ContextError):
        return None


def load_messages(path: PathLike) -> list[dict[str, Any]]:
    """Read a plain messages JSONL file (validated, not tokenized)."""
    p = Path(path)
    rows = _read_lines(p)
    for no, obj in rows:
        _check_message(obj, path=str(p), line=no)
    return [obj for _, obj in rows]


# ── tokenized nodes ──────────────────────────────────────────────
def _ids(value: object, *, path: str, line: int, fld: str, vocab: int | None) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ContextError("must be a list of token ids", path=path, line=line, field=fld)
    for j, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool):
            msg = f"token_ids[{j}] is {t!r}, not an integer"
            raise ContextError(msg, path=path, line=line, field=fld)
        if t < 0 or (vocab is not None and t >= vocab):
            msg = f"token_ids[{j}] = {t} is outside the vocabulary [0, {vocab})"
            raise ContextError(msg, path=path, line=line, field=fld)
    return tuple(value)


def _node(
    obj: Mapping[str, Any], *, path: str, line: int, vocab: int | None, child: bool = False
) -> Node:
    kind = obj.get("kind")
    if kind not in KINDS:
        msg = f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
        raise ContextError(msg, path=path, line=line, field="kind")
    if "token_ids" not in obj:
        raise ContextError("missing token_ids", path=path, line=line, field="token_ids")
    ids = _ids(obj["token_ids"], path=path, line=line, fld="token_ids", vocab=vocab)
    key = obj.get("key")
    if kind == "memory" and (not isinstance(key, str) or not key):
        raise ContextError("a memory node needs a key", path=path, line=line, field="key")
    text = obj.get("text", "")
    if not isinstance(text, str):
        raise ContextError("text must be a string", path=path, line=line, field="text")
    children: list[Node] = []
    raw_children = obj.get("children", [])
    if raw_children and (child or kind != "assistant"):
        msg = "only assistant nodes have children"
        raise ContextError(msg, path=path, line=line, field="children")
    if not isinstance(raw_children, list):
        raise ContextError("children must be a list", path=path, line=line, field="children")
    for j, c in enumerate(raw_children):
        if not isinstance(c, dict):
            raise ContextError("must be an object", path=path, line=line, field=f"children[{j}]")
        children.append(_node(c, path=path, line=line, vocab=vocab, child=True))
    scores = obj.get("memory_scores", {}) or {}
    if not isinstance(scores, dict) or not all(
        isinstance(v, int | float) for v in scores.values()
    ):
        msg = "memory_scores must map keys to numbers"
        raise ContextError(msg, path=path, line=line, field="memory_scores")
    images = tuple(
        WireImage(str(im.get("mime", "")), bytes.fromhex(str(im.get("hex", ""))))
        for im in obj.get("images", []) or []
    )
    return Node(
        kind,
        ids,
        text=text,
        key=key if isinstance(key, str) else None,
        role=obj.get("role"),
        timestamp_ns=parse_timestamp(obj.get("timestamp_ns"), path=path, line=line),
        children=tuple(children),
        images=images,
        memory_scores={str(k): float(v) for k, v in scores.items()},
    )


def _context_from_nodes(
    rows: list[tuple[int, dict[str, Any]]], *, path: str, vocab: int | None
) -> ContextState:
    sections: dict[str, list[Node]] = {s: [] for s in SECTIONS}
    tok_name: str | None = None
    for no, obj in rows:
        if obj.get("format") == FORMAT_NAME:
            if no != rows[0][0]:
                raise ContextError("the header must be the first line", path=path, line=no)
            version = obj.get("version")
            if version != FORMAT_VERSION:
                msg = f"unsupported version {version!r}; this kit reads version {FORMAT_VERSION}"
                raise ContextError(msg, path=path, line=no, field="version")
            tok_name = obj.get("tokenizer")
            continue
        sec = obj.get("section")
        if sec not in SECTIONS:
            msg = f"unknown section {sec!r}; expected one of {', '.join(SECTIONS)}"
            raise ContextError(msg, path=path, line=no, field="section")
        node = _node(obj, path=path, line=no, vocab=vocab)
        if node.is_branch and sec != "conversation":
            msg = f"assistant nodes belong to the conversation section, not {sec!r}"
            raise ContextError(msg, path=path, line=no, field="section")
        sections[sec].append(node)
    return ContextState(
        **{s: tuple(v) for s, v in sections.items()},  # type: ignore[arg-type]
        tokenizer_name=tok_name,
    )


def load_context(
    path: PathLike,
    tokenizer: Tokenizer | None = None,
    *,
    reading: AgentReading | None = None,
    chat_template: str | PathLike | ChatTemplate | None = None,
    memory_placement: str | None = None,
    score_span: ScoreSpan = "turn",
) -> ContextState:
    """Load a conversation in either format (detected from the first line).

    Parameters
    ----------
    path
        A plain messages JSONL or a tokenized context JSONL file.
    tokenizer
        Tokenizes plain messages (required for them), and checks the ids of a tokenized
        file against its vocabulary (optional there). The session and the CLI load the
        model's tokenizer and pass it in; this layer never loads a model.
    reading
        For OpenAI-style transcripts and Letta agent files (:mod:`.formats`, detected from
        the first bytes): which messages are memories and responses.
    chat_template, memory_placement, score_span
        How plain messages are rendered (see :func:`context_from_messages`); a tokenized
        file keeps its token ids and takes only ``score_span``.

    Raises
    ------
    ContextError
        A bad line (file, line and field named), or a plain-message file with no
        ``tokenizer``.
    """
    p = Path(path)
    from .formats import load_agent  # OpenAI-style / Letta formats (issue 18)

    if (agent_ctx := load_agent(p, tokenizer, reading)) is not None:
        return agent_ctx
    rows = _read_lines(p)
    fmt = detect_format(rows[0][1], path=str(p), line=rows[0][0])
    if fmt == "tokenized":
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        ctx = _context_from_nodes(rows, path=str(p), vocab=vocab)
        return ctx if score_span == "turn" else ctx.replace(score_span=score_span)
    if tokenizer is None:
        msg = (
            "plain messages need a tokenizer: pass tokenizer= (e.g. "
            "scoring_kit.engine.loader.load_tokenizer()), or load the file with a session "
            "(sess.load(path)); tokenized context files need none"
        )
        raise ContextError(msg, path=str(p))
    return context_from_messages(
        [o for _, o in rows], tokenizer, path=str(p), lines=[n for n, _ in rows],
        chat_template=chat_template, memory_placement=memory_placement, score_span=score_span,
    )


def _node_obj(node: Node, section: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if section is not None:
        out["section"] = section
    out["kind"] = node.kind
    if node.role is not None:
        out["role"] = node.role
    if node.key is not None:
        out["key"] = node.key
    out["text"] = node.text
    out["token_ids"] = list(node.token_ids)
    if node.timestamp_ns is not None:
        out["timestamp_ns"] = node.timestamp_ns
    if node.children:
        out["children"] = [_node_obj(c, None) for c in node.children]
    if node.memory_scores:
        out["memory_scores"] = dict(node.memory_scores)
    if node.images:
        out["images"] = [{"mime": im.mime, "hex": im.data.hex()} for im in node.images]
    return out


def dump_context(ctx: ContextState) -> bytes:
    """The tokenized JSONL bytes of ``ctx`` (header line first)."""
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    if ctx.tokenizer_name:
        header["tokenizer"] = ctx.tokenizer_name
    lines = [orjson.dumps(header)]
    for sec, _, node in ctx.iter_nodes():
        lines.append(orjson.dumps(_node_obj(node, sec)))
    return b"\n".join(lines) + b"\n"


def save_context(ctx: ContextState, path: PathLike) -> Path:
    """Write ``ctx`` as tokenized context JSONL, atomically."""
    p = Path(path)
    atomic_write_bytes(p, dump_context(ctx))
    return p
