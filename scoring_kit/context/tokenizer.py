"""The tokenizer interface the context model needs, and its Hugging Face implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["IM_END", "IM_START", "HFTokenizer", "Tokenizer", "turn_end_id"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, plus the ChatML special tokens (None when it has none)."""

    name: str
    vocab_size: int
    im_start_id: int | None
    im_end_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (no BOS)."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...


class HFTokenizer:
    """Wraps a ``transformers`` tokenizer (fast or slow).

    ``im_start_id`` / ``im_end_id`` are the ChatML marker ids, or None for a tokenizer
    without them (such a model's conversations go through a chat template).
    """

    def __init__(self, tok: Any, *, name: str) -> None:
        self._tok = tok
        self.name = name
        self.vocab_size = len(tok)
        ids = tok.convert_tokens_to_ids([IM_START, IM_END])
        unk = getattr(tok, "unk_token_id", None)
        self.im_start_id: int | None = None
        self.im_end_id: int | None = None
        if not any(i is None or (unk is not None and i == unk) for i in ids):
            self.im_start_id, self.im_end_id = int(ids[0]), int(ids[1])

    @property
    def has_chatml(self) -> bool:
        """Whether the vocabulary has the ChatML markers as single tokens."""
        return self.im_start_id is not None and self.im_end_id is not None

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template, if it ships one."""
        tpl = getattr(self._tok, "chat_template", None)
        return tpl if isinstance(tpl, str) and tpl.strip() else None

    @property
    def hf(self) -> Any:
        """The wrapped ``transformers`` tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return [int(t) for t in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


#: end-of-turn markers of common chat formats, tried in order
_TURN_ENDS = (IM_END, "<end_of_turn>", "<|eot_id|>", "<|end|>")


def turn_end_id(tok: Tokenizer) -> int | None:
    """The id that ends an assistant turn: ChatML's ``<|im_end|>``, Gemma's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``, ... or the EOS id; None if none is known."""
    if tok.im_end_id is not None:
        return tok.im_end_id
    for marker in _TURN_ENDS:
        ids = tok.encode(marker)
        if len(ids) == 1:
            return ids[0]
    eos = getattr(getattr(tok, "hf", None), "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None
