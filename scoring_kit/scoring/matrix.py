"""The full N×M matrix flow: every memory ablated, every response scored (the reference's
``score_memories``), with NaN rows for failures, checkpoints and resume. The result,
:class:`~scoring_kit.scoring.memory_matrix.MemoryMatrix`, and its files live in
:mod:`scoring_kit.scoring.memory_matrix` (re-exported here).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._exceptions import ScoringError, StoreError
from .._sync import sync_twin
from .._types import FloatArray, PathLike
from ..backends.base import DEFAULT_PRIORITY, Scorer
from ..context.model import ContextState, WirePrompt, skip_key, visible_text
from .ablation import ascore_ablations, scorer_meta
from .divergence import divergence
from .memory_matrix import (
    MATRIX_COLUMNS,
    MATRIX_FILE_COLUMNS,
    MATRIX_FORMATS,
    MATRIX_SCHEMA,
    MATRIX_TEXT_COLUMNS,
    MemoryMatrix,
    read_matrix_frame,
)
from .writeback import LiveContext

__all__ = [
    "MATRIX_COLUMNS",
    "MATRIX_FILE_COLUMNS",
    "MATRIX_FORMATS",
    "MATRIX_SCHEMA",
    "MATRIX_TEXT_COLUMNS",
    "MemoryMatrix",
    "ascore_memories",
    "read_matrix_frame",
    "score_memories",
]

log = logging.getLogger(__name__)


def _prompt_hash(wp: WirePrompt) -> str:
    h = hashlib.blake2b(wp.tokens.tobytes(), digest_size=16)
    h.update(np.asarray(wp.ranges, dtype=np.int64).tobytes())
    return h.hexdigest()


def texts_of(ctx: ContextState, keys: Sequence[str], entries: Sequence[int]
              ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(memory_texts, response_texts)`` of a matrix scored on ``ctx``."""
    conv = ctx.conversation
    return (
        tuple(ctx.memory_text(k) for k in keys),
        tuple(visible_text(conv[e]) if 0 <= e < len(conv) else "" for e in entries),
    )


def _empty(ctx: ContextState, keys: Sequence[str], wp: WirePrompt | None) -> MemoryMatrix:
    m = 0 if wp is None else len(wp.entries)
    entries = tuple(wp.entries) if wp else ()
    memory_texts, response_texts = texts_of(ctx, keys, entries)
    return MemoryMatrix(
        keys=tuple(keys),
        entries=np.asarray(entries, dtype=np.int64),
        baseline=np.zeros(m),
        without=np.full((len(keys), m), np.nan),
        errors=(None,) * len(keys),
        memory_texts=memory_texts,
        response_texts=response_texts,
    )


ProgressFn = Callable[[int, int, str], None]


