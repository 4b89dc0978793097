"""The SGLang dialect: ``POST /generate``.

``{input_ids | text, sampling_params, return_logprob, logprob_start_len, top_logprobs_num?,
return_text_in_logprobs?}`` → ``{text, output_ids, meta_info: {prompt_tokens,
completion_tokens, cached_tokens, finish_reason, input_token_logprobs,
output_token_logprobs, e2e_latency, ...}}``. Logprob entries are SGLang's
``[logprob, token_id, text | null]``; the first listed input token has no logprob (``null``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .params import GenerateParams
from .service import Service, engine_top_k, prompt_token_logprobs, token_logprob

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["generate"]

_Entry = list[Any]


async def generate(svc: Service, request: Request) -> Any:
    """``POST /generate``: generate (or only prefill) and list token logprobs."""
    p = GenerateParams.parse(await svc.body(request), svc.limits)
    t0 = time.perf_counter()
    return await svc.worker.run(lambda: _generate(svc, p, t0), priority=p.priority)


def _generate(svc: Service, p: GenerateParams, t0: float) -> dict[str, Any]:
    """The answer, on the worker thread (``t0``: when the request was parsed)."""
    engine = svc.engine
    prompt: Sequence[int]
    if isinstance(p.prompt, str):
        prompt = engine.tokenizer.encode(p.prompt)
        p.check_prompt(prompt, svc.limits)
    else:
        prompt = list(p.prompt)
    max_new = p.max_new_tokens
    out: list[int] = []
    if max_new > 0:
        out, _ = engine.generate(
            prompt,
            max_tokens=max_new,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=engine_top_k(p.top_k),
            stop_token_ids=p.stop_token_ids,
            seed=p.seed,
        )
        out = [int(t) for t in out][:max_new]
    text = engine.tokenizer.decode(out, skip_special_tokens=p.skip_special_tokens)
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "prompt_tokens": len(prompt),
        "completion_tokens": len(out),
        "cached_tokens": 0,
        "finish_reason": _finish_reason(p, out),
    }
    if p.return_logprob:
        meta.update(_token_logprobs(svc, p, prompt, out))
    meta["e2e_latency"] = time.perf_counter() - t0
    return {"text": text, "output_ids": out, "meta_info": meta}


def _finish_reason(p: GenerateParams, out: Sequence[int]) -> dict[str, Any]:
    if len(out) >= p.max_new_tokens:  # also max_new_tokens == 0: prefill only
        return {"type": "length", "length": p.max_new_tokens}
    # the engine stopped before a stop token (which it does not return)
    stops = frozenset(p.stop_token_ids)
    return {"type": "stop", "matched": next(iter(stops)) if len(stops) == 1 else None}


def _token_logprobs(
    svc: Service, p: GenerateParams, prompt: Sequence[int], out: Sequence[int]
) -> dict[str, list[_Entry]]:
    """``input_token_logprobs`` (from ``logprob_start_len``) and ``output_token_logprobs``."""
    n = len(prompt)
    s = n if p.logprob_start_len == -1 else p.logprob_start_len
    # One engine call scores the listed input tokens (positions s+1 .. n-1) and the generated
    # ones (n .. n+len(out)-1); position q is at lps[q - first].
    first = min(s + 1, n)
    lps = prompt_token_logprobs(svc.engine, [*prompt, *out], start=first).tolist()
    decode: Callable[[int], str] | None = svc.decoder() if p.return_text_in_logprobs else None

    def entry(lp: float | None, tid: int) -> _Entry:
        return [lp, tid, decode(tid) if decode is not None else None]

    inputs: list[_Entry] = []
    if s < n:
        inputs.append(entry(None, prompt[s]))
        inputs.extend(entry(token_logprob(lps[q - first]), prompt[q]) for q in range(s + 1, n))
    outputs = [entry(token_logprob(lps[n + j - first]), tid) for j, tid in enumerate(out)]
    return {"input_token_logprobs": inputs, "output_token_logprobs": outputs}
