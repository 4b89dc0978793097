"""The one ablation step every flow shares: send ablated prompts, keep each outcome.

"Ablate → ``score_batch`` → a NaN row with its error" is what the exact matrix
(:mod:`.matrix`), the approximate matrices (:mod:`.approx`) and the windowed flows
(:mod:`.windows`) all do; they do it through :func:`ascore_ablations`, so a failed call
reads the same everywhere (:func:`describe_error`) and a scorer that answers with the wrong
number of scores is caught the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._exceptions import ScoringError
from .._types import FloatArray
from ..backends.base import Scorer
from ..wire import ScoreRequest

__all__ = ["Ablation", "ascore_ablations", "describe_error", "scorer_meta"]


def describe_error(exc: BaseException) -> str:
    """The text recorded for a failed call: its message (or type name), plus the HTTP
    status when the error carries one that the message does not already name."""
    status = getattr(exc, "status_code", None)
    text = str(exc) or type(exc).__name__
    return f"{text} (status {status})" if status is not None and str(status) not in text else text


def scorer_meta(scorer: Scorer) -> dict[str, Any]:
    """What ``scorer`` adds to a result's ``meta`` after a run: its ``run_meta()`` when it
    has one (a :class:`~scoring_kit.backends.replicas.ReplicaPool`: each replica's calls
    and every failure), else nothing."""
    facts = getattr(scorer, "run_meta", None)
    return dict(facts()) if callable(facts) else {}


@dataclass(frozen=True, slots=True)
class Ablation:
    """The outcome of one ablated call.

    Attributes
    ----------
    scores
        The per-response totals; all NaN (of the expected length) when the call failed.
    error
        None, or why the call failed (:func:`describe_error`, or the length mismatch).
    exc
        The exception the scorer gave for this call, when it gave one.
    """

    scores: FloatArray
    error: str | None = None
    exc: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def ascore_ablations(
    scorer: Scorer,
    requests: Sequence[ScoreRequest],
    *,
    sizes: Sequence[int] | int,
    lead: Sequence[ScoreRequest] = (),
) -> tuple[list[FloatArray | BaseException], list[Ablation]]:
    """Score ``lead + requests`` in one batch; each ablated call becomes an
    :class:`Ablation` outcome (a failure is a NaN row with its error, never raised).

    Parameters
    ----------
    requests
        The ablated prompts.
    sizes
        How many scores each ablated call must return (one number for all, or one per
        request); a call that returns another number is a failure, recorded as such.
    lead
        Requests sent first in the same batch (the baseline, so a prefix cache is warm);
        their raw outcomes (scores or the error) are returned for the caller to use or
        raise.

    Returns
    -------
    tuple
        ``(lead_outcomes, ablations)``, each in request order.
    """
    want = [sizes] * len(requests) if isinstance(sizes, int) else list(sizes)
    if len(want) != len(requests):
        msg = f"{len(want)} expected sizes for {len(requests)} ablated requests"
        raise ScoringError(msg)
    outs = await scorer.score_batch([*lead, *requests])
    heads: list[FloatArray | BaseException] = list(outs[: len(lead)])
    rows: list[Ablation] = []
    for out, m in zip(outs[len(lead) :], want, strict=True):
        if isinstance(out, BaseException):
            rows.append(Ablation(np.full(m, np.nan), describe_error(out), out))
        elif out.shape != (m,):
            got = out.shape[0] if out.ndim else 0
            error = f"ablated call returned {got} scores for {m} responses"
            rows.append(Ablation(np.full(m, np.nan), error))
        else:
            rows.append(Ablation(np.asarray(out, dtype=np.float64)))
    return heads, rows