async def ascore_memories(
    ctx: ContextState,
    scorer: Scorer,
    *,
    keys: Sequence[str] | None = None,
    checkpoint: PathLike | None = None,
    chunk_size: int = 8,
    priority: int | None = DEFAULT_PRIORITY,
    progress: bool = True,
    on_row: Callable[[str, FloatArray | None, str | None], None] | None = None,
    write_back: LiveContext | None = None,
) -> MemoryMatrix:
    """Score how important each memory is to every response (the full N×M matrix).

    One baseline call and one call per memory (sent to the scorer in chunks of
    ``chunk_size`` with the baseline first, so prefix caches are reused). A memory whose call
    fails becomes a NaN row with its error recorded, never zeros. With ``checkpoint`` the
    matrix is saved atomically after every chunk; a rerun with the same checkpoint reuses the
    rows it holds and computes only the missing or failed ones.

    Parameters
    ----------
    ctx
        The context (every conversation entry is scored).
    scorer
        Any :class:`~scoring_kit.backends.Scorer`.
    keys
        Memories to ablate (default: all, identity first, first-seen order).
    checkpoint
        ``.npz`` path to save progress to and resume from.
    on_row
        Called with ``(key, divergence_row | None, error | None)`` as each row completes.
    write_back
        A :class:`~scoring_kit.scoring.writeback.LiveContext` that each row is written onto
        as it completes (the seed's per-response ``memory_scores``; a failed row removes the
        memory's stale values), and every row once more at the end (resumed rows too).
    """
    mem_keys = list(keys) if keys is not None else ctx.memory_keys()
    known = set(ctx.memory_keys())
    unknown = [k for k in mem_keys if k not in known]
    if unknown:
        msg = f"unknown memory key(s) {unknown}; this context has {sorted(known)}"
        raise ScoringError(msg)
    base_wp = ctx.wire_prompt()
    if not mem_keys or not base_wp.ranges:
        return _empty(ctx, mem_keys, base_wp)
    phash = _prompt_hash(base_wp)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    m = len(base_wp.ranges)
    base_req = base_wp.request(priority=priority)
    # the working arrays; the matrix is built from them once (and once per checkpoint)
    without = np.full((len(mem_keys), m), np.nan)
    errors: list[str | None] = [None] * len(mem_keys)
    prev = MemoryMatrix.load(ckpt) if ckpt is not None and ckpt.exists() else None
    if prev is not None:
        if prev.meta.get("prompt_hash") != phash or list(prev.keys) != mem_keys:
            msg = (
                f"checkpoint {ckpt} belongs to another context or key list "
                f"(prompt hash {prev.meta.get('prompt_hash')} != {phash}); "
                "delete it or pass another path"
            )
            raise StoreError(msg)
        baseline: FloatArray = prev.baseline
        without[:] = prev.without
        errors[:] = prev.errors
        meta = dict(prev.meta)
    else:
        baseline = await scorer.score(base_req)
        if baseline.shape != (m,):
            raise ScoringError(f"baseline returned {baseline.shape[0]} scores for {m} responses")
        meta = {
            "prompt_hash": phash,
            "prompt_tokens": len(base_wp),
            "backend": getattr(scorer, "name", type(scorer).__name__),
            "created": _dt.datetime.now(_dt.UTC).isoformat(),
        }
    memory_texts, response_texts = texts_of(ctx, mem_keys, base_wp.entries)

    def build() -> MemoryMatrix:
        return MemoryMatrix(
            keys=tuple(mem_keys), entries=np.asarray(base_wp.entries, dtype=np.int64),
            baseline=baseline, without=without, errors=tuple(errors), meta=meta,
            memory_texts=memory_texts, response_texts=response_texts,
        )

    if ckpt is not None and prev is None:
        build().save(ckpt, overwrite=True)
    todo = [
        i for i in range(len(mem_keys)) if errors[i] is not None or np.isnan(without[i]).any()
    ]
    bar = _progress(len(mem_keys), len(mem_keys) - len(todo), enabled=progress)
    try:
        for c0 in range(0, len(todo), max(1, chunk_size)):
            chunk = todo[c0 : c0 + max(1, chunk_size)]
            # The in-process engine reuses the baseline's KV cache for the ablations in
            # the same batch, so it gets the baseline first in every chunk; a server
            # already saw it first (its prefix cache is warm) and is not sent it again;
            # a replica pool gets it to send to each replica that has not seen it.
            lead = [base_req] if _batch_reuses_prefix(scorer) else []
            reqs = [ctx.wire_prompt(skip=skip_key(mem_keys[i])).request(priority=priority)
                    for i in chunk]
            _, rows = await _with_ticking(ascore_ablations(scorer, reqs, sizes=m, lead=lead), bar)
            for i, ablation in zip(chunk, rows, strict=True):
                k = mem_keys[i]
                without[i], errors[i] = ablation.scores, ablation.error
                if ablation.error is not None:
                    log.warning("[scoring-full] %s FAILED: %s", k, ablation.error)
                if write_back is not None:
                    write_back.row(k, base_wp.entries, divergence(baseline, without[i]))
                if on_row is not None:
                    row = None if ablation.error else divergence(baseline, without[i])
                    on_row(k, row, ablation.error)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(k[:24], refresh=False)
            if ckpt is not None:
                build().save(ckpt, overwrite=True)
    finally:
        if bar is not None:
            bar.close()
    meta.update(_run_facts(scorer, errors))
    result = build()
    if write_back is not None:
        write_back.matrix(result)
    return result


def _run_facts(scorer: Scorer, errors: Sequence[str | None]) -> dict[str, Any]:
    """What a finished run adds to ``meta``: failed calls, computed tokens, the scorer's
    own facts (a replica pool: each replica's calls and failures)."""
    facts: dict[str, Any] = {"failed_calls": sum(e is not None for e in errors)}
    stats = getattr(scorer, "stats", None)
    if stats is not None:
        facts["computed_tokens"] = int(getattr(stats, "computed_tokens", 0))
    return {**facts, **scorer_meta(scorer)}


def _batch_reuses_prefix(scorer: Scorer) -> bool:
    """Whether ``scorer`` benefits from the baseline leading every batch: the in-process
    engine, and a scorer that says so (a replica pool sends it to each replica once)."""
    return getattr(scorer, "name", "") == "local" or bool(getattr(scorer, "lead_each_batch", False))


def _progress(total: int, done: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # leave=True: the finished bar (total, elapsed) stays in the notebook as a record.
    return tqdm(total=total, initial=done, desc="scoring memories", unit="memory", leave=True)


async def _with_ticking(aw: Any, bar: Any) -> Any:
    """Await ``aw``, redrawing ``bar`` twice a second meanwhile so its elapsed time moves
    while a batch is in flight (its count moves as each chunk of memories completes)."""
    import asyncio

    if bar is None:
        return await aw
    task = asyncio.ensure_future(aw)
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        bar.refresh()
    return task.result()


score_memories = sync_twin(ascore_memories, "score_memories")
