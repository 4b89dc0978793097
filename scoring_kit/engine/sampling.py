"""Sampling a continuation with the KV cache: greedy, temperature, top-k and top-p (torch).

:func:`sample_tokens` prefills the prompt in chunks through :class:`~.forward.Forward`, then
draws one token at a time (:func:`sample`), feeding each back through the cache. The caller
holds the engine's lock and ``torch.inference_mode``; torch is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exceptions import PromptError
from .._types import IntArray

if TYPE_CHECKING:
    import torch

    from .forward import Forward

__all__ = ["check_sampling", "sample", "sample_tokens"]


def check_sampling(
    prompt_len: int, *, max_len: int, max_tokens: int, temperature: float, top_p: float
) -> None:
    """Raise :class:`PromptError` for a generation request the engine cannot run.

    The prompt must leave room within ``max_len`` when ``max_tokens > 0``; ``top_p`` must be
    in ``(0, 1]`` and ``temperature`` a number (``<= 0`` means greedy).
    """
    if prompt_len >= max_len and max_tokens > 0:
        raise PromptError(
            f"prompt has {prompt_len} tokens: no room to generate within the model's context of "
            f"{max_len} tokens"
        )
    if not 0.0 < top_p <= 1.0:
        raise PromptError(f"top_p must be in (0, 1], got {top_p}")
    if temperature != temperature:  # NaN
        raise PromptError("temperature is NaN")


def sample_tokens(
    fwd: Forward,
    tokens: IntArray,
    *,
    budget: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stops: set[int],
    seed: int | None,
) -> list[int]:
    """Up to ``budget`` sampled ids after ``tokens``, stopping before any of ``stops``.

    ``seed`` seeds a private ``torch.Generator`` (default: torch's global RNG).
    """
    import torch

    gen: torch.Generator | None = None
    if seed is not None:
        gen = torch.Generator(device=fwd.device)
        gen.manual_seed(int(seed))
    cache = fwd.new_cache()
    ids = torch.as_tensor(tokens, device=fwd.device)
    hidden: torch.Tensor | None = None
    for c0 in range(0, tokens.shape[0], fwd.chunk_tokens):
        c1 = min(c0 + fwd.chunk_tokens, tokens.shape[0])
        hidden = fwd.forward(ids[None, c0:c1], c0, cache)[0, -1]
    assert hidden is not None
    pos = int(tokens.shape[0])
    out: list[int] = []
    while True:
        logits = fwd.logits(hidden[None])[0]
        tok = sample(logits, temperature, top_p, top_k, gen)
        if tok in stops:
            break
        out.append(tok)
        if len(out) >= budget:
            break
        step = torch.tensor([[tok]], dtype=torch.long, device=fwd.device)
        hidden = fwd.forward(step, pos, cache)[0, -1]
        pos += 1
    return out


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    gen: torch.Generator | None,
) -> int:
    """One id from ``logits`` (1-D): argmax when ``temperature <= 0``, else top-k, top-p, draw."""
    import torch

    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before > top_p
        drop[0] = False
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
