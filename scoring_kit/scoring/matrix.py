"""The full N×M matrix: every memory ablated, every response scored (the reference's
``score_memories``), with NaN rows for failures, checkpoints and resume."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .._exceptions import ExportError, ScoringError, StoreError
from .._files import atomic_write_bytes
from .._types import FloatArray, IntArray, PathLike
from ..backends.base import DEFAULT_PRIORITY, Scorer, ScoreRequest
from ..context.model import ContextState, WirePrompt, skip_key
from .divergence import KEEP_THRESHOLD, column_scores, delta, divergence, row_weights

if TYPE_CHECKING:
    import polars as pl

__all__ = ["MATRIX_COLUMNS", "MemoryMatrix", "ascore_memories", "score_memories"]

log = logging.getLogger(__name__)

#: Columns of :meth:`MemoryMatrix.to_frame` (one row per memory × response).
MATRIX_COLUMNS = (
    "memory_key",
    "entry_index",
    "baseline",
    "without",
    "delta",
    "divergence",
    "error",
)


@dataclass(slots=True)
class MemoryMatrix:
    """Leave-one-out scores of N memories on M responses.

    Attributes
    ----------
    keys
        Memory keys, ``(N,)``, first-seen order (identity, then conversation).
    entries
        Conversation index of each response, ``(M,)``.
    baseline
        Total log-prob of each response with the full context, ``(M,)``.
    without
        Total log-prob with memory i removed, ``(N, M)``; a failed row is NaN.
    errors
        Per memory: None, or the error text of its failed call.
    method
        ``"loo"`` (exact leave-one-out) or the approximate method that produced it.
    approximate
        True when the values are not exact leave-one-out totals.
    meta
        Free-form run facts: model, backend, prompt hash, token spend, timings.
    memory_texts
        Text of each memory, aligned with ``keys`` (empty: not recorded).
    response_texts
        Text of each response, aligned with ``entries`` (empty: not recorded).
    """

    keys: list[str]
    entries: IntArray
    baseline: FloatArray
    without: FloatArray
    errors: list[str | None]
    method: str = "loo"
    approximate: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    memory_texts: tuple[str, ...] = ()
    response_texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n, m = len(self.keys), len(self.entries)
        self.entries = np.asarray(self.entries, dtype=np.int64).reshape(m)
        self.baseline = np.asarray(self.baseline, dtype=np.float64).reshape(m)
        self.without = np.asarray(self.without, dtype=np.float64).reshape(n, m)
        if len(self.errors) != n:
            msg = f"errors has {len(self.errors)} entries for {n} memories"
            raise ScoringError(msg)

    # ── derived arrays ───────────────────────────────────────
    @property
    def shape(self) -> tuple[int, int]:
        return len(self.keys), len(self.entries)

    @property
    def delta(self) -> FloatArray:
        """Signed ``baseline - without``, ``(N, M)``."""
        return delta(self.baseline, self.without)

    @property
    def divergence(self) -> FloatArray:
        """``max(baseline - without, 0)``, ``(N, M)``; NaN rows for failed memories."""
        return divergence(self.baseline, self.without)

    @property
    def memory_weights(self) -> FloatArray:
        """Row sums of the divergence, ``(N,)`` (NaN for a failed memory)."""
        return row_weights(self.divergence)

    @property
    def response_scores(self) -> FloatArray:
        """Column sums over the memories that succeeded, ``(M,)``."""
        return column_scores(self.divergence)

    @property
    def failed(self) -> list[str]:
        """Keys whose ablation failed."""
        return [k for k, e in zip(self.keys, self.errors, strict=True) if e is not None]

    @property
    def complete(self) -> bool:
        return not self.failed and not np.isnan(self.without).any()

    def row(self, key: str) -> FloatArray:
        """Divergence of memory ``key`` on every response."""
        try:
            i = self.keys.index(key)
        except ValueError:
            msg = f"no memory {key!r} in this matrix; keys: {', '.join(self.keys)}"
            raise KeyError(msg) from None
        return self.divergence[i]

    def important_memories_for(
        self, entry: int, *, threshold: float = KEEP_THRESHOLD
    ) -> list[tuple[str, float]]:
        """Memories whose divergence on response ``entry`` is above ``threshold``, sorted.

        ``entry`` is the conversation index of the response (as in the reference).
        """
        hits = np.flatnonzero(self.entries == entry)
        if hits.size == 0:
            return []
        col = self.divergence[:, int(hits[0])]
        out = [(k, float(v)) for k, v in zip(self.keys, col, strict=True) if v > threshold]
        out.sort(key=lambda kv: -kv[1])
        return out

    def memory_scores(self, *, threshold: float = KEEP_THRESHOLD) -> dict[int, dict[str, float]]:
        """Per response entry: ``{key: divergence}`` for cells above ``threshold``."""
        div = self.divergence
        out: dict[int, dict[str, float]] = {}
        for j, e in enumerate(self.entries.tolist()):
            col = div[:, j]
            out[e] = {k: float(v) for k, v in zip(self.keys, col, strict=True) if v > threshold}
        return out

    def apply_to(self, ctx: ContextState, *, threshold: float = KEEP_THRESHOLD) -> ContextState:
        """Write the per-response memory scores onto the context's assistant branches.

        As the reference does: a cell above ``threshold`` is set, a cell at or below it is
        removed; failed memories leave the branch's previous value for that key untouched.
        """
        div = self.divergence
        updates: dict[int, dict[str, float]] = {}
        for j, e in enumerate(self.entries.tolist()):
            if e >= len(ctx.conversation) or not ctx.conversation[e].is_branch:
                continue
            scores = dict(ctx.conversation[e].memory_scores)
            for i, k in enumerate(self.keys):
                v = div[i, j]
                if np.isnan(v):
                    continue
                if v > threshold:
                    scores[k] = float(v)
                else:
                    scores.pop(k, None)
            updates[e] = scores
        return ctx.with_memory_scores(updates)

    # ── frames ───────────────────────────────────────────────
    def to_frame(self) -> pl.DataFrame:
        """Tidy polars frame, one row per (memory, response): :data:`MATRIX_COLUMNS`."""
        import polars as pl

        n, m = self.shape
        errs = [e for e in self.errors for _ in range(m)]
        return pl.DataFrame(
            {
                "memory_key": np.repeat(np.asarray(self.keys, dtype=object), m).tolist(),
                "entry_index": np.tile(self.entries, n),
                "baseline": np.tile(self.baseline, n),
                "without": self.without.reshape(-1),
                "delta": self.delta.reshape(-1),
                "divergence": self.divergence.reshape(-1),
                "error": errs,
            },
            schema={
                "memory_key": pl.String,
                "entry_index": pl.Int64,
                "baseline": pl.Float64,
                "without": pl.Float64,
                "delta": pl.Float64,
                "divergence": pl.Float64,
                "error": pl.String,
            },
            nan_to_null=False,
        )

    # ── persistence ──────────────────────────────────────────
    def _header(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "errors": self.errors,
            "method": self.method,
            "approximate": self.approximate,
            "meta": self.meta,
            "memory_texts": list(self.memory_texts),
            "response_texts": list(self.response_texts),
        }

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            entries=self.entries,
            baseline=self.baseline,
            without=self.without,
            header=np.frombuffer(orjson.dumps(self._header(), default=str), dtype=np.uint8),
        )
        return buf.getvalue()

    def save(self, path: PathLike, *, overwrite: bool = True) -> Path:
        """Save losslessly, atomically: ``.npz`` or ``.parquet`` (format from the suffix)."""
        p = Path(path)
        if p.exists() and not overwrite:
            raise ExportError(f"{p} exists; pass overwrite=True to replace it")
        if p.suffix == ".npz":
            atomic_write_bytes(p, self.to_npz_bytes())
        elif p.suffix == ".parquet":
            buf = io.BytesIO()
            frame = self.to_frame()
            n, m = self.shape
            if len(self.memory_texts) == n and len(self.response_texts) == m:
                import polars as pl

                frame = frame.with_columns(
                    pl.Series("memory_text", [t for t in self.memory_texts for _ in range(m)],
                              dtype=pl.String),
                    pl.Series("response_text", list(self.response_texts) * n, dtype=pl.String),
                )
            meta = orjson.dumps({**self._header(), "baseline": self.baseline.tolist(),
                                 "entries": self.entries.tolist()}, default=str)
            frame.write_parquet(buf, metadata={"scoring_kit.matrix": meta.decode()})
            atomic_write_bytes(p, buf.getvalue())
        else:
            msg = f"cannot save a matrix as {p.suffix or 'no suffix'!r}: use .npz or .parquet"
            raise ExportError(msg)
        return p

    @classmethod
    def load(cls, path: PathLike) -> MemoryMatrix:
        """Load a matrix written by :meth:`save`."""
        p = Path(path)
        try:
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    header = orjson.loads(z["header"].tobytes())
                    return cls(
                        keys=list(header["keys"]),
                        entries=z["entries"],
                        baseline=z["baseline"],
                        without=z["without"],
                        errors=list(header["errors"]),
                        method=header.get("method", "loo"),
                        approximate=bool(header.get("approximate", False)),
                        meta=dict(header.get("meta", {})),
                        memory_texts=tuple(header.get("memory_texts", ())),
                        response_texts=tuple(header.get("response_texts", ())),
                    )
            if p.suffix == ".parquet":
                import polars as pl

                meta = pl.read_parquet_metadata(p).get("scoring_kit.matrix")
                if meta is None:
                    raise ExportError(f"{p} is a parquet file but not a scoring_kit matrix")
                header = orjson.loads(meta)
                frame = pl.read_parquet(p)
                n, m = len(header["keys"]), len(header["entries"])
                without = frame["without"].to_numpy().astype(np.float64).reshape(n, m)
                return cls(
                    keys=list(header["keys"]),
                    entries=np.asarray(header["entries"], dtype=np.int64),
                    baseline=np.asarray(header["baseline"], dtype=np.float64),
                    without=without,
                    errors=list(header["errors"]),
                    method=header.get("method", "loo"),
                    approximate=bool(header.get("approximate", False)),
                    meta=dict(header.get("meta", {})),
                    memory_texts=tuple(header.get("memory_texts", ())),
                    response_texts=tuple(header.get("response_texts", ())),
                )
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, ExportError):
                raise
            raise StoreError(f"{p}: not a readable scoring_kit matrix: {exc}") from exc
        msg = f"cannot load a matrix from {p.suffix or 'no suffix'!r}: use .npz or .parquet"
        raise ExportError(msg)

    def __repr__(self) -> str:
        n, m = self.shape
        label = f"{self.method}{' (approximate)' if self.approximate else ''}"
        return f"MemoryMatrix({n} memories × {m} responses, {label}, failed={len(self.failed)})"


def _prompt_hash(wp: WirePrompt) -> str:
    h = hashlib.blake2b(wp.tokens.tobytes(), digest_size=16)
    h.update(np.asarray(wp.ranges, dtype=np.int64).tobytes())
    return h.hexdigest()


def _empty(keys: Sequence[str], wp: WirePrompt | None) -> MemoryMatrix:
    m = 0 if wp is None else len(wp.entries)
    return MemoryMatrix(
        keys=list(keys),
        entries=np.asarray(wp.entries if wp else (), dtype=np.int64),
        baseline=np.zeros(m),
        without=np.full((len(keys), m), np.nan),
        errors=[None] * len(keys),
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
    """
    mem_keys = list(keys) if keys is not None else ctx.memory_keys()
    known = set(ctx.memory_keys())
    unknown = [k for k in mem_keys if k not in known]
    if unknown:
        msg = f"unknown memory key(s) {unknown}; this context has {sorted(known)}"
        raise ScoringError(msg)
    base_wp = ctx.wire_prompt()
    if not mem_keys or not base_wp.ranges:
        return _empty(mem_keys, base_wp)
    phash = _prompt_hash(base_wp)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    result: MemoryMatrix | None = None
    if ckpt is not None and ckpt.exists():
        prev = MemoryMatrix.load(ckpt)
        if prev.meta.get("prompt_hash") != phash or prev.keys != mem_keys:
            msg = (
                f"checkpoint {ckpt} belongs to another context or key list "
                f"(prompt hash {prev.meta.get('prompt_hash')} != {phash}); "
                "delete it or pass another path"
            )
            raise StoreError(msg)
        result = prev
    base_req = base_wp.request(priority=priority)
    if result is None:
        baseline = await scorer.score(base_req)
        m = len(base_wp.ranges)
        if baseline.shape != (m,):
            raise ScoringError(f"baseline returned {baseline.shape[0]} scores for {m} responses")
        result = MemoryMatrix(
            keys=list(mem_keys),
            entries=np.asarray(base_wp.entries, dtype=np.int64),
            memory_texts=tuple(ctx.memory_text(k) for k in mem_keys),
            response_texts=tuple(_entry_text(ctx, e) for e in base_wp.entries),
            baseline=baseline,
            without=np.full((len(mem_keys), m), np.nan),
            errors=[None] * len(mem_keys),
            meta={
                "prompt_hash": phash,
                "prompt_tokens": len(base_wp),
                "backend": getattr(scorer, "name", type(scorer).__name__),
                "created": _dt.datetime.now(_dt.UTC).isoformat(),
            },
        )
        if ckpt is not None:
            result.save(ckpt)
    todo = [
        i
        for i in range(len(mem_keys))
        if result.errors[i] is not None or np.isnan(result.without[i]).any()
    ]
    bar = _progress(len(mem_keys), len(mem_keys) - len(todo), enabled=progress)
    try:
        for c0 in range(0, len(todo), max(1, chunk_size)):
            chunk = todo[c0 : c0 + max(1, chunk_size)]
            # The in-process engine reuses the baseline's KV cache for the ablations in
            # the same batch, so it gets the baseline first in every chunk; a server
            # already saw it first (its prefix cache is warm) and is not sent it again.
            lead = [base_req] if _batch_reuses_prefix(scorer) else []
            reqs: list[ScoreRequest] = list(lead)
            for i in chunk:
                k = mem_keys[i]
                wp = ctx.wire_prompt(skip=skip_key(k))
                reqs.append(wp.request(priority=priority))
            outs = await _with_ticking(scorer.score_batch(reqs), bar)
            for i, out in zip(chunk, outs[len(lead) :], strict=True):
                k = mem_keys[i]
                if isinstance(out, BaseException):
                    result.without[i] = np.nan
                    result.errors[i] = _describe(out)
                    log.warning("[scoring-full] %s FAILED: %s", k, result.errors[i])
                elif out.shape != result.baseline.shape:
                    result.without[i] = np.nan
                    result.errors[i] = (
                        f"ablated call returned {out.shape[0]} scores for "
                        f"{result.baseline.shape[0]} responses"
                    )
                else:
                    result.without[i] = out
                    result.errors[i] = None
                if on_row is not None:
                    row = None if result.errors[i] else result.divergence[i]
                    on_row(k, row, result.errors[i])
                if bar is not None:
                    bar.set_postfix_str(k[:24], refresh=False)
                    bar.update(1)
            if ckpt is not None:
                result.save(ckpt)
    finally:
        if bar is not None:
            bar.close()
    result.meta["failed_calls"] = len(result.failed)
    stats = getattr(scorer, "stats", None)
    if stats is not None:
        result.meta["computed_tokens"] = int(getattr(stats, "computed_tokens", 0))
    return result


