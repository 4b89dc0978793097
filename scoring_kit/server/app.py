"""The HTTP face of the embedded engine: the seed's ``/score`` plus vLLM- and SGLang-shaped APIs.

:func:`create_app` wraps an :class:`~scoring_kit.engine.engine.Engine` (or anything with the
same attributes, see :class:`ServedEngine`) in a Starlette app. Every engine and tokenizer call
runs on ONE worker thread (:class:`EngineWorker`), off the event loop, in priority order
(``priority`` in the body; lower is served first, FIFO within a priority). At most
``max_queue`` requests wait for it; one more gets ``503`` with ``Retry-After``.

Endpoints (bodies are JSON; every non-2xx body is ``{"error": "<message>"}``)
-----------------------------------------------------------------------------
``POST /score``, ``POST /v1/score``
    ``{model, prompt: [int], score_ranges: [[s, e]], logprobs?, priority?, multi_modal_data?}``
    → ``{"scores": [{"range_index": i, "total_logprob": x}, ...]}`` (the seed protocol).
``POST /score/batch``
    ``{model, requests: [{prompt, score_ranges}, ...], priority?}``
    → ``{"results": [{"scores": [...]} | {"error": "..."}, ...]}``; one ``engine.score_many``.
``GET /health``
    ``{"status": "ok", "model", "max_model_len", "vocab_size", "capabilities", "server"}``.
``GET /v1/models``
    OpenAI model list with one card (``owned_by: "scoring_kit"``, ``max_model_len``).
``POST /completions``, ``POST /v1/completions``
    OpenAI/vLLM text completion over a token-id (or string) prompt, with vLLM's
    ``prompt_logprobs`` (entry 0 ``null``; entry t ``{"<id>": {logprob, rank, decoded_token}}``).
``POST /generate``
    SGLang's native API: ``{input_ids | text, sampling_params, return_logprob,
    logprob_start_len, top_logprobs_num?, return_text_in_logprobs?}`` →
    ``{text, output_ids, meta_info: {prompt_tokens, completion_tokens, cached_tokens,
    finish_reason, input_token_logprobs, output_token_logprobs, ...}}``.
``POST /tokenize``, ``POST /detokenize``
    vLLM shapes: ``{prompt}`` → ``{tokens, count, max_model_len, token_strs}``;
    ``{tokens}`` → ``{prompt}``.
``POST /train``, ``GET /train/status[?job_id=...]``
    Records training jobs durably (:class:`~scoring_kit.server.trainqueue.TrainQueue`) in
    ``train_dir`` (default :func:`~scoring_kit.server.trainqueue.default_train_dir`).

Top-k alternatives (vLLM ``prompt_logprobs > 0``, SGLang ``top_logprobs_num > 0``) need the
full next-token distribution, which the engine contract does not expose; the server behaves
like a vLLM server started with ``--max-logprobs 0`` and rejects them with vLLM's message. For
the same reason ``rank`` is ``null`` in ``prompt_logprobs`` entries.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import orjson

from .._exceptions import ConfigError, MissingDependencyError, PromptError, ScoringError, ServerBusy
from .._types import FloatArray, Span
from ..wire import VLLM_NEG_INF, validate_score_request

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _msg = "the scoring_kit server needs starlette and uvicorn: pip install 'scoring_kit[engine]'"
    raise MissingDependencyError(_msg) from _exc

from ._http import RequestError as _HTTPError
from ._http import error_response as _error
from ._http import json_response as _json
from .auth import BearerAuth
from .worker import MAX_QUEUE, EngineWorker, QueueFull

if TYPE_CHECKING:
    from ..context.tokenizer import Tokenizer
    from .trainqueue import TrainQueue

__all__ = [
    "CAPABILITIES",
    "MAX_BODY_BYTES",
    "MAX_PROMPT_LOGPROBS",
    "MAX_QUEUE",
    "EngineWorker",
    "QueueFull",
    "ServedEngine",
    "create_app",
    "prompt_token_logprobs",
]

log = logging.getLogger("scoring_kit.server")

T = TypeVar("T")

#: Default request-body limit (bytes).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Largest top-k for ``prompt_logprobs`` / ``top_logprobs_num`` (like vLLM ``--max-logprobs``).
MAX_PROMPT_LOGPROBS = 0
#: What ``GET /health`` advertises.
CAPABILITIES: tuple[str, ...] = (
    "score",
    "score_batch",
    "completions",
    "prompt_logprobs",
    "generate",
    "train",
)
#: What a span total of ``-inf`` is sent as (JSON has no infinity).
NEG_INF_TOTAL = -sys.float_info.max

SERVER_NAME = "scoring_kit"

_GENERATE_SAMPLING_KEYS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_token_ids",
    "skip_special_tokens",
    "sampling_seed",
)


class ServedEngine(Protocol):
    """What the server needs from an engine (:class:`~scoring_kit.engine.engine.Engine`)."""

    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def device(self) -> str: ...

    def score(self, prompt: Sequence[int], ranges: Sequence[Span]) -> FloatArray: ...

    def score_many(
        self, items: Sequence[tuple[Sequence[int], Sequence[Span]]]
    ) -> list[FloatArray | PromptError]: ...

    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> tuple[list[int], str]: ...


def prompt_token_logprobs(
    engine: ServedEngine, prompt: Sequence[int], *, start: int = 1
) -> FloatArray:
    """``log P(prompt[t] | prompt[:t])`` for every ``t`` in ``[max(start, 1), len(prompt))``.

    One ``engine.score`` call with single-token spans ``[t, t + 1)``: one prefill, logits at
    the scored rows only. Needs nothing beyond the engine contract.

    Parameters
    ----------
    engine
        The engine (called on the current thread).
    prompt
        Token ids.
    start
        First position wanted; position 0 has no prediction, so ``start < 1`` means 1.

    Returns
    -------
    FloatArray
        Shape ``(len(prompt) - max(start, 1),)`` (empty when there is nothing to score).
    """
    first = max(int(start), 1)
    if len(prompt) <= first:
        return np.empty(0, dtype=np.float64)
    ranges = [(t, t + 1) for t in range(first, len(prompt))]
    return np.asarray(engine.score(prompt, ranges), dtype=np.float64)


# --------------------------------------------------------------------------- helpers


_MISSING: Any = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON has no other types


def _show(value: Any) -> str:
    text = orjson.dumps(value, default=repr).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def _wrong_type(field: str, expected: str, value: Any) -> _HTTPError:
    return _HTTPError(
        400, f"field `{field}` must be {expected}, got {_type_name(value)} ({_show(value)})"
    )


def _field(body: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    if key in body:
        return body[key]
    if default is _MISSING:
        raise _HTTPError(400, f"missing required field `{where}{key}`")
    return default


def _int(
    body: Mapping[str, Any],
    key: str,
    *,
    where: str = "",
    default: Any = _MISSING,
    minimum: int | None = None,
    nullable: bool = False,
) -> Any:
    value = _field(body, key, where, default)
    if value is None and (nullable or default is None):
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type(where + key, "an integer", value)
    if minimum is not None and value < minimum:
        raise _HTTPError(400, f"field `{where}{key}` must be at least {minimum}, got {value}")
    return value


def _float(
    body: Mapping[str, Any],
    key: str,
    *,
    where: str = "",
    default: Any = _MISSING,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    value = _field(body, key, where, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _wrong_type(where + key, "a finite number", value)
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        op = ">" if lo_open else ">="
        raise _HTTPError(400, f"field `{where}{key}` must be {op} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise _HTTPError(400, f"field `{where}{key}` must be <= {hi:g}, got {v:g}")
    return v


def _bool(body: Mapping[str, Any], key: str, *, where: str = "", default: Any = _MISSING) -> bool:
    value = _field(body, key, where, default)
    if not isinstance(value, bool):
        raise _wrong_type(where + key, "a boolean", value)
    return value


def _object(body: Mapping[str, Any], key: str, *, where: str = "", default: Any = _MISSING) -> Any:
    value = _field(body, key, where, default)
    if value is None and default is None:
        return None
    if not isinstance(value, dict):
        raise _wrong_type(where + key, "an object", value)
    return value


def _token_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, list):
        raise _wrong_type(field, "an array of integer token ids", value)
    for i, x in enumerate(value):
        if not isinstance(x, int) or isinstance(x, bool):
            raise _wrong_type(f"{field}[{i}]", "an integer token id", x)
    return value


def _tokens(body: Mapping[str, Any], key: str, *, where: str = "", default: Any = _MISSING) -> Any:
    value = _field(body, key, where, default)
    if value is None and default is None:
        return None
    return _token_list(value, where + key)


def _check_vocab(ids: Sequence[int], field: str, vocab_size: int) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise _HTTPError(
                400,
                f"token id {t} at `{field}[{i}]` is outside the vocabulary [0, {vocab_size})",
            )


def _ranges(body: Mapping[str, Any], where: str) -> list[Span]:
    key = "score_ranges"
    value = _field(body, key, where, _MISSING)
    if not isinstance(value, list):
        raise _wrong_type(where + key, "an array of [start, end] pairs", value)
    out: list[Span] = []
    for i, r in enumerate(value):
        ok = isinstance(r, list) and len(r) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        if not ok:
            raise _wrong_type(f"{where}{key}[{i}]", "a [start, end] pair of integers", r)
        out.append((r[0], r[1]))
    return out


def _total(x: float) -> float:
    if math.isnan(x):
        msg = "the engine returned NaN for a span total"
        raise ScoringError(msg)
    return NEG_INF_TOTAL if x == -math.inf else float(x)


def _token_lp(x: float) -> float:
    if math.isnan(x):
        msg = "the engine returned NaN for a token log-probability"
        raise ScoringError(msg)
    return VLLM_NEG_INF if x == -math.inf else float(x)


def _top_k(value: int) -> int:
    """Map the OpenAI/vLLM/SGLang "no top-k" values (-1, 0) to the engine's 0."""
    return 0 if value <= 0 else value


