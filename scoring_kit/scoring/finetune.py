"""Finetune scoring: which recent responses lean on memories the model has not internalized.

Removes every memory and scores the newest entries; responses whose log-probability drops
are training candidates (reference: ``score_finetune``, ``score_finetune_candidates``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeAlias

import numpy as np

from .._exceptions import ConfigError
from .._sync import sync_twin
from ..backends.base import DEFAULT_PRIORITY, CompletionRequest, Scorer
from ..context.model import (
    ContextState,
    Node,
    is_assistant,
    is_memory_node,
    render_branch_text,
    render_prior_context,
)
from .store import TrainedSet
from .windows import ascore_divergence

__all__ = [
    "DEFAULT_THRESHOLD",
    "AlternateParams",
    "FinetuneCandidate",
    "FinetuneStats",
    "TrainedArg",
    "ascore_finetune",
    "ascore_finetune_candidates",
    "branch_header",
    "dedup_key",
    "iter_finetune_candidates",
    "score_finetune",
    "score_finetune_candidates",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1e-7

#: The ``trained`` argument of the finetune flows: ``None`` (the default) = the default
#: :class:`TrainedSet` (``$SCORING_KIT_CACHE/trained-responses.json``, the file
#: :func:`~scoring_kit.scoring.send_to_train` marks), as the seed always loads its trained
#: set; a :class:`TrainedSet` = that file; ``False`` = skip nothing (explicit opt-out).
TrainedArg: TypeAlias = TrainedSet | Literal[False] | None


def trained_timestamps(trained: TrainedArg) -> set[int]:
    """The timestamps to skip for a ``trained`` argument (see :data:`TrainedArg`)."""
    if trained is False:
        return set()
    if trained is True or not (trained is None or isinstance(trained, TrainedSet)):
        msg = f"trained must be a TrainedSet, None (the default set) or False, got {trained!r}"
        raise ConfigError(msg)
    return (trained if trained is not None else TrainedSet()).load()


def _newest(n_entries: int, count: int) -> range:
    """The newest ``count`` entries, clamped to the conversation (the seed's
    ``len.saturating_sub(count)..len``)."""
    if count < 0:
        raise ConfigError(f"count must be >= 0 (entries to score), got {count}")
    return range(max(0, n_entries - count), n_entries)


@dataclass(frozen=True, slots=True)
class FinetuneCandidate:
    """One response worth training on, with what a reviewer needs to judge it."""

    entry_idx: int
    divergence: float
    response_text: str
    #: the last two user/assistant exchanges before the response, with roles
    prior_context: str
    #: token ids of everything before the response (the full context, memories included)
    context_ids: tuple[int, ...]
    #: token ids of the response (what is trained on)
    continuation_ids: tuple[int, ...]
    #: ns since the epoch; the trained-set key (see :func:`dedup_key` when unknown)
    timestamp_ns: int
    #: what the model says at that point with memories removed, if generated
    alternate_text: str | None = None
    alternate_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_ids"] = list(self.context_ids)
        d["continuation_ids"] = list(self.continuation_ids)
        return d


@dataclass(frozen=True, slots=True)
class FinetuneStats:
    """Closes a finetune run (reference: ``FinetuneScoringStats``)."""

    responses_considered: int
    above_threshold: int
    threshold: float
    max_divergence: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AlternateParams:
    """Generation settings for alternates (not specified upstream; ours)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 20
    seed: int | None = 0


def dedup_key(node: Node) -> int:
    """The trained-set key of a response: its timestamp in ns.

    A response with no timestamp (plain transcripts may omit it) gets a stable 63-bit key
    derived from its token ids, so dedup still works.
    """
    if node.timestamp_ns is not None:
        return node.timestamp_ns
    h = hashlib.blake2b(np.asarray(node.token_ids, dtype=np.int64).tobytes(), digest_size=8)
    return int.from_bytes(h.digest(), "big") & ((1 << 63) - 1)


def branch_header(node: Node) -> tuple[int, ...]:
    """The tokens that open an assistant branch (``<|im_start|>assistant\\n``)."""
    body = tuple(t for c in node.children for t in c.token_ids)
    ids = node.token_ids
    if body:
        n = len(body)
        for s in range(len(ids) - n + 1):
            if ids[s : s + n] == body:
                return ids[:s]
    return ids[: min(len(ids), 3)]


async def ascore_finetune(
    ctx: ContextState,
    scorer: Scorer,
    count: int,
    *,
    priority: int | None = DEFAULT_PRIORITY,
) -> list[tuple[int, float]]:
    """``(entry_index, divergence)`` of the responses among the newest ``count`` entries,
    scored with every memory removed, sorted by divergence descending (stable).

    A ``count`` above the number of entries scores them all (clamped as the seed does)."""
    entries = ctx.conversation
    rng = _newest(len(entries), count)
    positions = [i for i in rng if is_assistant(entries[i])]
    if not positions:
        return []
    divs, _, owners = await ascore_divergence(ctx, scorer, rng, is_memory_node, priority=priority)
    by_entry = dict(zip(owners, divs.tolist(), strict=True))
    results = [(i, float(by_entry.get(i, 0.0))) for i in positions]
    results.sort(key=lambda r: -r[1])
    return results


