"""Which backend speaks to a URL: the probes, :class:`Detection` and :func:`detect_backend`.

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
7. ``POST /v1/completions`` with ``echo: true, logprobs: 0`` (:func:`echo_probe_body`): an
   answer with ``choices[0].logprobs.token_logprobs`` ``[null, <number>, ...]`` means
   ``"echo"``.

A vLLM server (by ``owned_by`` or ``/version``) whose ``/score`` passes probe 6 is a
patched, consciousness-style server and gets the cheaper ``"score"`` backend; the embedded
scoring_kit server speaks all protocols and also gets ``"score"``. A server whose
``POST /v1/completions`` echoes the prompt's ``token_logprobs`` gets ``"echo"``
(llama-cpp-python: ``owned_by "me"``, no ``/health``, ``/props`` or ``/version``; one that says
``owned_by "llamacpp"`` gets ``"echo"`` only when that probe passes, since llama.cpp's own
``llama-server`` also says so and refuses ``echo``). llama.cpp's ``llama-server``,
TensorRT-LLM and Ollama return no prompt-token logprobs and are refused with a one-line
:class:`~scoring_kit.BackendError`; when nothing is recognised the error lists every probe
and its answer.

This module knows the backends only by name (a :class:`Detection` says ``"score"``,
``"vllm"``, ...); :mod:`~scoring_kit.backends.auto` turns the name into a scorer through
the registry (:mod:`~scoring_kit.backends.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from .._exceptions import BackendUnavailable, DetectionError
from ._util import (
    compact_json,
    display_url,
    dumps_json,
    json_headers,
    loads_json,
    normalise_url,
    resolve_api_key,
)

__all__ = ["Detection", "DetectionError", "ProbeResult", "detect_backend", "probe"]

#: ``owned_by`` values (and probe names) of servers that cannot score prompt tokens.
_UNSUPPORTED = {
    "llamacpp": "llama.cpp server",
    "llama.cpp": "llama.cpp server",
    "tensorrt_llm": "TensorRT-LLM (trtllm-serve)",
    "ollama": "Ollama",
}

_PROBE_BODY_PROMPT = [1, 2, 3]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one detection probe answered: ``status`` (``None`` when nothing answered)."""

    method: str
    path: str
    status: int | None
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.body is not None

    def describe(self) -> str:
        """One line: ``GET /v1/models → 404 {"detail":"Not Found"}``."""
        head = f"{self.method} {self.path} → "
        if self.status is None:
            return head + (self.error or "no answer")
        extra = ""
        if self.body is not None:
            text = compact_json(self.body)
            extra = " " + (text if len(text) <= 120 else text[:120] + "…")
        elif self.error:
            extra = f" ({self.error})"
        return f"{head}{self.status}{extra}"


async def probe(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    path: str,
    *,
    body: Any = None,
) -> ProbeResult:
    """One request, no retries; never raises for HTTP or transport failures."""
    content = dumps_json(body) if body is not None else None
    headers = {"content-type": "application/json"} if content is not None else None
    try:
        resp = await client.request(method, url, content=content, headers=headers)
    except httpx.HTTPError as exc:
        return ProbeResult(method, path, None, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    try:
        data = loads_json(resp.content) if resp.content else None
    except ValueError:
        return ProbeResult(method, path, resp.status_code, error="body is not JSON")
    return ProbeResult(method, path, resp.status_code, data)


#: A text prompt for the detection probe (text: every echo server takes it).
ECHO_PROBE_PROMPT = "Hello, world"


def echo_probe_body(model: str | None) -> dict[str, Any]:
    """The body :func:`detect_backend` sends to tell an echo server."""
    return {
        "model": model,
        "prompt": ECHO_PROBE_PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 0,
        "stream": False,
    }


def is_echo_answer(status: int | None, body: Any) -> bool:
    """HTTP 200 whose ``choices[0].logprobs.token_logprobs`` starts ``[null, <number>, ...]``."""
    if status != 200 or not isinstance(body, Mapping):
        return False
    try:
        values = body["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        return False
    return (
        isinstance(values, list)
        and len(values) >= 2
        and values[0] is None
        and isinstance(values[1], int | float)
        and not isinstance(values[1], bool)
    )


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
    headers = json_headers(key)

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

        async def echo_probe(model: str | None) -> ProbeResult:
            res = await probe(client, "POST", root + "/v1/completions", "/v1/completions",
                              body=echo_probe_body(model))
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
        if owned in ("llamacpp", "llama.cpp"):
            # llama.cpp's llama-server refuses echo; a server that answers it (an OpenAI
            # layer over llama.cpp reporting the same owner) is scored with the echo backend
            echo = await echo_probe(model)
            if is_echo_answer(echo.status, echo.body):
                reason = (f"GET /v1/models: owned_by {owned!r}, and POST /v1/completions "
                          "echoes the prompt's token_logprobs (echo + logprobs)")
                return found("echo", reason, model, mml)
            raise _unsupported(_UNSUPPORTED[owned], shown, probes)
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
        echo = await echo_probe(model)
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
