"""``POST /train`` and ``GET /train/status[?job_id=...]``: training jobs recorded durably.

The jobs go to a :class:`~scoring_kit.server.trainqueue.TrainQueue` in the service's
``train_dir``; file work runs in a thread, never on the event loop or the engine worker.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ._fields import RequestError
from .params import TrainParams
from .service import Service

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["train", "train_status"]


async def train(svc: Service, request: Request) -> Any:
    """``POST /train``: record one job; answers its ``job_id``."""
    p = TrainParams.parse(await svc.body(request), svc.limits)
    tq = svc.train_queue()
    job_id = await asyncio.to_thread(tq.submit, list(p.samples))
    return {"job_id": job_id, "status": "queued", "samples": len(p.samples)}


async def train_status(svc: Service, request: Request) -> Any:
    """``GET /train/status``: one job's record, or every job without ``job_id``."""
    tq = svc.train_queue()
    job_id = request.query_params.get("job_id")
    if job_id is None:
        return {"jobs": await asyncio.to_thread(tq.jobs)}
    try:
        return await asyncio.to_thread(tq.status, job_id)
    except KeyError:
        raise RequestError(404, f"no training job with job_id {job_id!r}") from None
