"""``EchoScorer``: span totals from OpenAI-style ``echo`` + ``logprobs`` completions
(backend name ``"echo"``).

The legacy OpenAI completions API returns the prompt's own token log-probabilities when the
prompt is echoed::

    POST /v1/completions
    {"model": m, "prompt": [ids] | "text", "max_tokens": 1, "temperature": 0,
     "echo": true, "logprobs": 0, "stream": false}
    -> {"choices": [{"logprobs": {"tokens": [...], "token_logprobs": [null, -2.3, ...],
                                  "top_logprobs": [...], "text_offset": [...]}, ...}]}

``token_logprobs[t]`` is ``log P(prompt[t] | prompt[:t])`` for ``t >= 1``; entry 0 is
``null``; entries past the prompt belong to generated tokens and are ignored. Servers that
answer it:

* **vLLM** (``echo`` with ``logprobs``; the values equal its ``prompt_logprobs``). Token-id
  prompts are sent as ids.
* **llama-cpp-python**'s OpenAI server (0.3), with the model loaded with ``logits_all=True``
  (``python -m llama_cpp.server --logits_all True``). Its ``prompt`` takes text only (an id
  prompt gets a 500 whose message is its schema's refusal, taken once as "send text", like
  a 422), so the scorer needs a ``tokenizer`` to turn ids into text; it then checks, once per
  distinct prompt text, through the server's tokenizer (``POST /tokenize``, else
  ``POST /extras/tokenize``, llama-cpp-python's) that the server reads that text as exactly
  the ids sent, and refuses a prompt it would read differently, naming the first differing
  token (positions would not line up with the spans). Its echo leaves out the prompt's
  first token and every later token equal to it (its BOS: ``<|im_start|>`` for SmolLM2),
  so the entries are realigned and each left-out BOS inside a span is read with two plain
  requests (:mod:`._llamacpp`). llama.cpp's own ``llama-server`` refuses ``echo`` ("Only no
  echo is supported") and cannot be used.

``max_tokens`` is 1, not 0: llama-cpp-python reads ``max_tokens <= 0`` as "until the context
is full". So, as with the ``vllm`` backend, at most ``max_model_len - 1`` prompt tokens can
be scored; longer prompts are refused locally when the context is known.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np

from .._exceptions import ProtocolError, ScoringAPIError
from .._types import FloatArray
from ._common import BackendPromptError, StockHTTPBackend
from ._llamacpp import bos_logprob, echo_positions, is_bos_argmax, refuses_id_prompt
from ._retry import RetryPolicy
from ._util import choice_text, completion_body, empty_scores, logprob_value, normalise_url
from .base import CompletionRequest, ScoreRequest, gather_in_order
from .detect import ECHO_PROBE_PROMPT, echo_probe_body, is_echo_answer

if TYPE_CHECKING:
    from .._exceptions import BackendError
    from ..context.tokenizer import Tokenizer

__all__ = ["ECHO_PROBE_PROMPT", "EchoScorer", "echo_probe_body", "is_echo_answer",
           "sum_token_logprobs"]


_WHAT = "echo /v1/completions"

PromptFormat = Literal["auto", "ids", "text"]


def sum_token_logprobs(
    token_logprobs: Any,
    n_prompt: int,
    ranges: Sequence[tuple[int, int]],
    *,
    what: str = _WHAT,
) -> FloatArray:
    """Span totals from ``choices[0].logprobs.token_logprobs`` of an echoed prompt.

    Parameters
    ----------
    token_logprobs
        The decoded list: ``None`` first, then one number per prompt position, then (when a
        token was generated) one more per generated token.
    n_prompt
        How many prompt tokens were sent.
    ranges
        Half-open spans, each ``1 <= start < end <= n_prompt``.

    Raises
    ------
    ProtocolError
        No list, fewer than ``n_prompt`` entries (the prompt was not echoed), or a value read
        that is not a number. Values ``<= -9999`` (vLLM's stand-in) count as ``-inf``.

    Examples
    --------
    >>> sum_token_logprobs([None, -1.0, -0.5, -3.0], 3, [(1, 3)])
    array([-1.5])
    """
    if not isinstance(token_logprobs, list):
        got = type(token_logprobs).__name__
        msg = (
            f"{what}: answer has no choices[0].logprobs.token_logprobs list (got {got}); "
            "the server ignored 'echo'/'logprobs' (llama-cpp-python needs logits_all=True)"
        )
        raise ProtocolError(msg, backend="echo")
    if len(token_logprobs) < n_prompt:
        msg = (
            f"{what}: expected at least {n_prompt} token_logprobs (the echoed prompt), the "
            f"server returned {len(token_logprobs)}: it did not echo the prompt's logprobs"
        )
        raise ProtocolError(msg, backend="echo")
    out = np.empty(len(ranges), dtype=np.float64)
    for k, (a, b) in enumerate(ranges):
        total = 0.0
        for t in range(a, b):
            value = token_logprobs[t]
            lp = logprob_value(value)
            if lp is None:
                msg = f"{what}: token_logprobs[{t}] is {value!r}, not a number"
                raise ProtocolError(msg, backend="echo")
            total += lp
        out[k] = total
    return out




class EchoScorer(StockHTTPBackend):
    """Scorer over OpenAI-style ``/v1/completions`` with ``echo`` and ``logprobs``.

    Parameters
    ----------
    base_url
        Server root, with or without a trailing ``/v1``.
    model
        Served model name; ``None`` takes the first model of ``GET /v1/models``.
    api_key
        Bearer token; ``None`` reads ``$SCORING_KIT_API_KEY``.
    timeout, concurrency, retry, transport
        As for :class:`~scoring_kit.backends.http.ScoreClient`.
    max_model_len
        The model's context, if known (``None``: read ``max_model_len`` from
        ``GET /v1/models`` when the server lists it; otherwise not checked locally).
    prompt_format
        ``"ids"``: send token ids; ``"text"``: send ``tokenizer.decode(ids)`` (checked against
        the server's tokenizer); ``"auto"``: ids, and text from the first answer that
        refuses an id prompt (a 422, or llama-cpp-python's schema 500; needs ``tokenizer``).
    tokenizer
        Turns ids into text for servers that take text only (llama-cpp-python).
    """

    name = "echo"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 300.0,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_model_len: int | None = None,
        prompt_format: PromptFormat = "auto",
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if prompt_format not in ("auto", "ids", "text"):
            from .._exceptions import ConfigError

            msg = f"prompt_format must be 'auto', 'ids' or 'text', got {prompt_format!r}"
            raise ConfigError(msg)
        super().__init__(
            normalise_url(base_url, strip_v1=True),
            model=model,
            max_model_len=max_model_len,
            api_key=api_key,
            timeout=timeout,
            concurrency=concurrency,
            retry=retry,
            transport=transport,
        )
        self.prompt_format: PromptFormat = prompt_format
        self.tokenizer = tokenizer
        self._models_read = model is not None
        self._checked_texts: dict[str, tuple[int, ...]] = {}
        self._tokenize_path: str | None = None
        self._bos_values: dict[tuple[int, ...], float] = {}
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        #: How the echoed entries line up with the prompt: ``"openai"`` (entry ``t`` is
        #: position ``t``; vLLM) or ``"llama-cpp-python"`` (found from its 500 on id prompts
        #: or its ``/extras/tokenize``; see :mod:`._llamacpp`).
        self.layout: Literal["openai", "llama-cpp-python"] = "openai"

    # -- model info --------------------------------------------------------------------

    async def _ensure_model(self) -> None:
        if self._models_read:
            return
        _, data = await self._request_json("GET", self.url("/v1/models"), what="echo /v1/models")
        cards = data.get("data") if isinstance(data, Mapping) else None
        cards = [c for c in cards if isinstance(c, Mapping)] if isinstance(cards, list) else []
        if not cards:
            msg = "echo /v1/models: the server lists no model; pass model=... explicitly"
            raise ProtocolError(msg, backend=self.name)
        self.model = str(cards[0].get("id"))
        mml = cards[0].get("max_model_len")
        if self.max_model_len is None and isinstance(mml, int) and not isinstance(mml, bool):
            self.max_model_len = mml if mml > 0 else None
        self._models_read = True

    # -- prompts -----------------------------------------------------------------------

    def _text(self, prompt: Sequence[int]) -> str:
        if self.tokenizer is None:
            msg = (
                f"{self.name}: the server at {self.base_url} takes text prompts only "
                "(llama-cpp-python); pass tokenizer= (the model's tokenizer) to EchoScorer"
            )
            raise BackendPromptError(msg, backend=self.name)
        return self.tokenizer.decode(list(prompt), skip_special_tokens=False)

    async def _tokenize(self, text: str) -> Any:
        """The server's tokenizer: ``POST /tokenize`` (vLLM, scoring_kit), else, on 404,
        ``POST /extras/tokenize`` (llama-cpp-python); the one that answers is remembered."""
        paths = [self._tokenize_path] if self._tokenize_path else ["/tokenize", "/extras/tokenize"]
        for path in paths:
            body: dict[str, Any] = (
                {"input": text, "model": self.model} if path == "/extras/tokenize"
                else {"prompt": text, "model": self.model}
            )
            try:
                _, data = await self._request_json("POST", self.url(path), body,
                                                   what=f"echo {path}")
            except ScoringAPIError as exc:
                if exc.status_code == 404 and path != paths[-1]:
                    continue
                raise
            self._tokenize_path = path
            if path == "/extras/tokenize":
                self.layout = "llama-cpp-python"
            return data
        raise AssertionError(paths)  # pragma: no cover - the loop returns or raises

    async def _check_text(self, text: str, prompt: Sequence[int]) -> None:
        """The server must read ``text`` as exactly ``prompt`` (its tokenize endpoint)."""
        ids = self._checked_texts.get(text)
        if ids is None:
            data = await self._tokenize(text)
            tokens = data.get("tokens") if isinstance(data, Mapping) else None
            if not isinstance(tokens, list):
                msg = f"echo tokenize: answer has no 'tokens' list (got {data!r:.200})"
                raise ProtocolError(msg, backend=self.name)
            ids = tuple(int(t) for t in tokens)
            self._checked_texts[text] = ids
        if ids != tuple(prompt):
            at = next(
                (i for i, (x, y) in enumerate(zip(ids, prompt, strict=False)) if x != y),
                min(len(ids), len(prompt)),
            )
            theirs = ids[at] if at < len(ids) else "end of text"
            ours = prompt[at] if at < len(prompt) else "end of prompt"
            msg = (
                f"{self.name}: the server tokenizes the prompt's text ({len(prompt)} ids, "
                f"starting {text[:40]!r}) into {len(ids)} tokens; first difference at "
                f"position {at}: server {theirs}, prompt {ours}; its echoed logprobs would "
                "not line up with the spans"
            )
            raise BackendPromptError(msg, backend=self.name, actual=len(ids))

    async def _post(self, request: ScoreRequest) -> Any:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(request.prompt),
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 0,
            "stream": False,
        }
        if self.prompt_format == "text":
            body["prompt"] = self._text(request.prompt)
            await self._check_text(body["prompt"], request.prompt)
        try:
            _, data = await self._request_json("POST", self.url("/v1/completions"), body,
                                               what=_WHAT)
        except ScoringAPIError as exc:
            if not (self.prompt_format == "auto"
                    and refuses_id_prompt(exc.status_code, exc.message)):
                raise
            # the server's schema refuses a list of ids as the prompt: send text from now on
            self.prompt_format = "text"
            if exc.status_code == 500:  # llama-cpp-python's way of saying it
                self.layout = "llama-cpp-python"
            return await self._post(request)
        if self.prompt_format == "auto":
            self.prompt_format = "ids"
        return data

    async def _llama_sums(self, request: ScoreRequest, data: Any, values: Any) -> FloatArray:
        """Span totals from llama-cpp-python's echo layout (see ``_llamacpp``)."""
        prompt, n = request.prompt, len(request.prompt)
        what = f"{_WHAT} (llama-cpp-python)"
        pos = echo_positions(prompt)
        usage = data.get("usage") if isinstance(data, Mapping) else None
        gen = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
        echoed = len(values) - gen if isinstance(values, list) and isinstance(gen, int) else None
        if echoed != len(pos):
            got = len(values) if isinstance(values, list) else type(values).__name__
            msg = (
                f"{what}: expected {len(pos)} echoed prompt entries (the prompt minus its "
                f"first token and every other BOS {prompt[0]}) plus the generated ones, got "
                f"{got} (completion_tokens {gen!r}); not the layout of llama-cpp-python 0.3"
            )
            raise ProtocolError(msg, backend=self.name)
        dense: list[Any] = [None] * n
        for j, t in enumerate(pos[1:], start=1):
            dense[t] = values[j]
        wanted = {t for a, b in request.ranges for t in range(a, b)}
        if pos and pos[0] in wanted:
            msg = (
                f"{self.name}: llama-cpp-python returns null for the first echoed token "
                f"(position {pos[0]}), so a span covering it cannot be scored on this server"
            )
            raise BackendPromptError(msg, backend=self.name)
        # last first: each shorter prefix is then already in the server's KV cache (it
        # reuses the longest common prefix with what it evaluated last), one token to run
        for t in sorted(wanted - set(pos), reverse=True):
            dense[t] = await self._bos_logprob(prompt, t)
        return sum_token_logprobs(dense, n, request.ranges, what=what)

    def _special_ids(self, bos: int) -> list[int]:
        hf = getattr(self.tokenizer, "hf", None)
        ids = {bos, *getattr(hf, "all_special_ids", ())}
        ids.update(getattr(hf, "added_tokens_decoder", {}) or {})
        return sorted(int(i) for i in ids)

    async def _bos_logprob(self, prompt: Sequence[int], t: int) -> float:
        """log P(BOS at ``t``), which llama-cpp-python leaves out of the echo: two plain
        requests on ``prompt[:t]`` (see ``_llamacpp``), remembered per prefix."""
        key = tuple(prompt[:t])
        if key in self._bos_values:
            return self._bos_values[key]
        body: dict[str, Any] = {
            "model": self.model, "prompt": self._text(key), "max_tokens": 1,
            "temperature": 0, "logprobs": 1, "echo": False, "stream": False,
        }
        url, what = self.url("/v1/completions"), f"{_WHAT} (BOS at {t})"
        _, plain = await self._request_json("POST", url, body, what=what)
        value = None
        if is_bos_argmax(plain, t):
            body["logit_bias"] = {str(i): -100 for i in self._special_ids(prompt[0])}
            _, biased = await self._request_json("POST", url, body, what=what)
            value = bos_logprob(biased, t)
        if value is None:
            msg = (
                f"{self.name}: llama-cpp-python leaves token {prompt[t]} (its BOS) at position "
                f"{t} out of the echoed logprobs, and it is not the most likely token there, "
                "so its logprob cannot be read back; the span holding it cannot be scored"
            )
            raise BackendPromptError(msg, backend=self.name)
        self._bos_values[key] = value
        return value

    # -- the scorer contract -----------------------------------------------------------

    async def score(self, request: ScoreRequest) -> FloatArray:
        """Total log-probability per range of ``request`` (one ``POST /v1/completions``).

        Raises
        ------
        BackendPromptError
            Invalid span, a prompt longer than ``max_model_len - 1`` tokens, or (text
            prompts) a text the server would tokenize differently.
        ScoringAPIError, ProtocolError, BackendUnavailable
            As for :meth:`ScoreClient.score`.
        """
        if not request.ranges:
            return empty_scores()
        with self._tracking():
            await self._ensure_model()
            n = len(request.prompt)
            if self.max_model_len is not None and n > self.max_model_len - 1:
                limit = self.max_model_len - 1
                msg = (
                    f"{self.name}: prompt has {n} tokens, but model {self.model!r} has "
                    f"max_model_len {self.max_model_len}; an echo request generates 1 token, "
                    f"so at most {limit} prompt tokens can be scored"
                )
                raise BackendPromptError(msg, backend=self.name, limit=limit, actual=n)
            self._check_request(request)
            self.stats.prompt_tokens += n
            if self.layout == "llama-cpp-python":
                # one prompt at a time (the server runs one anyway): its echo and the BOS
                # reads after it then share the server's KV cache instead of evicting it
                async with self._serial():
                    return await self._score_once(request)
            return await self._score_once(request)

    def _serial(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def _score_once(self, request: ScoreRequest) -> FloatArray:
        data = await self._post(request)
        try:
            logprobs = data["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            logprobs = None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, Mapping) else None
        if self.layout == "llama-cpp-python":
            return await self._llama_sums(request, data, values)
        return sum_token_logprobs(values, len(request.prompt), request.ranges)

    async def score_batch(
        self, requests: Sequence[ScoreRequest]
    ) -> list[FloatArray | BackendError]:
        """Baseline first, then the rest with ``concurrency`` requests in flight."""
        return await gather_in_order(self, requests, concurrency=self.concurrency)

    async def complete(self, request: CompletionRequest) -> str:
        """Generate with ``POST /v1/completions``; return ``choices[0].text``."""
        with self._tracking(prompt_tokens=len(request.prompt)):
            await self._ensure_model()
            body = completion_body(request, self.model)
            body["stream"] = False
            if self.prompt_format == "text":
                body["prompt"] = self._text(request.prompt)
            try:
                _, data = await self._request_json(
                    "POST", self.url("/v1/completions"), body, what=_WHAT
                )
            except ScoringAPIError as exc:
                if not (self.prompt_format == "auto"
                        and refuses_id_prompt(exc.status_code, exc.message)):
                    raise
                self.prompt_format = "text"
                body["prompt"] = self._text(request.prompt)
                _, data = await self._request_json(
                    "POST", self.url("/v1/completions"), body, what=_WHAT
                )
            return choice_text(data, what=_WHAT, backend=self.name)

