"""Exports: charts (html/png/svg/json), finetune candidates (JSONL + chat JSONL), matrices.

Every file is written atomically (temp file + fsync + rename, see
:func:`scoring_kit._files.atomic_write_bytes`): a reader sees the old file or the new one,
never half of one. Problems raise :class:`~scoring_kit.ExportError` naming the file (and,
on re-import, the line and field).

Charts
------
:func:`save_chart` picks the format from the suffix: ``.html`` (self-contained: the Vega,
Vega-Lite and vega-embed JavaScript is inlined, nothing is fetched from a CDN, so it opens
offline), ``.png`` and ``.svg`` (rendered by vl-convert, no browser needed) and ``.json``
(the Vega-Lite spec).

Candidates JSONL (``scoring_kit.candidate/1``)
----------------------------------------------
:func:`export_candidates` writes one JSON object per line, one per
:class:`~scoring_kit.scoring.FinetuneCandidate`, keys in this order::

    {"schema": "scoring_kit.candidate/1",
     "entry_idx": 12,                  # conversation index of the response (int >= 0)
     "divergence": 0.0137,             # log-prob drop with every memory removed (finite)
     "timestamp_ns": 1718000000000000000,  # trained-set key (int)
     "response_text": "…",             # the response (what is trained on)
     "prior_context": "user: …\\n\\nassistant: …",  # last exchanges, see below
     "alternate_text": null,           # str | null: the reply without memories
     "alternate_error": null,          # str | null: why the alternate failed
     "context_ids": [1, 2, …],         # token ids before the response (memories included)
     "continuation_ids": [5, 6, …]}    # token ids of the response

Every key is required and no other key is allowed; :func:`read_candidates` checks each
line and rebuilds equal :class:`FinetuneCandidate` objects.

Chat JSONL (TRL / OpenAI "messages" format)
-------------------------------------------
Next to it (default ``<stem>.chat.jsonl``), line *n* holds candidate *n* as a
conversation, the format TRL's ``SFTTrainer`` (conversational dataset) and OpenAI chat
fine-tuning accept::

    {"messages": [{"role": "system", "content": "…"},       # only with system_prompt
                  {"role": "user", "content": "…"},
                  {"role": "assistant", "content": "…"},
                  …,
                  {"role": "assistant", "content": "<response_text>"}]}

Rules (checked by :func:`validate_chat_record`): the only top-level key is ``messages``;
each message has exactly ``role`` and ``content``; roles are ``system``, ``user`` or
``assistant``; a ``system`` message may only come first; contents are non-empty strings;
the last message is the ``assistant`` response being trained. The earlier turns come from
``prior_context`` (``user: …`` / ``assistant: …`` blocks separated by blank lines, as
:func:`~scoring_kit.context.model.render_prior_context` writes them): empty turns are
dropped, consecutive turns of one role are merged with a blank line, turns before the
first ``user`` turn are dropped so the conversation opens with the user, and an assistant
turn right before the response is dropped so roles alternate (strict chat templates
require it). Note that OpenAI trains on every assistant message of a record by default,
the earlier ones included; TRL trains on the whole sequence unless told otherwise.

Matrices
--------
:meth:`MemoryMatrix.save <scoring_kit.scoring.MemoryMatrix.save>` is the one matrix writer
(:func:`export_matrix` calls it): ``.parquet`` and ``.npz`` are lossless
(:meth:`MemoryMatrix.load` rebuilds the matrix), ``.csv`` holds the long frame
(:data:`~scoring_kit.scoring.MATRIX_FILE_COLUMNS`; failed cells: empty
``without``/``delta``/``divergence`` and the reason in ``error``).
:func:`read_matrix_frame` reads any of them into the same frame, with null (not NaN) for
failed cells.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .._exceptions import ExportError, StoreError
from .._files import atomic_write_bytes
from .._types import PathLike
from ..scoring.finetune import FinetuneCandidate
from ..scoring.matrix import MATRIX_FORMATS, read_matrix_frame

if TYPE_CHECKING:
    import altair as alt

    from ..scoring.matrix import MemoryMatrix

__all__ = [
    "CANDIDATE_SCHEMA",
    "CHART_FORMATS",
    "CHAT_ROLES",
    "MATRIX_FORMATS",
    "chat_messages",
    "export_candidates",
    "export_matrix",
    "parse_prior_context",
    "read_candidates",
    "read_chat",
    "read_matrix_frame",
    "save_chart",
    "validate_chat_record",
]

#: Value of the ``schema`` key of every candidates JSONL line.
CANDIDATE_SCHEMA = "scoring_kit.candidate/1"
#: Suffixes :func:`save_chart` writes.
CHART_FORMATS = (".html", ".json", ".png", ".svg")
#: Roles a chat record may use.
CHAT_ROLES = ("system", "user", "assistant")

_CANDIDATE_KEYS = (
    "schema",
    "entry_idx",
    "divergence",
    "timestamp_ns",
    "response_text",
    "prior_context",
    "alternate_text",
    "alternate_error",
    "context_ids",
    "continuation_ids",
)

def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except StoreError as exc:
        raise ExportError(str(exc)) from exc


def _check_target(path: Path, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        msg = f"{path} exists; pass overwrite=True to replace it"
        raise ExportError(msg)
    if path.is_dir():
        msg = f"{path} is a folder, not a file"
        raise ExportError(msg)


# ── charts ───────────────────────────────────────────────────────

class _ScriptSafeEncoder(json.JSONEncoder):
    """JSON that is safe inside an HTML ``<script>``: ``<``, ``>`` and ``&`` are written as
    ``\\u003c``-style escapes, so a memory or error text holding ``</script>`` cannot end
    the script (or inject one). The parsed values are unchanged."""

    def encode(self, o: Any) -> str:
        text = super().encode(o)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)


def save_chart(
    chart: alt.TopLevelMixin,
    path: PathLike,
    *,
    overwrite: bool = False,
    scale: float = 1.0,
    renderer: Literal["svg", "canvas"] = "svg",
) -> Path:
    """Write ``chart`` to ``path``; the format comes from the suffix.

    Parameters
    ----------
    chart
        Any Altair top-level chart (single, layered or concatenated).
    path
        ``.html`` (self-contained: JavaScript inlined, opens offline), ``.png``, ``.svg``
        or ``.json`` (the Vega-Lite spec).
    overwrite
        Replace an existing file; with ``False`` an existing file is an error.
    scale
        Pixel scale of ``.png`` (2.0 doubles width and height) and ``.svg``.
    renderer
        Vega renderer of the ``.html`` page (``"svg"`` puts the marks in the DOM).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ExportError
        Unknown suffix (the valid ones are listed), the file exists and ``overwrite`` is
        false, the chart cannot be rendered, or the file cannot be written.
    """
    p = Path(path)
    fmt = p.suffix.lower()
    if fmt not in CHART_FORMATS:
        msg = (
            f"cannot save a chart as {p.suffix or 'a file without suffix'!r} ({p}); "
            f"valid suffixes: {', '.join(CHART_FORMATS)}"
        )
        raise ExportError(msg)
    if not (scale > 0 and math.isfinite(scale)):
        msg = f"cannot save {p}: scale must be a positive number, got {scale!r}"
        raise ExportError(msg)
    _check_target(p, overwrite=overwrite)
    try:
        if fmt == ".json":
            data = chart.to_json(indent=2).encode() + b"\n"
        elif fmt == ".html":
            buf = io.StringIO()
            chart.save(
                buf,
                format="html",
                inline=True,
                embed_options={"renderer": renderer},
                json_kwds={"cls": _ScriptSafeEncoder},
            )
            html = buf.getvalue()
            if _CDN_SCRIPT.search(html):  # pragma: no cover - guards an Altair change
                msg = f"cannot save {p}: the HTML would load scripts from the network"
                raise ExportError(msg)
            data = html.encode()
        elif fmt == ".svg":
            sbuf = io.StringIO()
            chart.save(sbuf, format="svg", scale_factor=scale)
            data = sbuf.getvalue().encode()
        else:
            bbuf = io.BytesIO()
            chart.save(bbuf, format="png", scale_factor=scale)
            data = bbuf.getvalue()
    except ExportError:
        raise
    except Exception as exc:
        msg = f"cannot render the chart to {p}: {type(exc).__name__}: {exc}"
        raise ExportError(msg) from exc
    _write(p, data)
    return p


# ── chat records ─────────────────────────────────────────────────

_TURN = re.compile(r"^(user|assistant): ?", re.DOTALL)


def parse_prior_context(text: str) -> list[tuple[str, str]]:
    """``(role, content)`` turns of a ``prior_context`` string, oldest first.

    Blocks are separated by a blank line and open with ``user:`` or ``assistant:``; a block
    that opens otherwise continues the previous turn (a turn's own text may hold blank
    lines). Text before the first role marker is ignored.

    >>> parse_prior_context("user: hi\\n\\nassistant: hello\\n\\nthere")
    [('user', 'hi'), ('assistant', 'hello\\n\\nthere')]
    """
    turns: list[tuple[str, str]] = []
    for block in text.split("\n\n"):
        m = _TURN.match(block)
        if m is not None:
            turns.append((m.group(1), block[m.end():]))
        elif turns:
            role, content = turns[-1]
            turns[-1] = (role, f"{content}\n\n{block}")
    return [(r, c.strip()) for r, c in turns]


def chat_messages(
    candidate: FinetuneCandidate, *, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The ``messages`` list of ``candidate``'s chat record (see the module docstring).

    Raises
    ------
    ExportError
        The response text is empty (there would be nothing to train on).
    """
    if not candidate.response_text.strip():
        msg = (
            f"candidate for entry {candidate.entry_idx} has an empty response_text; "
            "a chat record needs a non-empty assistant message"
        )
        raise ExportError(msg)
    turns: list[tuple[str, str]] = []
    for role, content in parse_prior_context(candidate.prior_context):
        if not content:
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n\n{content}")
        else:
            turns.append((role, content))
    while turns and turns[0][0] != "user":
        turns.pop(0)
    if turns and turns[-1][0] == "assistant":
        # roles must alternate: the trained response follows a user turn
        turns.pop()
    messages: list[dict[str, str]] = []
    if system_prompt is not None and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt})
    messages.extend({"role": r, "content": c} for r, c in turns)
    messages.append({"role": "assistant", "content": candidate.response_text})
    return messages


