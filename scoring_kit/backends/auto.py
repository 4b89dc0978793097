"""Pick a scorer for a URL: probe the server and build the matching backend.

:func:`detect_backend` asks, one request each and no retries, in this order:

1. ``GET /v1/models``: ``owned_by`` names the server (``"scoring_kit"``, ``"vllm"``,
   ``"sglang"``, ``"tensorrt_llm"``, ``"llamacpp"``); also the model id and
   ``max_model_len``.
2. ``GET /version`` (vLLM answers ``{"version": ...}``).
3. ``GET /model_info``, else ``GET /get_model_info`` (SGLang: ``{"model_path": ...}``).
4. ``GET /health`` with ``"server": "scoring_kit"``.
5. ``GET /props`` (llama.cpp) and ``GET /api/tags`` (Ollama).
6. ``POST {base_url}/score`` with a three-token body, trusted only on HTTP 200 with
   ``scores[].total_logprob``. vLLM's own ``/score`` (cross-encoder ``text_1``/``text_2``:
   404 on generative models in new releases, 400 in old ones) and SGLang's ``/v1/score``
   never pass.

A vLLM server (by ``owned_by`` or ``/version``) whose ``/score`` passes probe 6 is a
patched, consciousness-style server and gets the cheaper ``"score"`` backend; the embedded
scoring_kit server speaks all protocols and also gets ``"score"``. llama.cpp, TensorRT-LLM
and Ollama return no prompt-token logprobs and are refused with a one-line
:class:`~scoring_kit.BackendError`; when nothing is recognised the error lists every probe
and its answer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from .._exceptions import BackendError, BackendUnavailable
from ._common import ProbeResult, display_url, normalise_url, probe, resolve_api_key
from .echo import EchoScorer, echo_probe_body, is_echo_answer
from .http import ScoreClient
from .sglang import SGLangScorer
from .vllm import VLLMScorer

if TYPE_CHECKING:
    from .base import Scorer

__all__ = [
    "BACKENDS",
    "Detection",
    "DetectionError",
    "amake_scorer",
    "detect_backend",
    "make_scorer",
]

logger = logging.getLogger("scoring_kit.backends.auto")

#: Names accepted by :func:`make_scorer`.
BACKENDS = ("auto", "score", "vllm", "sglang", "echo", "local")

#: ``owned_by`` values (and probe names) of servers that cannot score prompt tokens.
_UNSUPPORTED = {
    "llamacpp": "llama.cpp server",
    "llama.cpp": "llama.cpp server",
    "tensorrt_llm": "TensorRT-LLM (trtllm-serve)",
    "ollama": "Ollama",
}

_PROBE_BODY_PROMPT = [1, 2, 3]


@dataclass(frozen=True, slots=True)
class Detection:
    """What :func:`detect_backend` found.

    Attributes
    ----------
    backend
        ``"score"``, ``"vllm"``, ``"sglang"`` or ``"local"``.
    reason
        Which probe decided, in words.
    model
        Model id the server reported, if any.
    max_model_len
        Context length the server reported, if any.
    probes
        One line per probe made: ``GET /v1/models → 200 {...}``.
    """

    backend: str
    reason: str
    model: str | None = None
    max_model_len: int | None = None
    probes: tuple[str, ...] = ()


class DetectionError(BackendError):
    """No usable scoring backend at a URL; ``.probes`` lists each probe and its answer."""

    def __init__(self, msg: str, *, probes: tuple[str, ...] = ()) -> None:
        super().__init__(msg, backend=None)
        self.probes = probes


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        msg = f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}"
        raise ValueError(msg)


def _model_card(res: ProbeResult) -> tuple[str | None, str | None, int | None]:
    """``(owned_by, model id, max_model_len)`` of the first card of a ``/v1/models`` answer."""
    if not res.ok or not isinstance(res.body, Mapping):
        return None, None, None
    data = res.body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
        return None, None, None
    card: Mapping[str, Any] = data[0]
    owned = card.get("owned_by")
    model = card.get("id")
    mml = card.get("max_model_len")
    return (
        str(owned).lower() if isinstance(owned, str) else None,
        str(model) if isinstance(model, str) else None,
        mml if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0 else None,
    )


def _is_seed_score(res: ProbeResult) -> bool:
    """HTTP 200 with ``{"scores": [{"total_logprob": <number>}]}``: the seed's protocol."""
    if res.status != 200 or not isinstance(res.body, Mapping):
        return False
    scores = res.body.get("scores")
    if not isinstance(scores, list) or len(scores) != 1 or not isinstance(scores[0], Mapping):
        return False
    value = scores[0].get("total_logprob")
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unsupported(server: str, url: str, probes: list[ProbeResult]) -> DetectionError:
    msg = (
        f"{server} at {url} returns no prompt-token logprobs, so it cannot score spans; "
        "use vLLM, SGLang or a server with the /score endpoint"
    )
    return DetectionError(msg, probes=tuple(p.describe() for p in probes))