async def iter_finetune_candidates(
    ctx: ContextState,
    scorer: Scorer,
    *,
    count: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    trained: TrainedArg = None,
    alternates: bool = False,
    alternate_params: AlternateParams | None = None,
    stop_token_ids: tuple[int, ...] | None = None,
    stats_out: list[FinetuneStats] | None = None,
    priority: int | None = DEFAULT_PRIORITY,
) -> AsyncIterator[FinetuneCandidate]:
    """Yield candidates one at a time as they become ready; a stats record closes the run.

    ``count`` defaults to the newer half of the conversation entries (a larger ``count`` is
    clamped to the conversation). Candidates have divergence >= ``threshold`` and are neither
    already trained (by timestamp) nor blank. ``trained`` (see :data:`TrainedArg`) defaults
    to the default :class:`TrainedSet`, so responses :func:`send_to_train` marked are not
    proposed again; pass ``trained=False`` to propose them anyway.
    Alternates are generated with memories removed (errors recorded on the candidate). The
    final :class:`FinetuneStats` is appended to ``stats_out`` when given — also when the
    scoring call fails, with ``error`` set, before the error propagates.
    """
    entries = ctx.conversation
    n = len(entries) // 2 if count is None else count
    considered = sum(1 for i in _newest(len(entries), n) if is_assistant(entries[i]))
    done = trained_timestamps(trained)
    try:
        scores = await ascore_finetune(ctx, scorer, n, priority=priority)
    except Exception as exc:
        if stats_out is not None:
            stats_out.append(FinetuneStats(considered, 0, threshold, 0.0, str(exc)))
        raise
    max_div = max((d for _, d in scores), default=0.0)
    picked: list[tuple[int, float]] = []
    for idx, div in scores:
        if div < threshold:
            continue
        node = entries[idx]
        if dedup_key(node) in done:
            continue
        if not render_branch_text(node.children).strip():
            continue
        picked.append((idx, div))
    params = alternate_params or AlternateParams()
    for idx, div in picked:
        node = entries[idx]
        context_ids = tuple(ctx.wire_prompt(range(0, idx)).tokens.tolist())
        alt: str | None = None
        alt_err: str | None = None
        if alternates:
            prompt = ctx.wire_prompt(range(0, idx), is_memory_node).tokens.tolist()
            prompt.extend(branch_header(node))
            stops = stop_token_ids if stop_token_ids is not None else (node.token_ids[-2],)
            req = CompletionRequest(
                tuple(prompt),
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                stop_token_ids=tuple(stops),
                priority=priority,
                seed=params.seed,
            )
            try:
                alt = await scorer.complete(req)
            except Exception as exc:
                log.warning("[finetune] alternate generation failed: %s", exc)
                alt_err = str(exc) or type(exc).__name__
        yield FinetuneCandidate(
            entry_idx=idx,
            divergence=div,
            response_text=render_branch_text(node.children),
            prior_context=render_prior_context(entries, idx, 2),
            context_ids=context_ids,
            continuation_ids=tuple(node.token_ids),
            timestamp_ns=dedup_key(node),
            alternate_text=alt,
            alternate_error=alt_err,
        )
    if stats_out is not None:
        stats_out.append(FinetuneStats(considered, len(picked), threshold, max_div, None))


async def ascore_finetune_candidates(
    ctx: ContextState,
    scorer: Scorer,
    *,
    count: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    trained: TrainedSet | None = None,
    alternates: bool = False,
    alternate_params: AlternateParams | None = None,
    stop_token_ids: tuple[int, ...] | None = None,
    priority: int | None = DEFAULT_PRIORITY,
    on_candidate: Callable[[FinetuneCandidate], None] | None = None,
) -> tuple[list[FinetuneCandidate], FinetuneStats]:
    """All candidates plus the closing stats (``on_candidate`` sees each as it is ready);
    the other parameters are :func:`iter_finetune_candidates`'s."""
    stats: list[FinetuneStats] = []
    out: list[FinetuneCandidate] = []
    async for c in iter_finetune_candidates(
        ctx, scorer, count=count, threshold=threshold, trained=trained, alternates=alternates,
        alternate_params=alternate_params, stop_token_ids=stop_token_ids, stats_out=stats,
        priority=priority,
    ):
        out.append(c)
        if on_candidate is not None:
            on_candidate(c)
    return out, stats[-1]


score_finetune = sync_twin(ascore_finetune, "score_finetune")
score_finetune_candidates = sync_twin(ascore_finetune_candidates, "score_finetune_candidates")