def _where(path: PathLike | None, line: int | None) -> str:
    if path is not None:
        return f"{path}:{line}" if line is not None else str(path)
    return f"line {line}" if line is not None else "chat record"


def validate_chat_record(
    obj: Any, *, path: PathLike | None = None, line: int | None = None
) -> None:
    """Check one chat record against the rules in the module docstring.

    Parameters
    ----------
    obj
        The parsed JSON value of one line.
    path, line
        Where it came from (named in the error).

    Raises
    ------
    ExportError
        The message names the place (``file:line``) and the field, e.g.
        ``chat.jsonl:3: field 'messages[2].role': 'tool' is not one of system, user,
        assistant``.
    """
    where = _where(path, line)

    def fail(field: str, problem: str) -> None:
        msg = f"{where}: field {field!r}: {problem}"
        raise ExportError(msg)

    if not isinstance(obj, dict):
        fail("<record>", f"expected a JSON object, got {type(obj).__name__}")
        return
    extra = sorted(set(obj) - {"messages"})
    if extra:
        fail(extra[0], "unexpected key; a chat record holds only 'messages'")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        fail("messages", "expected a non-empty list of messages")
        return
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            fail(f, f"expected an object, got {type(m).__name__}")
            return
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            fail(f"{f}.{extra[0]}", "unexpected key; a message holds only role and content")
        role = m.get("role")
        if role not in CHAT_ROLES:
            fail(f"{f}.role", f"{role!r} is not one of {', '.join(CHAT_ROLES)}")
        if role == "system" and i != 0:
            fail(f"{f}.role", "a system message may only be the first message")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            fail(f"{f}.content", f"expected a non-empty string, got {content!r:.40}")
    if msgs[-1].get("role") != "assistant":
        fail(f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's")


# ── candidates ───────────────────────────────────────────────────


def _candidate_record(c: FinetuneCandidate, i: int) -> dict[str, Any]:
    if not math.isfinite(c.divergence):
        msg = f"candidate {i} (entry {c.entry_idx}): divergence {c.divergence!r} is not finite"
        raise ExportError(msg)
    return {
        "schema": CANDIDATE_SCHEMA,
        "entry_idx": int(c.entry_idx),
        "divergence": float(c.divergence),
        "timestamp_ns": int(c.timestamp_ns),
        "response_text": c.response_text,
        "prior_context": c.prior_context,
        "alternate_text": c.alternate_text,
        "alternate_error": c.alternate_error,
        "context_ids": [int(t) for t in c.context_ids],
        "continuation_ids": [int(t) for t in c.continuation_ids],
    }


def _dumps(obj: Any, where: str) -> bytes:
    try:
        return orjson.dumps(obj) + b"\n"
    except (TypeError, orjson.JSONEncodeError) as exc:
        msg = f"{where}: cannot encode as JSON: {exc}"
        raise ExportError(msg) from exc


def chat_path_for(path: PathLike) -> Path:
    """The default chat file next to a candidates file: ``<stem>.chat.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.chat.jsonl")


def export_candidates(
    candidates: Iterable[FinetuneCandidate],
    path: PathLike,
    *,
    chat_path: PathLike | None = None,
    system_prompt: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write candidates as JSONL plus the chat-format file next to it.

    Parameters
    ----------
    candidates
        The candidates, in the order to write them.
    path
        The candidates file (``scoring_kit.candidate/1`` lines).
    chat_path
        The chat file (default ``<stem>.chat.jsonl`` beside ``path``).
    system_prompt
        A system message to open every chat record with (none by default).
    overwrite
        Replace existing files; with ``False`` an existing file is an error (checked for
        both files before either is written).

    Returns
    -------
    Path
        The chat file (the candidates file is ``path``).

    Raises
    ------
    ExportError
        A file exists (and not ``overwrite``), a candidate has a non-finite divergence or
        an empty response, or a file cannot be written.
    """
    p = Path(path)
    cp = Path(chat_path) if chat_path is not None else chat_path_for(p)
    if cp.resolve() == p.resolve():
        msg = f"the chat file and the candidates file are the same path: {p}"
        raise ExportError(msg)
    _check_target(p, overwrite=overwrite)
    _check_target(cp, overwrite=overwrite)
    lines: list[bytes] = []
    chats: list[bytes] = []
    for i, c in enumerate(candidates):
        lines.append(_dumps(_candidate_record(c, i), f"candidate {i}"))
        record = {"messages": chat_messages(c, system_prompt=system_prompt)}
        validate_chat_record(record, path=cp, line=i + 1)
        chats.append(_dumps(record, f"chat record {i}"))
    _write(p, b"".join(lines))
    _write(cp, b"".join(chats))
    return cp


def _read_lines(path: PathLike) -> list[tuple[int, Any]]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        msg = f"cannot read {p}: {exc}"
        raise ExportError(msg) from exc
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            msg = f"{p}:{lineno}: not valid JSON: {exc}"
            raise ExportError(msg) from exc
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _candidate_from(obj: Any, where: str) -> FinetuneCandidate:
    def fail(field: str, problem: str) -> ExportError:
        return ExportError(f"{where}: field {field!r}: {problem}")

    if not isinstance(obj, dict):
        raise fail("<record>", f"expected a JSON object, got {type(obj).__name__}")
    for k in _CANDIDATE_KEYS:
        if k not in obj:
            raise fail(k, "missing")
    extra = sorted(set(obj) - set(_CANDIDATE_KEYS))
    if extra:
        raise fail(extra[0], f"unexpected key in a {CANDIDATE_SCHEMA} record")
    if obj["schema"] != CANDIDATE_SCHEMA:
        raise fail("schema", f"expected {CANDIDATE_SCHEMA!r}, got {obj['schema']!r}")
    if not _is_int(obj["entry_idx"]) or obj["entry_idx"] < 0:
        raise fail("entry_idx", f"expected an integer >= 0, got {obj['entry_idx']!r}")
    div = obj["divergence"]
    if not (isinstance(div, int | float) and not isinstance(div, bool)) or not math.isfinite(div):
        raise fail("divergence", f"expected a finite number, got {div!r}")
    if not _is_int(obj["timestamp_ns"]):
        raise fail("timestamp_ns", f"expected an integer, got {obj['timestamp_ns']!r}")
    for k in ("response_text", "prior_context"):
        if not isinstance(obj[k], str):
            raise fail(k, f"expected a string, got {type(obj[k]).__name__}")
    for k in ("alternate_text", "alternate_error"):
        if obj[k] is not None and not isinstance(obj[k], str):
            raise fail(k, f"expected a string or null, got {type(obj[k]).__name__}")
    for k in ("context_ids", "continuation_ids"):
        ids = obj[k]
        if not isinstance(ids, list):
            raise fail(k, f"expected a list of token ids, got {type(ids).__name__}")
        for j, t in enumerate(ids):
            if not _is_int(t) or t < 0:
                raise fail(f"{k}[{j}]", f"expected a token id (integer >= 0), got {t!r}")
    return FinetuneCandidate(
        entry_idx=obj["entry_idx"],
        divergence=float(div),
        response_text=obj["response_text"],
        prior_context=obj["prior_context"],
        context_ids=tuple(obj["context_ids"]),
        continuation_ids=tuple(obj["continuation_ids"]),
        timestamp_ns=obj["timestamp_ns"],
        alternate_text=obj["alternate_text"],
        alternate_error=obj["alternate_error"],
    )


def read_candidates(path: PathLike) -> list[FinetuneCandidate]:
    """Re-import a candidates JSONL file, validating every line (blank lines skipped).

    Raises
    ------
    ExportError
        The file cannot be read, or a line is not JSON or breaks the schema: the message
        names ``file:line`` and the field.
    """
    return [_candidate_from(obj, f"{path}:{lineno}") for lineno, obj in _read_lines(path)]


def read_chat(path: PathLike) -> list[dict[str, Any]]:
    """Read a chat JSONL file, validating every record with :func:`validate_chat_record`.

    Raises
    ------
    ExportError
        As :func:`validate_chat_record`, naming ``file:line`` and the field.
    """
    out: list[dict[str, Any]] = []
    for lineno, obj in _read_lines(path):
        validate_chat_record(obj, path=path, line=lineno)
        out.append(obj)
    return out


# ── matrices ─────────────────────────────────────────────────────


def export_matrix(matrix: MemoryMatrix, path: PathLike, *, overwrite: bool = False) -> Path:
    """Same as ``matrix.save(path, overwrite=overwrite)`` (:meth:`MemoryMatrix.save`, the
    one matrix writer; kept under this name for existing callers)."""
    return matrix.save(path, overwrite=overwrite)