# --------------------------------------------------------------------------- service


class _Service:
    """The endpoint handlers, bound to one engine, worker and (optional) train queue."""

    def __init__(
        self,
        engine: ServedEngine,
        *,
        worker: EngineWorker,
        max_body_bytes: int,
        train_dir: Path | None,
    ) -> None:
        self.engine = engine
        self.worker = worker
        self.max_body_bytes = max_body_bytes
        self.train_dir = train_dir
        self.train_queue: TrainQueue | None = None
        self.name = str(engine.name)
        self.vocab_size = int(engine.vocab_size)
        self.max_len = int(engine.max_len)

    # ---- plumbing

    def endpoint(
        self, fn: Callable[[Request], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                result = await fn(request)
            except _HTTPError as exc:
                return _error(exc.status, exc.message, exc.headers)
            except PromptError as exc:
                return _error(400, str(exc))
            except ServerBusy as exc:
                return _error(503, str(exc), {"Retry-After": "1"})
            except Exception as exc:
                log.exception("internal error in %s %s", request.method, request.url.path)
                return _error(500, f"internal error: {type(exc).__name__}: {exc}")
            return result if isinstance(result, Response) else _json(result)

        handler.__name__ = getattr(fn, "__name__", "handler")
        return handler

    async def body(self, request: Request) -> dict[str, Any]:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _HTTPError(400, f"invalid Content-Length header {declared!r}") from None
            if size > limit:
                raise _HTTPError(
                    413,
                    f"request body is {size} bytes, larger than the limit of {limit} bytes "
                    "(max_body_bytes)",
                )
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise _HTTPError(
                    413,
                    f"request body exceeds the limit of {limit} bytes (max_body_bytes): "
                    f"{len(buf)} bytes received so far",
                )
        if not buf.strip():
            raise _HTTPError(400, "request body is empty: expected a JSON object")
        try:
            value = orjson.loads(bytes(buf))
        except orjson.JSONDecodeError as exc:
            raise _HTTPError(400, f"malformed JSON body ({len(buf)} bytes): {exc}") from None
        if not isinstance(value, dict):
            raise _HTTPError(400, f"request body must be a JSON object, got {_type_name(value)}")
        return value

    def _model(self, body: Mapping[str, Any]) -> None:
        # Any model name is accepted (clients are configured with their own names), but it
        # must be a string when given.
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _wrong_type("model", "a string", model)

    def _priority(self, body: Mapping[str, Any]) -> int:
        value: int = _int(body, "priority", default=0, nullable=True) or 0
        return value

    def _no_images(self, body: Mapping[str, Any], where: str) -> None:
        mm = body.get("multi_modal_data")
        if mm is None:
            return
        if not isinstance(mm, dict):
            raise _wrong_type(where + "multi_modal_data", "an object", mm)
        count = 0
        for value in mm.values():
            if isinstance(value, list):
                count += len(value)
            elif value is not None:
                count += 1
        if count:
            kinds = ", ".join(sorted(str(k) for k in mm))
            raise _HTTPError(
                400,
                f"model {self.name} is text-only and cannot use images: `{where}multi_modal_data`"
                f" carries {count} item(s) ({kinds}); the limit is 0 — send the prompt "
                "without multi_modal_data",
            )

    def _score_request(self, body: Mapping[str, Any], where: str) -> tuple[list[int], list[Span]]:
        prompt = _tokens(body, "prompt", where=where)
        ranges = _ranges(body, where)
        lp = body.get("logprobs")
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool)):
            raise _wrong_type(where + "logprobs", "an integer", lp)
        self._no_images(body, where)
        validate_score_request(prompt, ranges, vocab_size=self.vocab_size, max_len=self.max_len)
        return prompt, ranges

    def _prompt_ids(self, ids: list[int], field: str, extra: int, extra_name: str) -> None:
        if not ids:
            raise _HTTPError(400, f"`{field}` is empty: at least 1 token is needed")
        _check_vocab(ids, field, self.vocab_size)
        if len(ids) + extra > self.max_len:
            raise _HTTPError(
                400,
                f"This model's maximum context length is {self.max_len} tokens. However, you "
                f"requested {len(ids) + extra} tokens ({len(ids)} in the prompt, {extra} in "
                f"{extra_name}). Please reduce the length of the prompt or {extra_name}.",
            )

    def _decoder(self, *, skip_special_tokens: bool = False) -> Callable[[int], str]:
        cache: dict[int, str] = {}
        tok = self.engine.tokenizer

        def one(tid: int) -> str:
            s = cache.get(tid)
            if s is None:
                s = cache[tid] = tok.decode([tid], skip_special_tokens=skip_special_tokens)
            return s

        return one

    # ---- /score, /v1/score, /score/batch

    async def score(self, request: Request) -> Any:
        body = await self.body(request)
        self._model(body)
        priority = self._priority(body)
        prompt, ranges = self._score_request(body, "")
        if not ranges:
            return {"scores": []}
        totals = await self.worker.run(lambda: self.engine.score(prompt, ranges), priority=priority)
        totals = np.asarray(totals, dtype=np.float64)
        if totals.shape != (len(ranges),):
            msg = f"engine returned {totals.shape} totals for {len(ranges)} ranges"
            raise ScoringError(msg)
        return {
            "scores": [
                {"range_index": i, "total_logprob": _total(x)}
                for i, x in enumerate(totals.tolist())
            ]
        }

    async def score_batch(self, request: Request) -> Any:
        body = await self.body(request)
        self._model(body)
        priority = self._priority(body)
        reqs = _field(body, "requests", "", _MISSING)
        if not isinstance(reqs, list):
            raise _wrong_type("requests", "an array of score requests", reqs)
        results: list[dict[str, Any] | None] = [None] * len(reqs)
        items: list[tuple[list[int], list[Span]]] = []
        slots: list[int] = []
        for i, item in enumerate(reqs):
            where = f"requests[{i}]."
            try:
                if not isinstance(item, dict):
                    raise _wrong_type(f"requests[{i}]", "an object", item)
                prompt, ranges = self._score_request(item, where)
            except _HTTPError as exc:
                results[i] = {"error": exc.message}
                continue
            except PromptError as exc:
                results[i] = {"error": f"requests[{i}]: {exc}"}
                continue
            if not ranges:
                results[i] = {"scores": []}
                continue
            items.append((prompt, ranges))
            slots.append(i)
        if items:
            outs = await self.worker.run(lambda: self.engine.score_many(items), priority=priority)
            if len(outs) != len(items):
                msg = f"engine.score_many returned {len(outs)} results for {len(items)} requests"
                raise ScoringError(msg)
            for j, (i, (_, ranges), out) in enumerate(zip(slots, items, outs, strict=True)):
                if isinstance(out, BaseException):
                    text = str(out)
                    text = text.removeprefix(f"item {j}: ")
                    results[i] = {"error": f"requests[{i}]: {text}"}
                    continue
                arr = np.asarray(out, dtype=np.float64)
                if arr.shape != (len(ranges),):
                    results[i] = {
                        "error": f"requests[{i}]: engine returned {arr.shape} totals "
                        f"for {len(ranges)} ranges"
                    }
                    continue
                results[i] = {
                    "scores": [
                        {"range_index": r, "total_logprob": _total(x)}
                        for r, x in enumerate(arr.tolist())
                    ]
                }
        return {"results": results}

    # ---- /health, /v1/models

    async def health(self, request: Request) -> Any:
        return {
            "status": "ok",
            "model": self.name,
            "max_model_len": self.max_len,
            "vocab_size": self.vocab_size,
            "capabilities": list(CAPABILITIES),
            "server": SERVER_NAME,
        }

    async def models(self, request: Request) -> Any:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": SERVER_NAME,
                    "root": self.name,
                    "parent": None,
                    "max_model_len": self.max_len,
                    "permission": [],
                }
            ],
        }

    # ---- /completions, /v1/completions

    async def completions(self, request: Request) -> Any:
        body = await self.body(request)
        self._model(body)
        priority = self._priority(body)
        raw = _field(body, "prompt", "", _MISSING)
        text_prompt: str | None = None
        ids: list[int] = []
        if isinstance(raw, str):
            if not raw:
                raise _HTTPError(400, "`prompt` is empty: at least 1 token is needed")
            text_prompt = raw
        elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
            if len(raw) != 1:
                raise _HTTPError(
                    400, f"only 1 prompt per request is supported, got {len(raw)} prompts"
                )
            ids = _token_list(raw[0], "prompt[0]")
        elif isinstance(raw, list):
            ids = _token_list(raw, "prompt")
        else:
            raise _wrong_type("prompt", "an array of token ids or a string", raw)
        max_tokens: int = _int(body, "max_tokens", default=16, nullable=True)
        if max_tokens is None:
            max_tokens = 16
        if max_tokens < 1:
            raise _HTTPError(400, f"max_tokens must be at least 1, got {max_tokens}")
        temperature = _float(body, "temperature", default=1.0, lo=0.0)
        top_p = _float(body, "top_p", default=1.0, lo=0.0, hi=1.0, lo_open=True)
        top_k: int = _int(body, "top_k", default=-1, minimum=-1)
        stop_ids: list[int] = _tokens(body, "stop_token_ids", default=None) or []
        _check_vocab(stop_ids, "stop_token_ids", self.vocab_size)
        skip_special = _bool(body, "skip_special_tokens", default=True)
        seed: int | None = _int(body, "seed", default=None)
        k: int | None = _int(body, "prompt_logprobs", default=None)
        if k is not None:
            if k < -1:
                raise _HTTPError(400, f"`prompt_logprobs` must be a positive value or -1, got {k}.")
            wanted = self.vocab_size if k == -1 else k
            if wanted > MAX_PROMPT_LOGPROBS:
                asked = f"-1 (the whole vocabulary, {wanted})" if k == -1 else str(k)
                raise _HTTPError(
                    400,
                    f"Requested prompt logprobs of {asked}, which is greater than max allowed: "
                    f"{MAX_PROMPT_LOGPROBS} (this server returns the prompt token's own logprob "
                    "only; send prompt_logprobs: 0)",
                )
        for key, ok in (("n", 1), ("best_of", 1)):
            v = body.get(key)
            if v is not None and v != ok:
                raise _HTTPError(400, f"`{key}` must be 1 on this server, got {_show(v)}")
        if body.get("stream"):
            raise _HTTPError(400, "streaming is not supported (`stream` must be false)")
        if body.get("echo"):
            raise _HTTPError(400, "`echo` is not supported; use prompt_logprobs instead")
        if body.get("logprobs") is not None:
            raise _HTTPError(
                400,
                "`logprobs` (sampled-token logprobs) is not supported, got "
                f"{_show(body.get('logprobs'))}; use prompt_logprobs for prompt tokens",
            )
        if body.get("stop"):
            raise _HTTPError(400, "stop strings (`stop`) are not supported; use stop_token_ids")
        if text_prompt is None:
            self._prompt_ids(ids, "prompt", max_tokens, "the completion")
        stops = frozenset(stop_ids)
        engine = self.engine

        def job() -> dict[str, Any]:
            prompt = ids if text_prompt is None else engine.tokenizer.encode(text_prompt)
            if text_prompt is not None:
                self._prompt_ids(prompt, "prompt", max_tokens, "the completion")
            plp: list[Any] | None = None
            if k is not None:
                lps = prompt_token_logprobs(engine, prompt).tolist()
                decode = self._decoder()
                plp = [None]
                for t in range(1, len(prompt)):
                    tid = prompt[t]
                    entry = {
                        "logprob": _token_lp(lps[t - 1]),
                        "rank": None,
                        "decoded_token": decode(tid),
                    }
                    plp.append({str(tid): entry})
            out, _ = engine.generate(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=_top_k(top_k),
                stop_token_ids=tuple(stop_ids),
                seed=seed,
            )
            out = [int(t) for t in out][:max_tokens]
            # The engine stops before a stop token and does not return it.
            stopped = len(out) < max_tokens
            text = engine.tokenizer.decode(out, skip_special_tokens=skip_special)
            finish = "stop" if stopped else "length"
            matched = next(iter(stops)) if stopped and len(stops) == 1 else None
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": matched,
                        "prompt_logprobs": plp,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(out),
                    "total_tokens": len(prompt) + len(out),
                },
            }

        return await self.worker.run(job, priority=priority)

    # ---- /generate (SGLang)

    async def generate(self, request: Request) -> Any:
        body = await self.body(request)
        priority = self._priority(body)
        ids: list[int] | None = _tokens(body, "input_ids", default=None)
        text_prompt = body.get("text")
        if ids is None:
            if text_prompt is None:
                raise _HTTPError(400, "missing required field `input_ids` (or `text`)")
            if not isinstance(text_prompt, str):
                raise _wrong_type("text", "a string", text_prompt)
            if not text_prompt:
                raise _HTTPError(400, "`text` is empty: at least 1 token is needed")
        else:
            text_prompt = None
        sp = _object(body, "sampling_params", default=None) or {}
        for key in sp:
            if key not in _GENERATE_SAMPLING_KEYS:
                expected = ", ".join(f"`{k}`" for k in _GENERATE_SAMPLING_KEYS)
                raise _HTTPError(400, f"unknown field `{key}`, expected one of {expected}")
        where = "sampling_params."
        max_new: int = _int(sp, "max_new_tokens", where=where, default=128, minimum=0)
        temperature = _float(sp, "temperature", where=where, default=1.0, lo=0.0)
        top_p = _float(sp, "top_p", where=where, default=1.0, lo=0.0, hi=1.0, lo_open=True)
        top_k: int = _int(sp, "top_k", where=where, default=-1, minimum=-1)
        stop_ids: list[int] = _tokens(sp, "stop_token_ids", where=where, default=None) or []
        _check_vocab(stop_ids, where + "stop_token_ids", self.vocab_size)
        skip_special = _bool(sp, "skip_special_tokens", where=where, default=True)
        seed: int | None = _int(sp, "sampling_seed", where=where, default=None)
        return_logprob = _bool(body, "return_logprob", default=False)
        start: int = _int(body, "logprob_start_len", default=-1, minimum=-1)
        top_n: int = _int(body, "top_logprobs_num", default=0, minimum=0)
        with_text = _bool(body, "return_text_in_logprobs", default=False)
        if top_n > MAX_PROMPT_LOGPROBS:
            raise _HTTPError(
                400,
                f"top_logprobs_num={top_n} is not supported: the limit is "
                f"{MAX_PROMPT_LOGPROBS} (this server returns each input token's own logprob "
                "in input_token_logprobs)",
            )
        if body.get("stream"):
            raise _HTTPError(400, "streaming is not supported (`stream` must be false)")

        def check(prompt: list[int]) -> None:
            self._prompt_ids(prompt, "input_ids", max_new, "max_new_tokens")
            if return_logprob and start > len(prompt):
                raise _HTTPError(
                    400,
                    f"req.logprob_start_len={start} is higher than the number of input tokens "
                    f"len(req.origin_input_ids)={len(prompt)}. Please use a smaller "
                    "logprob_start_len.",
                )

        if ids is not None:
            check(ids)
        stops = frozenset(stop_ids)
        engine = self.engine
        t0 = time.perf_counter()

        def job() -> dict[str, Any]:
            prompt = ids if ids is not None else engine.tokenizer.encode(str(text_prompt))
            if ids is None:
                check(prompt)
            n = len(prompt)
            out: list[int] = []
            if max_new > 0:
                out, _ = engine.generate(
                    prompt,
                    max_tokens=max_new,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=_top_k(top_k),
                    stop_token_ids=tuple(stop_ids),
                    seed=seed,
                )
                out = [int(t) for t in out][:max_new]
            text = engine.tokenizer.decode(out, skip_special_tokens=skip_special)
            if len(out) >= max_new:  # also max_new == 0: prefill only
                finish: dict[str, Any] = {"type": "length", "length": max_new}
            else:  # the engine stopped before a stop token (which it does not return)
                matched = next(iter(stops)) if len(stops) == 1 else None
                finish = {"type": "stop", "matched": matched}
            meta: dict[str, Any] = {
                "id": uuid.uuid4().hex,
                "prompt_tokens": n,
                "completion_tokens": len(out),
                "cached_tokens": 0,
                "finish_reason": finish,
            }
            if return_logprob:
                s = n if start == -1 else start
                full = prompt + out
                # One engine call scores the listed input tokens (positions s+1 .. n-1) and
                # the generated ones (n .. n+len(out)-1); position p is at lps[p - first].
                first = min(s + 1, n)
                lps = prompt_token_logprobs(engine, full, start=first).tolist()
                decode = self._decoder() if with_text else None

                def entry(lp: float | None, tid: int) -> list[Any]:
                    return [lp, tid, decode(tid) if decode is not None else None]

                inputs: list[list[Any]] = []
                if s < n:
                    inputs.append(entry(None, prompt[s]))
                    inputs.extend(
                        entry(_token_lp(lps[p - first]), prompt[p]) for p in range(s + 1, n)
                    )
                meta["input_token_logprobs"] = inputs
                meta["output_token_logprobs"] = [
                    entry(_token_lp(lps[n + j - first]), tid) for j, tid in enumerate(out)
                ]
            meta["e2e_latency"] = time.perf_counter() - t0
            return {"text": text, "output_ids": out, "meta_info": meta}

        return await self.worker.run(job, priority=priority)

    # ---- /tokenize, /detokenize

    async def tokenize(self, request: Request) -> Any:
        body = await self.body(request)
        self._model(body)
        if "messages" in body and "prompt" not in body:
            raise _HTTPError(400, "chat `messages` are not supported by /tokenize; send `prompt`")
        text = _field(body, "prompt", "", _MISSING)
        if not isinstance(text, str):
            raise _wrong_type("prompt", "a string", text)
        want_strs = _bool(body, "return_token_strs", default=False)
        _bool(body, "add_special_tokens", default=True)  # accepted; the tokenizer adds none
        tok = self.engine.tokenizer

        def job() -> dict[str, Any]:
            ids = [int(t) for t in tok.encode(text)]
            strs: list[str] | None = None
            if want_strs:
                hf = getattr(tok, "hf", None)
                if hf is not None and hasattr(hf, "convert_ids_to_tokens"):
                    strs = [str(s) for s in hf.convert_ids_to_tokens(ids)]
                else:
                    decode = self._decoder()
                    strs = [decode(t) for t in ids]
            return {
                "count": len(ids),
                "max_model_len": self.max_len,
                "tokens": ids,
                "token_strs": strs,
            }

        return await self.worker.run(job)

    async def detokenize(self, request: Request) -> Any:
        body = await self.body(request)
        self._model(body)
        ids: list[int] = _tokens(body, "tokens")
        _check_vocab(ids, "tokens", self.vocab_size)
        tok = self.engine.tokenizer
        text = await self.worker.run(lambda: tok.decode(ids, skip_special_tokens=False))
        return {"prompt": text}

    # ---- /train, /train/status

    def _queue(self) -> TrainQueue:
        # Created on first use, so that a server nobody sends /train to touches no folder.
        if self.train_queue is None:
            from .trainqueue import TrainQueue, default_train_dir

            self.train_queue = TrainQueue(self.train_dir or default_train_dir())
        return self.train_queue

    async def train(self, request: Request) -> Any:
        body = await self.body(request)
        data = _object(body, "training_data")
        samples = _field(data, "samples", "training_data.", _MISSING)
        if not isinstance(samples, list):
            raise _wrong_type("training_data.samples", "an array of samples", samples)
        if not samples:
            raise _HTTPError(400, "`training_data.samples` is empty: at least 1 sample is needed")
        clean: list[dict[str, Any]] = []
        for i, sample in enumerate(samples):
            where = f"training_data.samples[{i}]."
            if not isinstance(sample, dict):
                raise _wrong_type(f"training_data.samples[{i}]", "an object", sample)
            ctx: list[int] = _tokens(sample, "context_ids", where=where)
            cont: list[int] = _tokens(sample, "continuation_ids", where=where)
            if not cont:
                raise _HTTPError(
                    400, f"`{where}continuation_ids` is empty: at least 1 token is needed"
                )
            _check_vocab(ctx, where + "context_ids", self.vocab_size)
            _check_vocab(cont, where + "continuation_ids", self.vocab_size)
            total = len(ctx) + len(cont)
            if total > self.max_len:
                raise _HTTPError(
                    400,
                    f"`training_data.samples[{i}]` has {total} tokens ({len(ctx)} context + "
                    f"{len(cont)} continuation), longer than the model's context of "
                    f"{self.max_len} tokens",
                )
            clean.append(sample)
        tq = self._queue()
        job_id = await asyncio.to_thread(tq.submit, clean)
        return {"job_id": job_id, "status": "queued", "samples": len(clean)}

    async def train_status(self, request: Request) -> Any:
        tq = self._queue()
        job_id = request.query_params.get("job_id")
        if job_id is None:
            return {"jobs": await asyncio.to_thread(tq.jobs)}
        try:
            return await asyncio.to_thread(tq.status, job_id)
        except KeyError:
            raise _HTTPError(404, f"no training job with job_id {job_id!r}") from None

    # ---- the app

    def routes(self) -> list[Route]:
        ep = self.endpoint
        post = ["POST"]
        get = ["GET"]
        return [
            Route("/score", ep(self.score), methods=post),
            Route("/v1/score", ep(self.score), methods=post),
            Route("/score/batch", ep(self.score_batch), methods=post),
            Route("/health", ep(self.health), methods=get),
            Route("/v1/models", ep(self.models), methods=get),
            Route("/completions", ep(self.completions), methods=post),
            Route("/v1/completions", ep(self.completions), methods=post),
            Route("/generate", ep(self.generate), methods=post),
            Route("/tokenize", ep(self.tokenize), methods=post),
            Route("/detokenize", ep(self.detokenize), methods=post),
            Route("/train", ep(self.train), methods=post),
            Route("/train/status", ep(self.train_status), methods=get),
        ]


