"""The OpenAI/vLLM dialect: ``/completions`` (also ``/v1/completions``), ``GET /v1/models``,
``/tokenize`` and ``/detokenize``.

``prompt_logprobs`` follows vLLM: entry 0 is ``null``, entry ``t`` is
``{"<id>": {"logprob", "rank", "decoded_token"}}`` for the prompt token itself (``rank`` is
``null``: the engine contract gives no full distribution, so only ``prompt_logprobs: 0`` is
served, like a vLLM started with ``--max-logprobs 0``). ``-inf`` is sent as vLLM's ``-9999.0``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._fields import RequestError
from .params import CompletionParams, DetokenizeParams, TokenizeParams
from .protocol_score import SERVER_NAME
from .service import Service, engine_top_k, prompt_token_logprobs, token_logprob

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..context.tokenizer import Tokenizer

__all__ = ["completions", "detokenize", "models", "tokenize"]


async def models(svc: Service, request: Request) -> Any:
    """``GET /v1/models``: one model card."""
    return {
        "object": "list",
        "data": [
            {
                "id": svc.name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": SERVER_NAME,
                "root": svc.name,
                "parent": None,
                "max_model_len": svc.limits.max_len,
                "permission": [],
            }
        ],
    }


async def completions(svc: Service, request: Request) -> Any:
    """``POST /completions``, ``POST /v1/completions``: one text completion."""
    p = CompletionParams.parse(await svc.body(request), svc.limits)
    return await svc.worker.run(lambda: _complete(svc, p), priority=p.priority)


def _complete(svc: Service, p: CompletionParams) -> dict[str, Any]:
    """The completion, on the worker thread."""
    engine = svc.engine
    prompt: Sequence[int]
    if isinstance(p.prompt, str):
        prompt = engine.tokenizer.encode(p.prompt)
        p.check_prompt(prompt, svc.limits)
    else:
        prompt = list(p.prompt)
    plp = _prompt_logprobs(svc, prompt) if p.prompt_logprobs is not None else None
    out, _ = engine.generate(
        prompt,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=engine_top_k(p.top_k),
        stop_token_ids=p.stop_token_ids,
        seed=p.seed,
    )
    out = [int(t) for t in out][: p.max_tokens]
    text = engine.tokenizer.decode(out, skip_special_tokens=p.skip_special_tokens)
    return _completion_body(svc.name, p, prompt, out, text, plp)


def _prompt_logprobs(svc: Service, prompt: Sequence[int]) -> list[Any]:
    """vLLM's ``prompt_logprobs``: ``None``, then each prompt token's own logprob."""
    lps = prompt_token_logprobs(svc.engine, prompt).tolist()
    decode = svc.decoder()
    plp: list[Any] = [None]
    for t in range(1, len(prompt)):
        tid = prompt[t]
        entry = {"logprob": token_logprob(lps[t - 1]), "rank": None, "decoded_token": decode(tid)}
        plp.append({str(tid): entry})
    return plp


def _completion_body(
    name: str,
    p: CompletionParams,
    prompt: Sequence[int],
    out: Sequence[int],
    text: str,
    plp: list[Any] | None,
) -> dict[str, Any]:
    # The engine stops before a stop token and does not return it.
    stopped = len(out) < p.max_tokens
    stops = frozenset(p.stop_token_ids)
    matched = next(iter(stops)) if stopped and len(stops) == 1 else None
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "stop" if stopped else "length",
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


async def tokenize(svc: Service, request: Request) -> Any:
    """``POST /tokenize`` (vLLM): ``{prompt}`` or ``{messages}`` (rendered through the served
    model's chat template) → ``{tokens, count, max_model_len, token_strs}``."""
    p = TokenizeParams.parse(await svc.body(request), svc.limits)
    tok = svc.engine.tokenizer
    text = p.prompt
    if p.messages is not None:
        text = _render(tok, p.messages, generation=p.add_generation_prompt)

    def job() -> dict[str, Any]:
        hf = getattr(tok, "hf", None)
        if p.add_special_tokens and hf is not None:
            ids = [int(t) for t in hf.encode(text or "", add_special_tokens=True)]
        else:
            ids = [int(t) for t in tok.encode(text or "")]
        strs: list[str] | None = None
        if p.return_token_strs:
            if hf is not None and hasattr(hf, "convert_ids_to_tokens"):
                strs = [str(s) for s in hf.convert_ids_to_tokens(ids)]
            else:
                decode = svc.decoder()
                strs = [decode(t) for t in ids]
        return {
            "count": len(ids),
            "max_model_len": svc.limits.max_len,
            "tokens": ids,
            "token_strs": strs,
        }

    return await svc.worker.run(job)


def _render(tok: Tokenizer, messages: Sequence[dict[str, str]], *, generation: bool) -> str:
    """The served model's chat template over ``messages``: the tokenizer's own, else the
    kit's ChatML for a ChatML vocabulary; a model with neither gets a 400 (as in vLLM)."""
    from .._exceptions import ConfigError
    from ..context.chat_templates import load_template, render_chat

    own = getattr(tok, "chat_template", None) is not None
    if not own and tok.im_start_id is None:
        msg = (f"the served model {tok.name!r} has no chat template: send `prompt`, or render "
               "the messages on the client (scoring-kit --chat-template)")
        raise RequestError(400, msg)
    try:
        tpl = load_template("tokenizer" if own else "chatml", tok)
        return render_chat(tpl, tok, messages, add_generation_prompt=generation)
    except ConfigError as exc:
        raise RequestError(400, str(exc)) from exc


async def detokenize(svc: Service, request: Request) -> Any:
    """``POST /detokenize`` (vLLM): ``{tokens}`` → ``{prompt}``."""
    p = DetokenizeParams.parse(await svc.body(request), svc.limits)
    tok = svc.engine.tokenizer
    ids = list(p.tokens)
    text = await svc.worker.run(lambda: tok.decode(ids, skip_special_tokens=False))
    return {"prompt": text}
