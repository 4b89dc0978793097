"""Does the kit's tokenizer read text the way the served model does? One request says.

The kit scores token ids, so the ids must be the served model's own. Before any scoring
call :func:`check_tokenizer` tokenizes :data:`PROBE_TEXT` locally and through the server's
own tokenize endpoint, and compares the two:

* ``POST /tokenize`` ``{"prompt": ..., "add_special_tokens": false}`` (vLLM, the seed's vLLM
  fork, the embedded server): ``{tokens, count, max_model_len}``;
* else ``POST /v1/tokenize`` (SGLang), else ``POST /extras/tokenize`` ``{"input": ...}``
  (llama-cpp-python): ``{tokens}``.

Equal ids (a leading BOS the server adds is allowed) -> ``status="agree"``. Different ids ->
:class:`~scoring_kit._exceptions.TokenizerMismatch`, one line naming both tokenizers, the
served model and the option that fixes it. A server with none of the endpoints ->
``status="unavailable"``: the result says so (and the session warns), it is never skipped
silently. :func:`compare_tokens` is the pure comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx

from .._exceptions import BackendUnavailable, TokenizerMismatch
from ._util import display_url, json_headers, normalise_url, resolve_api_key
from .detect import probe

if TYPE_CHECKING:
    from ..context.tokenizer import Tokenizer

__all__ = [
    "FIX_HINT",
    "PROBE_TEXT",
    "TokenizerCheck",
    "check_tokenizer",
    "check_tokenizer_local",
    "compare_tokens",
]

log = logging.getLogger(__name__)

#: Text that tells tokenizers apart: words, digits, punctuation, runs of spaces, a tab, a
#: newline, accents, CJK and an emoji (byte fallback), and a chat-like line.
PROBE_TEXT = (
    "Hello, world! Mel plays the violin on Saturdays — 12,345.67 Hz?\n"
    "  Ünïcödé café, naïve façade; 東京で会いましょう 🎻\tdef f(x): return x**2\n"
    "user: What did I paint last year?"
)

#: What a user passes to make the kit tokenize with the served model's tokenizer.
FIX_HINT = (
    "pass --tokenizer PATH (the served model's HF folder, tokenizer.json or GGUF) or "
    "--model-path (API: tokenizer= / model_path=)"
)

Status = Literal["agree", "unavailable"]


@dataclass(frozen=True, slots=True)
class TokenizerCheck:
    """The outcome of one agreement check (recorded in a result's metadata).

    Attributes
    ----------
    status
        ``"agree"``, or ``"unavailable"`` when the server has no tokenize endpoint.
    tokenizer
        Name of the kit's tokenizer.
    server
        URL checked (``"in-process"`` for the embedded engine without HTTP).
    endpoint
        The endpoint that answered (``"POST /tokenize"``), if any.
    served_model
        Model the server reports, if known.
    max_model_len
        The server's context length, if it reports one.
    probe_tokens
        Tokens of :data:`PROBE_TEXT` by the kit's tokenizer.
    detail
        Why the check is unavailable, or what the server added (a BOS).
    """

    status: Status
    tokenizer: str
    server: str
    endpoint: str | None = None
    served_model: str | None = None
    max_model_len: int | None = None
    probe_tokens: int = 0
    detail: str = ""

    def as_meta(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and the CLI."""
        who = f"{self.server}" + (f" ({self.served_model})" if self.served_model else "")
        if self.status == "agree":
            return (f"tokenizer {self.tokenizer!r} agrees with {who} on a "
                    f"{self.probe_tokens}-token probe via {self.endpoint}")
        return f"tokenizer agreement with {who} NOT checked: {self.detail}"


def _show(tokenizer: Tokenizer, tid: int) -> str:
    try:
        return repr(tokenizer.decode([tid]))
    except Exception:  # an id outside this tokenizer's vocabulary
        return "?"


def compare_tokens(
    local: Sequence[int],
    served: Sequence[int],
    *,
    bos_id: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> tuple[bool, str]:
    """``(equal, detail)``: whether ``served`` is ``local`` (after one leading ``bos_id`` the
    server added), and in words where they first differ.

    Examples
    --------
    >>> compare_tokens([5, 6], [1, 5, 6], bos_id=1)
    (True, 'the server adds BOS 1')
    >>> compare_tokens([5, 6, 7], [5, 8])
    (False, '3 vs 2 tokens, first difference at token 1: 6 vs 8')
    """
    loc, srv = [int(t) for t in local], [int(t) for t in served]
    if srv == loc:
        return True, ""
    if bos_id is not None and srv[:1] == [bos_id] and srv[1:] == loc:
        return True, f"the server adds BOS {bos_id}"
    i = next((k for k, (a, b) in enumerate(zip(loc, srv, strict=False)) if a != b),
             min(len(loc), len(srv)))
    a = str(loc[i]) if i < len(loc) else "end"
    b = str(srv[i]) if i < len(srv) else "end"
    if tokenizer is not None and i < len(loc):
        a += f" {_show(tokenizer, loc[i])}"
    return False, f"{len(loc)} vs {len(srv)} tokens, first difference at token {i}: {a} vs {b}"


def _bos(tokenizer: Tokenizer) -> int | None:
    bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def _mismatch(
    tokenizer: Tokenizer, where: str, served: str | None, detail: str
) -> TokenizerMismatch:
    model = f"serves {served!r}, which" if served else "has a model that"
    msg = (f"tokenizer mismatch: the conversation is tokenized with {tokenizer.name!r} but "
           f"{where} {model} reads the probe text differently ({detail}); {FIX_HINT}")
    return TokenizerMismatch(msg, tokenizer=tokenizer.name, served_model=served)


def check_tokenizer_local(tokenizer: Tokenizer, served: Tokenizer) -> TokenizerCheck:
    """The in-process check: ``tokenizer`` against the embedded engine's ``served`` one.

    Raises
    ------
    TokenizerMismatch
        The two read :data:`PROBE_TEXT` differently.
    """
    local = tokenizer.encode(PROBE_TEXT)
    same, detail = compare_tokens(local, served.encode(PROBE_TEXT), tokenizer=tokenizer)
    if not same:
        raise _mismatch(tokenizer, "the in-process engine", served.name, detail)
    return TokenizerCheck("agree", tokenizer.name, "in-process", "encode", served.name,
                          None, len(local), detail)


def _tokens_of(body: Any) -> list[int] | None:
    toks = body.get("tokens") if isinstance(body, Mapping) else None
    if isinstance(toks, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                      for t in toks):
        return toks
    return None


async def check_tokenizer(
    base_url: str,
    tokenizer: Tokenizer,
    *,
    model: str | None = None,
    served_model: str | None = None,
    max_model_len: int | None = None,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: float = 30.0,
) -> TokenizerCheck:
    """Check that ``tokenizer`` reads :data:`PROBE_TEXT` as the server at ``base_url`` does.

    Parameters
    ----------
    base_url
        Server URL, with or without ``/v1``.
    tokenizer
        The tokenizer the conversation was (or will be) tokenized with.
    model
        Model name sent in the request (vLLM checks it when given).
    served_model, max_model_len
        What detection already learned (named in the result and in the error).
    api_key
        Bearer token (``None``: ``$SCORING_KIT_API_KEY``).
    transport
        httpx transport replacing the network (tests).
    timeout
        Seconds for the request.

    Returns
    -------
    TokenizerCheck
        ``status="agree"``, or ``"unavailable"`` when no tokenize endpoint answers.

    Raises
    ------
    TokenizerMismatch
        The server's model tokenizes differently (a ``ConfigError``: the CLI exits 2).
    BackendUnavailable
        Nothing answers at ``base_url``.
    """
    root = normalise_url(base_url, strip_v1=True)
    shown = display_url(root)
    headers = json_headers(resolve_api_key(api_key))
    local = tokenizer.encode(PROBE_TEXT)
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("/tokenize", {"prompt": PROBE_TEXT, "add_special_tokens": False}),
        ("/v1/tokenize", {"prompt": PROBE_TEXT, "add_special_tokens": False}),
        ("/extras/tokenize", {"input": PROBE_TEXT}),
    ]
    tried: list[str] = []
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout),
                                 transport=transport) as client:
        for path, body in attempts:
            if model is not None:
                body = {"model": model, **body}
            res = await probe(client, "POST", root + path, path, body=body)
            if res.status is None:
                raise BackendUnavailable(f"no server answers at {shown}: {res.error}")
            served = _tokens_of(res.body)
            if served is None:
                tried.append(res.describe())
                if res.status in (401, 403):
                    break  # the key is wrong: the scoring call will say so
                continue
            mml = max_model_len
            if isinstance(res.body, Mapping) and isinstance(res.body.get("max_model_len"), int):
                mml = int(res.body["max_model_len"])
            same, detail = compare_tokens(local, served, bos_id=_bos(tokenizer),
                                          tokenizer=tokenizer)
            if not same:
                raise _mismatch(tokenizer, f"the server at {shown}", served_model, detail)
            return TokenizerCheck("agree", tokenizer.name, shown, f"POST {path}", served_model,
                                  mml, len(local), detail)
    detail = "no tokenize endpoint answered (" + "; ".join(tried) + ")"
    return TokenizerCheck("unavailable", tokenizer.name, shown, None, served_model,
                          max_model_len, len(local), detail)
