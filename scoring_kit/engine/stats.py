"""The engine's cost counters (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["EngineStats"]


@dataclass(slots=True)
class EngineStats:
    """What the engine has computed since the last :meth:`Engine.reset_stats`.

    Attributes
    ----------
    calls : int
        Requests handled (each item of ``score_many`` counts, and each ``generate``).
    forward_tokens : int
        Real tokens pushed through the transformer (padding excluded).
    logit_rows : int
        Rows of the LM head computed (one per scored token not reused from a cached prefix).
    cache_hits_tokens : int
        Prompt tokens whose KV came from a cached prefix instead of being recomputed.
    reused_logprobs : int
        Scored tokens whose log-probability was taken from a cached prefix.
    pad_tokens : int
        Padding tokens pushed through the transformer by batched suffix passes.
    forward_passes : int
        Calls of the base transformer (one per chunk per batch).
    seconds : float
        Wall time spent holding the model.
    """

    calls: int = 0
    forward_tokens: int = 0
    logit_rows: int = 0
    cache_hits_tokens: int = 0
    reused_logprobs: int = 0
    pad_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def copy(self) -> EngineStats:
        """A snapshot of these counters."""
        return EngineStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, other: EngineStats) -> EngineStats:
        """Counter-wise difference ``self - other`` (the cost of what ran in between)."""
        return EngineStats(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def add(self, other: EngineStats) -> None:
        """Add ``other``'s counters to these, in place."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
