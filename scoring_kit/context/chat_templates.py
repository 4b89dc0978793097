"""Chat templates: the ones the kit ships, loading one, and which one a conversation uses.

A template is named (``chatml``, ``gemma``), the tokenizer's own (``tokenizer``), or a Jinja
file; every one is compiled by transformers' own sandboxed environment when it is loaded, so a
syntax error names the file and line before anything is rendered. :func:`render_chat` renders
chat messages exactly as ``tokenizer.apply_chat_template`` would (without tokenizing), with the
same special-token variables (:func:`special_tokens`); :func:`resolve_template` decides which
template a conversation is rendered with. How a rendering becomes nodes with token spans is
:mod:`.templates`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .._exceptions import ConfigError
from .tokenizer import Tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "MEMORY_PLACEMENTS",
    "NAMED_TEMPLATES",
    "ChatTemplate",
    "MemoryPlacement",
    "default_placement",
    "load_template",
    "render_chat",
    "render_raw",
    "resolve_template",
    "special_tokens",
]

MemoryPlacement = Literal["message:system", "message:user", "message:tool", "inline"]
MEMORY_PLACEMENTS: tuple[str, ...] = get_args(MemoryPlacement)

#: ChatML, as the kit renders it (no default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Gemma 3's turn format: ``<bos>`` first, ``<start_of_turn>user ... <end_of_turn>``, ``model``
#: as the assistant role, the (first) system message folded into the first user turn, and
#: content trimmed. Unlike Google's template it does not insist on strict alternation (two
#: user turns in a row are rendered as such) and renders ``tool`` output as a user turn; a
#: system message anywhere but first raises, as Gemma has no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ raise_exception('Gemma has no system role: only a first system message is supported "
    "(it is folded into the first user turn)') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = 'user' -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

#: Templates shipped by name (``--chat-template NAME``); ``tokenizer`` means the tokenizer's own.
NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}
_DEFAULT_PLACEMENT: dict[str, MemoryPlacement] = {"gemma": "inline"}


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A Jinja chat template and where it came from."""

    name: str
    source: str
    origin: str

    @property
    def is_builtin_chatml(self) -> bool:
        return self.name == "chatml" and self.source == CHATML_TEMPLATE


def _tokenizer_template(tokenizer: Tokenizer | None) -> str | None:
    hf = getattr(tokenizer, "hf", None)
    tpl = getattr(hf, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def _compile(source: str, *, origin: str) -> None:
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(source)
    except jinja2.TemplateSyntaxError as e:
        msg = f"chat template {origin}: line {e.lineno}: {e.message}"
        raise ConfigError(msg) from e
    except jinja2.TemplateError as e:
        raise ConfigError(f"chat template {origin}: {e}") from e


def load_template(spec: str | os.PathLike[str], tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """The chat template named by ``spec``: a shipped name, ``tokenizer``, or a Jinja file.

    Raises
    ------
    ConfigError
        Unknown name, unreadable file, Jinja syntax error, or ``tokenizer`` when the tokenizer
        has no chat template.
    """
    s = str(spec)
    names = ", ".join([*NAMED_TEMPLATES, "tokenizer"])
    if s in NAMED_TEMPLATES:
        return ChatTemplate(s, NAMED_TEMPLATES[s], origin=f"built-in {s!r}")
    if s == "tokenizer":
        src = _tokenizer_template(tokenizer)
        tname = getattr(tokenizer, "name", "?")
        if src is None:
            msg = (f"--chat-template tokenizer: tokenizer {tname!r} has no chat template; "
                   f"name one of {names} or a Jinja file")
            raise ConfigError(msg)
        _compile(src, origin=f"of tokenizer {tname!r}")
        return ChatTemplate("tokenizer", src, origin=f"tokenizer {tname!r}")
    p = Path(s)
    if not p.exists():
        msg = f"--chat-template {s!r}: no such template name or file; names: {names}"
        raise ConfigError(msg)
    try:
        src = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {s!r}: cannot read the file: {e}") from e
    if not src.strip():
        raise ConfigError(f"--chat-template {s!r}: the file is empty")
    _compile(src, origin=repr(s))
    return ChatTemplate(p.stem, src, origin=str(p))


def render_chat(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The text ``template`` renders for chat ``messages`` (``tokenizer.apply_chat_template``
    without tokenizing; the server's ``/tokenize`` with ``messages``).

    Raises
    ------
    ConfigError
        The template raised (its own message is quoted).
    """
    try:
        return render_raw(template, messages, special_tokens(tokenizer),
                          add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise ConfigError(f"chat template {template.origin}: {type(e).__name__}: {e}") from e


def render_raw(
    template: ChatTemplate,
    messages: Sequence[dict[str, Any]],
    special: dict[str, Any],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """:func:`render_chat` with the template variables given (:func:`special_tokens`) and
    the template's own exceptions left as they are (``jinja2.TemplateError`` for a rejected
    conversation), for callers that render many times and react to a rejection."""
    from transformers.utils.chat_template_utils import render_jinja_template

    out = render_jinja_template(conversations=[list(messages)], chat_template=template.source,
                                add_generation_prompt=add_generation_prompt, **special)
    return str(out[0][0])


def default_placement(template: ChatTemplate) -> MemoryPlacement:
    """Where memories go when no placement is named: inline for Gemma, else system messages."""
    return _DEFAULT_PLACEMENT.get(template.name, "message:system")


def special_tokens(tokenizer: Tokenizer) -> dict[str, Any]:
    """The template variables ``apply_chat_template`` passes: ``bos_token``, ``eos_token``
    and the tokenizer's other special tokens (empty strings where it has none)."""
    hf = getattr(tokenizer, "hf", None)
    stm = getattr(hf, "special_tokens_map", None)
    out: dict[str, Any] = {"bos_token": "", "eos_token": ""}
    if isinstance(stm, dict):
        out.update({k: v for k, v in stm.items() if isinstance(v, str)})
    return out


def resolve_template(
    spec: str | os.PathLike[str] | ChatTemplate | None,
    tokenizer: Tokenizer,
    placement: str | None = None,
) -> ChatTemplate | None:
    """The template a conversation is rendered with; None means the kit's own ChatML path.

    With no ``spec``: the kit's ChatML when the tokenizer has the ChatML tokens (today's
    token ids, byte for byte), else the tokenizer's own template, else an error naming
    ``--chat-template``. ``chatml`` with a ChatML tokenizer and the default placement is the
    kit's own path too (same text as :data:`CHATML_TEMPLATE`).
    """
    if isinstance(spec, ChatTemplate):
        tpl: ChatTemplate | None = spec
    elif spec is None:
        if tokenizer.im_start_id is not None:
            tpl = None
        elif _tokenizer_template(tokenizer) is not None:
            tpl = load_template("tokenizer", tokenizer)
        else:
            msg = (f"tokenizer {tokenizer.name!r} has no ChatML tokens and no chat template: "
                   f"pass --chat-template (one of {', '.join(NAMED_TEMPLATES)}, or a Jinja file)")
            raise ConfigError(msg)
    else:
        tpl = load_template(spec, tokenizer)
    legacy_ok = tokenizer.im_start_id is not None and placement in (None, "message:system")
    if tpl is None or (tpl.is_builtin_chatml and legacy_ok):
        if placement not in (None, "message:system"):
            return ChatTemplate("chatml", CHATML_TEMPLATE, origin="built-in 'chatml'")
        return None
    return tpl
