"""The seed protocol: ``POST /score`` (also ``/v1/score``), ``POST /score/batch``, ``GET /health``.

``/score`` answers ``{"scores": [{"range_index": i, "total_logprob": x}, ...]}``;
``/score/batch`` runs its requests in ONE ``engine.score_many`` call and answers
``{"results": [{"scores": [...]} | {"error": "..."}, ...]}``, one slot per request.

Validation happens once in this process: :mod:`~scoring_kit.server.params` checks the JSON
types and shapes, and the engine checks each request's spans, token ids and length with
:func:`~scoring_kit.wire.validate_score_request` as it scores it (so an empty ``score_ranges``
goes to the engine too, which checks the prompt and answers no totals).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._exceptions import ScoringError
from .._types import Span
from .params import BadItem, BatchParams, ScoreParams
from .service import Service, span_total

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["CAPABILITIES", "SERVER_NAME", "health", "score", "score_batch"]

#: What ``GET /health`` advertises.
CAPABILITIES: tuple[str, ...] = (
    "score",
    "score_batch",
    "completions",
    "prompt_logprobs",
    "generate",
    "train",
)
#: ``server`` in ``GET /health`` and ``owned_by`` in ``GET /v1/models``.
SERVER_NAME = "scoring_kit"


def _scores(totals: Any) -> list[dict[str, Any]]:
    return [{"range_index": i, "total_logprob": span_total(x)} for i, x in enumerate(totals)]


async def score(svc: Service, request: Request) -> Any:
    """``POST /score``, ``POST /v1/score``."""
    p = ScoreParams.parse(await svc.body(request), svc.limits)
    engine = svc.engine  # validates the request (a PromptError is answered with 400)
    totals = await svc.worker.run(lambda: engine.score(p.prompt, p.ranges), priority=p.priority)
    totals = np.asarray(totals, dtype=np.float64)
    if totals.shape != (len(p.ranges),):
        msg = f"engine returned {totals.shape} totals for {len(p.ranges)} ranges"
        raise ScoringError(msg)
    return {"scores": _scores(totals.tolist())}


async def score_batch(svc: Service, request: Request) -> Any:
    """``POST /score/batch``: one engine call for every well-formed request."""
    p = BatchParams.parse(await svc.body(request), svc.limits)
    results: list[dict[str, Any] | None] = [None] * len(p.requests)
    items: list[tuple[tuple[int, ...], tuple[Span, ...]]] = []
    slots: list[int] = []
    for i, item in enumerate(p.requests):
        if isinstance(item, BadItem):
            results[i] = {"error": item.message}
            continue
        items.append((item.prompt, item.ranges))
        slots.append(i)
    if items:
        engine = svc.engine  # validates each item: an invalid one comes back as its PromptError
        outs = await svc.worker.run(lambda: engine.score_many(items), priority=p.priority)
        if len(outs) != len(items):
            msg = f"engine.score_many returned {len(outs)} results for {len(items)} requests"
            raise ScoringError(msg)
        for j, (i, (_, ranges), out) in enumerate(zip(slots, items, outs, strict=True)):
            results[i] = _batch_result(i, j, len(ranges), out)
    return {"results": results}


def _batch_result(i: int, j: int, n_ranges: int, out: Any) -> dict[str, Any]:
    """Slot ``i`` of the answer from item ``j`` of the engine's ``score_many``."""
    if isinstance(out, BaseException):
        text = str(out).removeprefix(f"item {j}: ")
        return {"error": f"requests[{i}]: {text}"}
    arr = np.asarray(out, dtype=np.float64)
    if arr.shape != (n_ranges,):
        return {"error": f"requests[{i}]: engine returned {arr.shape} totals for {n_ranges} ranges"}
    return {"scores": _scores(arr.tolist())}


async def health(svc: Service, request: Request) -> Any:
    """``GET /health``: the model, its limits and what this server can do."""
    return {
        "status": "ok",
        "model": svc.name,
        "max_model_len": svc.limits.max_len,
        "vocab_size": svc.limits.vocab_size,
        "capabilities": list(CAPABILITIES),
        "server": SERVER_NAME,
    }
