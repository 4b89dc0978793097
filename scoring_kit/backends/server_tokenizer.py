"""The served model's tokenizer, read through the server's own ``/tokenize`` (``--tokenizer
server``): no local tokenizer file is needed.

:class:`ServerTokenizer` implements the :class:`~scoring_kit.context.tokenizer.Tokenizer`
protocol over HTTP: ``encode`` is ``POST /tokenize`` ``{"prompt": ..., "add_special_tokens":
false}``, ``decode`` is ``POST /detokenize`` (vLLM, the seed's vLLM fork, the embedded
server). The ChatML markers and the BOS token are learned from the server once: the markers
are ChatML when each reads as one token, and ``BOS`` is what ``add_special_tokens: true`` puts
in front of an empty prompt. The chat template stays on the client — stock servers do not
expose theirs — so a non-ChatML model needs ``--chat-template NAME|FILE`` (the kit says so).
Encodings are memoised: a conversation's markup repeats.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import httpx

from .._exceptions import BackendUnavailable, ConfigError, ProtocolError
from ._util import display_url, json_headers, normalise_url, resolve_api_key

__all__ = ["UNKNOWN_VOCAB", "ServerTokenizer"]

#: ``vocab_size`` of a server tokenizer: stock servers do not report it; the server checks ids.
UNKNOWN_VOCAB = 2**31 - 1


class _SpecialTokens:
    """The few attributes of an HF tokenizer the templates read (``special_tokens_map``,
    ``bos_token_id``, ``eos_token_id``)."""

    def __init__(self, bos: tuple[int, str] | None) -> None:
        self.bos_token_id = bos[0] if bos else None
        self.eos_token_id: int | None = None
        self.special_tokens_map = {"bos_token": bos[1]} if bos else {}
        self.chat_template = None


class ServerTokenizer:
    """Tokenize through the server at ``base_url`` (see the module docstring).

    Parameters
    ----------
    base_url
        Server URL, with or without ``/v1``.
    api_key
        Bearer token (``None``: ``$SCORING_KIT_API_KEY``).
    transport
        httpx transport replacing the network (tests).
    timeout
        Seconds per request.

    Raises
    ------
    ConfigError
        The server has no ``/tokenize`` (name a tokenizer file with ``--tokenizer PATH``).
    BackendUnavailable
        Nothing answers at ``base_url``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._root = normalise_url(base_url, strip_v1=True)
        self._shown = display_url(self._root)
        headers = json_headers(resolve_api_key(api_key))
        self._http = httpx.Client(base_url=self._root, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout))
        self.vocab_size = UNKNOWN_VOCAB
        self.name = self._model_name()
        bos = self._post("/tokenize", {"prompt": "", "add_special_tokens": True})["tokens"]
        first = (int(bos[0]), self.decode([int(bos[0])])) if len(bos) == 1 else None
        self.hf: Any = _SpecialTokens(first)
        starts, ends = self.encode("<|im_start|>"), self.encode("<|im_end|>")
        chatml = len(starts) == 1 and len(ends) == 1
        self.im_start_id: int | None = starts[0] if chatml else None
        self.im_end_id: int | None = ends[0] if chatml else None

    def _model_name(self) -> str:
        try:
            resp = self._http.get("/v1/models")
            data = resp.json().get("data") if resp.status_code == 200 else None
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"no server answers at {self._shown}: {exc}") from exc
        except ValueError:
            data = None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return str(data[0].get("id") or self._shown)
        return self._shown

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"no server answers at {self._shown}: {exc}") from exc
        if resp.status_code in (404, 405):
            msg = (f"--tokenizer server: {self._shown} has no POST {path} ({resp.status_code}); "
                   "pass the served model's tokenizer file with --tokenizer PATH")
            raise ConfigError(msg)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code != 200 or not isinstance(data, dict):
            msg = f"POST {path} at {self._shown} → {resp.status_code}: {resp.text[:200]}"
            raise ProtocolError(msg, backend="server-tokenizer")
        return data

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per session; bounded
    def _encode(self, text: str) -> tuple[int, ...]:
        toks = self._post("/tokenize", {"prompt": text, "add_special_tokens": False}).get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            msg = f"POST /tokenize at {self._shown}: no `tokens` list in the answer"
            raise ProtocolError(msg, backend="server-tokenizer")
        return tuple(int(t) for t in toks)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the served model reads it (no special tokens added)."""
        return list(self._encode(text)) if text else []

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` by the server's ``/detokenize``."""
        if not ids:
            return ""
        text = self._post("/detokenize", {"tokens": [int(t) for t in ids]}).get("prompt")
        if not isinstance(text, str):
            msg = f"POST /detokenize at {self._shown}: no `prompt` string in the answer"
            raise ProtocolError(msg, backend="server-tokenizer")
        return text

    @property
    def chat_template(self) -> str | None:
        """Stock servers do not expose their template: always None."""
        return None

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"ServerTokenizer({self.name!r} at {self._shown})"