async def detect_backend(
    base_url: str,
    *,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: float = 10.0,
) -> Detection:
    """Probe ``base_url`` and say which backend speaks to it.

    Parameters
    ----------
    base_url
        Server URL, with or without ``/v1``.
    api_key
        Bearer token for servers that require one (``None``: ``$SCORING_KIT_API_KEY``).
    transport
        httpx transport replacing the network (tests).
    timeout
        Seconds per probe.

    Returns
    -------
    Detection

    Raises
    ------
    BackendUnavailable
        Nothing answers at ``base_url``.
    BackendError
        A server that returns no prompt-token logprobs (llama.cpp, TensorRT-LLM, Ollama),
        or nothing recognised (the message lists every probe and its answer).
    """
    base = normalise_url(base_url)
    root = normalise_url(base_url, strip_v1=True)
    shown = display_url(root)
    key = resolve_api_key(api_key)
    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"

    def redact(text: str) -> str:
        return text.replace(key, "<redacted>") if key else text

    probes: list[ProbeResult] = []
    async with httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(timeout), transport=transport
    ) as client:

        async def get(path: str) -> ProbeResult:
            res = await probe(client, "GET", root + path, path)
            probes.append(res)
            return res

        async def score_probe(model: str | None) -> ProbeResult:
            path = base[len(root) :] + "/score"
            body = {
                "model": model or "default",
                "prompt": _PROBE_BODY_PROMPT,
                "score_ranges": [[1, 3]],
                "logprobs": 1,
            }
            res = await probe(client, "POST", base + "/score", path, body=body)
            probes.append(res)
            return res

        def found(backend: str, reason: str, model: str | None, mml: int | None) -> Detection:
            return Detection(
                backend, reason, model, mml, tuple(redact(p.describe()) for p in probes)
            )

        models = await get("/v1/models")
        if models.status is None:
            msg = f"no server answers at {shown}: {redact(models.error or 'no answer')}"
            raise BackendUnavailable(msg)
        owned, model, mml = _model_card(models)
        if owned == "scoring_kit":
            return found("score", "GET /v1/models: owned_by 'scoring_kit'", model, mml)
        if owned in _UNSUPPORTED:
            raise _unsupported(_UNSUPPORTED[owned], shown, probes)
        if owned == "sglang":
            return found("sglang", "GET /v1/models: owned_by 'sglang'", model, mml)
        if owned == "vllm":
            sc = await score_probe(model)
            if _is_seed_score(sc):
                reason = "GET /v1/models: owned_by 'vllm', and POST /score speaks the seed protocol"
                return found("score", reason, model, mml)
            reason = f"GET /v1/models: owned_by 'vllm' (its /score is not the seed's: {sc.status})"
            return found("vllm", reason, model, mml)

        version = await get("/version")
        info = await get("/model_info")
        if not info.ok:
            info = await get("/get_model_info")
        if info.ok and isinstance(info.body, Mapping) and "model_path" in info.body:
            path = info.body.get("model_path")
            return found(
                "sglang",
                f"{info.path} answers with model_path (SGLang)",
                model or (str(path) if path is not None else None),
                mml,
            )
        if version.ok and isinstance(version.body, Mapping) and "version" in version.body:
            sc = await score_probe(model)
            if _is_seed_score(sc):
                reason = "GET /version answers (vLLM), and POST /score speaks the seed protocol"
                return found("score", reason, model, mml)
            return found("vllm", "GET /version answers {'version': ...} (vLLM)", model, mml)

        health = await get("/health")
        if (
            health.ok
            and isinstance(health.body, Mapping)
            and health.body.get("server") == "scoring_kit"
        ):
            return found("score", "GET /health: server 'scoring_kit'", model, mml)
        props = await get("/props")
        if props.ok:
            raise _unsupported(_UNSUPPORTED["llamacpp"], shown, probes)
        tags = await get("/api/tags")
        if tags.ok and isinstance(tags.body, Mapping) and "models" in tags.body:
            raise _unsupported(_UNSUPPORTED["ollama"], shown, probes)
        sc = await score_probe(model)
        if _is_seed_score(sc):
            return found("score", "POST /score answers with scores[].total_logprob", model, mml)
        echo = await probe(client, "POST", root + "/v1/completions", "/v1/completions",
                           body=echo_probe_body(model))
        probes.append(echo)
        if is_echo_answer(echo.status, echo.body):
            reason = "POST /v1/completions echoes the prompt's token_logprobs (echo + logprobs)"
            return found("echo", reason, model, mml)

    lines = [redact(p.describe()) for p in probes]
    hint = ""
    if any(p.status in (401, 403) for p in probes):
        hint = " Some probes were refused (401/403): pass api_key= or set $SCORING_KIT_API_KEY."
    msg = (
        f"no scoring backend recognised at {shown} (expected vLLM, SGLang or the /score "
        f"protocol). Probes: {'; '.join(lines)}.{hint}"
    )
    raise DetectionError(msg, probes=tuple(lines))


