"""Hand candidates to a server's ``/train`` and remember what was trained."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .._exceptions import ScoringError
from .finetune import FinetuneCandidate
from .store import TrainedSet

__all__ = ["TrainData", "Trainer", "asend_to_train", "send_to_train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainData:
    """One sample for ``/train``."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    timestamp_ns: int

    @classmethod
    def from_candidate(cls, c: FinetuneCandidate) -> TrainData:
        return cls(c.context_ids, c.continuation_ids, c.timestamp_ns)


@runtime_checkable
class Trainer(Protocol):
    """Anything that can post samples to ``/train`` (e.g. :class:`ScoreClient`)."""

    async def train(self, samples: list[dict[str, list[int]]]) -> str: ...


async def asend_to_train(
    samples: Sequence[TrainData | FinetuneCandidate],
    client: Trainer,
    trained: TrainedSet | None = None,
) -> str:
    """Post ``samples`` to ``/train``; return the job id.

    The trained set is marked only after the server accepted the job (one locked, atomic
    update for all samples).
    """
    if not samples:
        raise ScoringError("no samples to train")
    data = [s if isinstance(s, TrainData) else TrainData.from_candidate(s) for s in samples]
    body = [
        {"context_ids": list(d.context_ids), "continuation_ids": list(d.continuation_ids)}
        for d in data
    ]
    job_id = await client.train(body)
    (trained or TrainedSet()).mark(d.timestamp_ns for d in data)
    log.info("[finetune] sent %d samples, job_id=%s", len(data), job_id)
    return job_id


def send_to_train(
    samples: Sequence[TrainData | FinetuneCandidate],
    client: Trainer,
    trained: TrainedSet | None = None,
) -> str:
    """Synchronous :func:`asend_to_train`."""
    from .._sync import run_sync

    return run_sync(asend_to_train(samples, client, trained))
