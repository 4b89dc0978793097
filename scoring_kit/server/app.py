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

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, MissingDependencyError, PromptError, ServerBusy

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

from . import protocol_openai, protocol_score, protocol_sglang, protocol_train
from ._http import RequestError, error_response, json_response
from .auth import BearerAuth
from .params import MAX_PROMPT_LOGPROBS
from .protocol_score import CAPABILITIES
from .service import MAX_BODY_BYTES, ServedEngine, Service, prompt_token_logprobs
from .worker import MAX_QUEUE, EngineWorker, QueueFull

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

_Handler = Callable[[Service, Request], Awaitable[Any]]

#: (path, handler, method) of every endpoint, in the order they are matched.
_ROUTES: tuple[tuple[str, _Handler, str], ...] = (
    ("/score", protocol_score.score, "POST"),
    ("/v1/score", protocol_score.score, "POST"),
    ("/score/batch", protocol_score.score_batch, "POST"),
    ("/health", protocol_score.health, "GET"),
    ("/v1/models", protocol_openai.models, "GET"),
    ("/completions", protocol_openai.completions, "POST"),
    ("/v1/completions", protocol_openai.completions, "POST"),
    ("/generate", protocol_sglang.generate, "POST"),
    ("/tokenize", protocol_openai.tokenize, "POST"),
    ("/detokenize", protocol_openai.detokenize, "POST"),
    ("/train", protocol_train.train, "POST"),
    ("/train/status", protocol_train.train_status, "GET"),
)


def _endpoint(svc: Service, fn: _Handler) -> Callable[[Request], Awaitable[Response]]:
    """``fn(svc, request)`` as a Starlette endpoint that answers every failure as JSON."""

    async def handler(request: Request) -> Response:
        try:
            result = await fn(svc, request)
        except RequestError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except PromptError as exc:
            return error_response(400, str(exc))
        except ServerBusy as exc:
            return error_response(503, str(exc), {"Retry-After": "1"})
        except Exception as exc:
            log.exception("internal error in %s %s", request.method, request.url.path)
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        return result if isinstance(result, Response) else json_response(result)

    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


def _routes(svc: Service) -> list[Route]:
    return [Route(path, _endpoint(svc, fn), methods=[method]) for path, fn, method in _ROUTES]


def _exception_handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Starlette's own refusals (404, 405) and uncaught errors, answered in the JSON shape."""
    endpoints = ", ".join(sorted({path for path, _, _ in _ROUTES}))

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
        return error_response(exc.status_code, message, exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    return {HTTPException: http_error, Exception: internal_error}


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
    service = Service(
        engine,
        worker=worker,
        max_body_bytes=max_body_bytes,
        train_dir=Path(train_dir) if train_dir is not None else None,
    )

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
        routes=_routes(service),
        middleware=middleware,
        exception_handlers=_exception_handlers(),
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.engine = engine
    app.state.service = service
    return app