def _entry_text(ctx: ContextState, entry: int) -> str:
    """The text of conversation entry ``entry`` (a branch: its rendered children)."""
    from ..context.model import render_branch_text

    node = ctx.conversation[entry]
    return render_branch_text(node.children) if node.is_branch else (node.text or "")


def _batch_reuses_prefix(scorer: Scorer) -> bool:
    """Whether ``scorer`` benefits from the baseline leading every batch."""
    flag = getattr(scorer, "prefix_batching", None)
    return bool(flag) if flag is not None else getattr(scorer, "name", "") == "local"


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc) or type(exc).__name__
    return f"{text} (status {status})" if status is not None and str(status) not in text else text


def _progress(total: int, done: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # leave=True: the finished bar (total, elapsed) stays in the notebook as a record.
    return tqdm(total=total, initial=done, desc="scoring memories", unit="memory", leave=True)


async def _with_ticking(aw: Any, bar: Any) -> Any:
    """Await ``aw``, redrawing ``bar`` twice a second meanwhile so its elapsed time moves
    while a batch is in flight (its count moves as each memory's call completes)."""
    import asyncio

    if bar is None:
        return await aw
    task = asyncio.ensure_future(aw)
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        bar.refresh()
    return task.result()


def score_memories(
    ctx: ContextState, scorer: Scorer, **kwargs: Any
) -> MemoryMatrix:
    """Synchronous :func:`ascore_memories` (works inside Jupyter too)."""
    from .._sync import run_sync

    return run_sync(ascore_memories(ctx, scorer, **kwargs))


def memory_text_map(ctx: ContextState) -> Mapping[str, str]:
    """``{key: text}`` for every memory of ``ctx`` (first occurrence)."""
    return {k: ctx.memory_text(k) for k in ctx.memory_keys()}