def create_app(
    engine: ServedEngine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int = MAX_QUEUE,
    train_dir: Path | str | None = None,
) -> Starlette:
    """Build the Starlette app that serves ``engine``.

    Parameters
    ----------
    engine
        The engine (see :class:`ServedEngine`); only ever called from one worker thread.
    api_key
        When set, every endpoint except ``GET /health`` needs ``authorization: Bearer
        <api_key>`` (compared in constant time; never logged).
    max_body_bytes
        Largest accepted request body; larger ones get ``413``.
    max_queue
        How many requests may wait for the engine; one more gets ``503`` + ``Retry-After``.
    train_dir
        Folder of the training-job queue (``POST /train``); ``None``:
        :func:`~scoring_kit.server.trainqueue.default_train_dir` (``$SCORING_KIT_TRAIN_DIR``
        or ``~/.local/share/scoring_kit/train``). The folder is created on the first
        ``/train`` request, not before.

    Returns
    -------
    Starlette
        The app; ``app.state.worker`` is its :class:`EngineWorker`, ``app.state.engine``
        the engine.
    """
    if max_body_bytes < 1:
        msg = f"max_body_bytes must be at least 1, got {max_body_bytes}"
        raise ConfigError(msg)
    worker = EngineWorker(max_queue=max_queue)
    service = _Service(
        engine,
        worker=worker,
        max_body_bytes=max_body_bytes,
        train_dir=Path(train_dir) if train_dir is not None else None,
    )
    endpoints = ", ".join(sorted({str(r.path) for r in service.routes()}))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"not found: {method} {path} is not an endpoint of this server ({endpoints})"
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            message = f"method {method} is not allowed on {path}; allowed: {allow}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            worker.close()

    middleware = []
    if api_key:
        middleware.append(Middleware(BearerAuth, api_key=api_key))
    app = Starlette(
        routes=service.routes(),
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.engine = engine
    app.state.service = service
    return app