def _local(engine: Any, reason: str) -> Scorer:
    from .local import LocalScorer

    scorer: Scorer = LocalScorer(engine)
    with contextlib.suppress(AttributeError):  # a slotted LocalScorer keeps none
        scorer.detection = Detection("local", reason)  # type: ignore[attr-defined]
    logger.info("scoring backend 'local': %s", reason)
    return scorer


def _build(
    base_url: str,
    detection: Detection,
    *,
    model: str | None,
    api_key: str | None,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None,
) -> Scorer:
    name = model or detection.model
    scorer: ScoreClient | VLLMScorer | SGLangScorer | EchoScorer
    if detection.backend == "score":
        scorer = ScoreClient(
            base_url,
            model=name or "default",
            api_key=api_key,
            concurrency=concurrency,
            transport=transport,
        )
    elif detection.backend == "vllm":
        scorer = VLLMScorer(
            base_url,
            model=name,
            api_key=api_key,
            concurrency=concurrency,
            transport=transport,
            max_model_len=detection.max_model_len,
        )
    elif detection.backend == "echo":
        scorer = EchoScorer(base_url, model=name, api_key=api_key, concurrency=concurrency,
                            transport=transport, max_model_len=detection.max_model_len)
    else:
        scorer = SGLangScorer(
            base_url,
            model=name,
            api_key=api_key,
            concurrency=concurrency,
            transport=transport,
            max_model_len=detection.max_model_len,
        )
    scorer.detection = detection
    logger.info(
        "scoring backend %r for %s: %s", detection.backend, display_url(base_url), detection.reason
    )
    return scorer


def _local_or_none(base_url: str | None, backend: str, engine: Any) -> Scorer | None:
    """The local scorer when ``backend``/``base_url`` ask for it, else ``None``."""
    _check_backend(backend)
    if backend == "local":
        return _local(engine, "requested explicitly (backend='local')")
    if base_url is None:
        if backend != "auto":
            msg = f"backend {backend!r} needs a base_url; pass one, or use backend='local'"
            raise ValueError(msg)
        return _local(engine, "no base_url: the embedded engine in-process")
    return None


async def amake_scorer(
    base_url: str | None,
    *,
    backend: str = "auto",
    model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    transport: httpx.AsyncBaseTransport | None = None,
    engine: Any = None,
) -> Scorer:
    """Async :func:`make_scorer`, for use inside a running event loop."""
    local = _local_or_none(base_url, backend, engine)
    if local is not None:
        return local
    assert base_url is not None
    if backend == "auto":
        detection = await detect_backend(base_url, api_key=api_key, transport=transport)
    else:
        detection = Detection(backend, f"requested explicitly (backend={backend!r})")
    return _build(
        base_url,
        detection,
        model=model,
        api_key=api_key,
        concurrency=concurrency,
        transport=transport,
    )


def make_scorer(
    base_url: str | None,
    *,
    backend: str = "auto",
    model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    transport: httpx.AsyncBaseTransport | None = None,
    engine: Any = None,
) -> Scorer:
    """Build the scorer for ``base_url`` (probing the server when ``backend="auto"``).

    Parameters
    ----------
    base_url
        Server URL; ``None`` gives the embedded engine in-process (``LocalScorer``).
    backend
        ``"auto"`` (probe, see :func:`detect_backend`), ``"score"``, ``"vllm"``,
        ``"sglang"`` or ``"local"``.
    model
        Model name; by default the one the server reports (``"default"`` for ``/score``).
    api_key
        Bearer token; ``None`` reads ``$SCORING_KIT_API_KEY``.
    concurrency
        Requests in flight in ``score_batch``.
    transport
        httpx transport replacing the network (tests).
    engine
        A loaded :class:`~scoring_kit.engine.engine.Engine` for the local backend.

    Returns
    -------
    Scorer
        With ``.detection`` (a :class:`Detection`) saying what was chosen and why.

    Raises
    ------
    ValueError
        Unknown ``backend`` (the message lists the valid ones), or an HTTP backend with
        no ``base_url``.
    BackendError
        As for :func:`detect_backend`.

    Notes
    -----
    Detection runs through :func:`scoring_kit._sync.run_sync`, so this also works inside
    Jupyter; in async code prefer :func:`amake_scorer`. The scorer opens its connection
    pool lazily on the event loop that first uses it.
    """
    local = _local_or_none(base_url, backend, engine)
    if local is not None:
        return local
    assert base_url is not None
    if backend == "auto":
        from .._sync import run_sync

        detection = run_sync(detect_backend(base_url, api_key=api_key, transport=transport))
    else:
        detection = Detection(backend, f"requested explicitly (backend={backend!r})")
    return _build(
        base_url,
        detection,
        model=model,
        api_key=api_key,
        concurrency=concurrency,
        transport=transport,
    )
