"""The memory matrix as data: :class:`MemoryMatrix` (frozen), its one frame schema
(:data:`MATRIX_SCHEMA`), its one writer (:meth:`MemoryMatrix.save`) and reader
(:meth:`MemoryMatrix.load`, :func:`read_matrix_frame`), the format chosen by the suffix
(:data:`MATRIX_FORMATS`). The flow that computes it is :mod:`scoring_kit.scoring.matrix`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .._exceptions import ExportError, ScoringError, StoreError
from .._files import atomic_write_bytes
from .._types import FloatArray, IntArray, PathLike
from ..context.model import ContextState
from .divergence import KEEP_THRESHOLD, column_scores, delta, divergence, row_weights

if TYPE_CHECKING:
    import polars as pl

__all__ = [
    "MATRIX_COLUMNS",
    "MATRIX_FILE_COLUMNS",
    "MATRIX_FORMATS",
    "MATRIX_SCHEMA",
    "MATRIX_TEXT_COLUMNS",
    "MemoryMatrix",
    "read_matrix_frame",
]

#: The one definition of the long matrix frame: column → polars type name, in file order.
#: One row per (memory, response), memories in key order, responses in column order.
MATRIX_SCHEMA: Mapping[str, str] = MappingProxyType(
    {
        "memory_key": "String",
        "entry_index": "Int64",
        "baseline": "Float64",
        "without": "Float64",
        "delta": "Float64",
        "divergence": "Float64",
        "error": "String",
        "memory_text": "String",
        "response_text": "String",
    }
)
#: The text columns of a saved frame (:attr:`MemoryMatrix.memory_texts`, ``response_texts``).
MATRIX_TEXT_COLUMNS = ("memory_text", "response_text")
#: Columns of :meth:`MemoryMatrix.to_frame` (the values, without the text columns).
MATRIX_COLUMNS = tuple(c for c in MATRIX_SCHEMA if c not in MATRIX_TEXT_COLUMNS)
#: Columns of a saved ``.parquet`` / ``.csv`` and of :func:`read_matrix_frame`.
MATRIX_FILE_COLUMNS = tuple(MATRIX_SCHEMA)
#: Suffixes :meth:`MemoryMatrix.save` writes and :meth:`MemoryMatrix.load` reads.
MATRIX_FORMATS = (".csv", ".npz", ".parquet")

_FLOAT_COLUMNS = ("baseline", "without", "delta", "divergence")
_PARQUET_KEY = "scoring_kit.matrix"


def _schema(columns: Sequence[str]) -> dict[str, Any]:
    import polars as pl

    return {c: getattr(pl, MATRIX_SCHEMA[c]) for c in columns}


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _texts(given: Sequence[str], n: int, what: str, of: str) -> tuple[str, ...]:
    if not given:
        return ("",) * n
    if len(given) != n:
        msg = f"{what} has {len(given)} entries for {n} {of}"
        raise ScoringError(msg)
    return tuple(str(t) for t in given)


@dataclass(frozen=True, slots=True, eq=False)
class MemoryMatrix:
    """Leave-one-out scores of N memories on M responses (frozen; arrays read-only).

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
        Per memory (aligned with ``keys``): the visible text of its node ("" unknown).
    response_texts
        Per response (aligned with ``entries``): its visible text ("" unknown).

    Lists given for the sequence fields are stored as tuples; the arrays are copied and
    made read-only; empty ``memory_texts`` / ``response_texts`` mean "" for every row.
    """

    keys: tuple[str, ...]
    entries: IntArray
    baseline: FloatArray
    without: FloatArray
    errors: tuple[str | None, ...]
    method: str = "loo"
    approximate: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)
    memory_texts: tuple[str, ...] = ()
    response_texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n, m = len(self.keys), len(self.entries)
        put = object.__setattr__
        put(self, "keys", tuple(self.keys))
        put(self, "entries", _frozen(np.array(self.entries, dtype=np.int64).reshape(m)))
        put(self, "baseline", _frozen(np.array(self.baseline, dtype=np.float64).reshape(m)))
        put(self, "without", _frozen(np.array(self.without, dtype=np.float64).reshape(n, m)))
        if len(self.errors) != n:
            msg = f"errors has {len(self.errors)} entries for {n} memories"
            raise ScoringError(msg)
        put(self, "errors", tuple(self.errors))
        put(self, "meta", dict(self.meta))
        put(self, "memory_texts", _texts(self.memory_texts, n, "memory_texts", "memories"))
        put(self, "response_texts", _texts(self.response_texts, m, "response_texts", "responses"))

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
        removed, and a failed (NaN) row removes that memory's previous values (the seed's
        failed row is zeros); see :mod:`scoring_kit.scoring.writeback`.
        """
        from .writeback import apply_matrix

        return apply_matrix(ctx, self, threshold=threshold)

    # ── frames ───────────────────────────────────────────────
    def to_frame(self, *, texts: bool = False) -> pl.DataFrame:
        """Tidy polars frame, one row per (memory, response): :data:`MATRIX_COLUMNS`
        (NaN in failed cells), plus :data:`MATRIX_TEXT_COLUMNS` with ``texts=True`` (the
        frame a saved ``.parquet`` / ``.csv`` holds)."""
        import polars as pl

        n, m = self.shape
        columns: dict[str, Any] = {
            "memory_key": [k for k in self.keys for _ in range(m)],
            "entry_index": np.tile(self.entries, n),
            "baseline": np.tile(self.baseline, n),
            "without": self.without.reshape(-1),
            "delta": self.delta.reshape(-1),
            "divergence": self.divergence.reshape(-1),
            "error": [e for e in self.errors for _ in range(m)],
        }
        if texts:
            columns["memory_text"] = [t for t in self.memory_texts for _ in range(m)]
            columns["response_text"] = list(self.response_texts) * n
        return pl.DataFrame(columns, schema=_schema(list(columns)), nan_to_null=False)

    # ── persistence ──────────────────────────────────────────
    def _header(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "errors": list(self.errors),
            "method": self.method,
            "approximate": self.approximate,
            "meta": dict(self.meta),
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

    def _file_bytes(self, fmt: str) -> bytes:
        if fmt == ".npz":
            return self.to_npz_bytes()
        buf = io.BytesIO()
        if fmt == ".parquet":
            header = {**self._header(), "baseline": self.baseline.tolist(),
                      "entries": self.entries.tolist()}
            meta = orjson.dumps(header, default=str).decode()
            self.to_frame(texts=True).write_parquet(buf, metadata={_PARQUET_KEY: meta})
        else:
            import polars as pl

            frame = self.to_frame(texts=True).with_columns(
                pl.col(c).fill_nan(None) for c in _FLOAT_COLUMNS
            )
            frame.write_csv(buf, float_precision=None)
        return buf.getvalue()

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the matrix atomically; the format comes from the suffix.

        ``.npz`` and ``.parquet`` are lossless (:meth:`load` rebuilds an equal matrix);
        both hold the header (keys, errors, method, meta, texts). ``.parquet`` holds the
        long frame (:data:`MATRIX_FILE_COLUMNS`, NaN in failed cells) with the header in
        its metadata; ``.csv`` holds the same frame only (failed cells empty, the reason
        in ``error``), so :meth:`load` gets the values and texts back but not ``method``,
        ``approximate`` or ``meta``.

        Raises
        ------
        ExportError
            Unknown suffix (the valid ones are listed), the path is a folder, it exists and
            ``overwrite`` is false, or it cannot be written.
        """
        p = Path(path)
        fmt = p.suffix.lower()
        if fmt not in MATRIX_FORMATS:
            msg = (
                f"cannot save a matrix as {p.suffix or 'a file without suffix'!r} ({p}); "
                f"valid suffixes: {', '.join(MATRIX_FORMATS)}"
            )
            raise ExportError(msg)
        if p.is_dir():
            raise ExportError(f"{p} is a folder, not a file")
        if p.exists() and not overwrite:
            raise ExportError(f"{p} exists; pass overwrite=True to replace it")
        data = self._file_bytes(fmt)
        try:
            atomic_write_bytes(p, data)
        except StoreError as exc:
            raise ExportError(str(exc)) from exc
        return p

    @classmethod
    def load(cls, path: PathLike) -> MemoryMatrix:
        """Load a matrix written by :meth:`save` (``.npz``, ``.parquet`` or ``.csv``).

        Files written before the text fields existed load with empty texts.

        Raises
        ------
        ExportError
            Unknown suffix, a parquet file that is not a matrix, or a ``.csv`` that is not
            a matrix frame (the column is named).
        StoreError
            An ``.npz`` / ``.parquet`` that cannot be read as a matrix.
        """
        p = Path(path)
        fmt = p.suffix.lower()
        if fmt not in MATRIX_FORMATS:
            msg = (
                f"cannot load a matrix from {p.suffix or 'a file without suffix'!r} ({p}); "
                f"valid suffixes: {', '.join(MATRIX_FORMATS)}"
            )
            raise ExportError(msg)
        if fmt == ".csv":
            return _from_frame(read_matrix_frame(p), p)
        try:
            if fmt == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    header = orjson.loads(z["header"].tobytes())
                    entries, baseline, without = z["entries"], z["baseline"], z["without"]
            else:
                import polars as pl

                meta = pl.read_parquet_metadata(p).get(_PARQUET_KEY)
                if meta is None:
                    raise ExportError(f"{p} is a parquet file but not a scoring_kit matrix")
                header = orjson.loads(meta)
                n, m = len(header["keys"]), len(header["entries"])
                frame = pl.read_parquet(p, columns=["without"])
                without = frame["without"].to_numpy().astype(np.float64).reshape(n, m)
                entries, baseline = header["entries"], header["baseline"]
            return cls(
                keys=tuple(header["keys"]),
                entries=np.asarray(entries, dtype=np.int64),
                baseline=np.asarray(baseline, dtype=np.float64),
                without=without,
                errors=tuple(header["errors"]),
                method=header.get("method", "loo"),
                approximate=bool(header.get("approximate", False)),
                meta=dict(header.get("meta", {})),
                memory_texts=tuple(header.get("memory_texts") or ()),
                response_texts=tuple(header.get("response_texts") or ()),
            )
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, ExportError):
                raise
            raise StoreError(f"{p}: not a readable scoring_kit matrix: {exc}") from exc

    def __repr__(self) -> str:
        n, m = self.shape
        label = f"{self.method}{' (approximate)' if self.approximate else ''}"
        return f"MemoryMatrix({n} memories × {m} responses, {label}, failed={len(self.failed)})"


def read_matrix_frame(path: PathLike) -> pl.DataFrame:
    """The long frame of a saved matrix (any of :data:`MATRIX_FORMATS`).

    Returns
    -------
    pl.DataFrame
        :data:`MATRIX_FILE_COLUMNS` with null (not NaN) in failed cells; a file written
        before the text columns existed gets empty strings in them.

    Raises
    ------
    ExportError
        Unknown suffix, unreadable file, or missing or mistyped columns (named).
    """
    import polars as pl

    p = Path(path)
    fmt = p.suffix.lower()
    if fmt not in MATRIX_FORMATS:
        msg = (
            f"cannot read a matrix from {p.suffix or 'a file without suffix'!r} ({p}); "
            f"valid suffixes: {', '.join(MATRIX_FORMATS)}"
        )
        raise ExportError(msg)
    try:
        if fmt == ".npz":
            frame = MemoryMatrix.load(p).to_frame(texts=True)
        elif fmt == ".parquet":
            frame = pl.read_parquet(p)
        else:
            header = pl.read_csv(p, n_rows=0).columns
            _require(header, p)
            frame = pl.read_csv(
                p, schema_overrides=_schema([c for c in MATRIX_SCHEMA if c in header]),
                infer_schema_length=0,
            )
    except ExportError:
        raise
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = f"{p}: not a readable matrix export: {exc}"
        raise ExportError(msg) from exc
    _require(frame.columns, p)
    frame = frame.with_columns(
        pl.lit("").alias(c) for c in MATRIX_TEXT_COLUMNS if c not in frame.columns
    )
    try:
        return frame.select(
            pl.col(c).cast(t) for c, t in _schema(MATRIX_FILE_COLUMNS).items()
        ).with_columns(
            pl.col(c).fill_nan(None) for c in _FLOAT_COLUMNS
        ).with_columns(pl.col(c).fill_null("") for c in MATRIX_TEXT_COLUMNS)
    except pl.exceptions.PolarsError as exc:
        msg = f"{p}: a matrix column has the wrong type: {exc}"
        raise ExportError(msg) from exc


def _require(columns: Sequence[str], p: Path) -> None:
    missing = [c for c in MATRIX_COLUMNS if c not in columns]
    if missing:
        msg = f"{p}: not a matrix export; missing column(s) {', '.join(missing)}"
        raise ExportError(msg)


def _from_frame(frame: pl.DataFrame, p: Path) -> MemoryMatrix:
    """Rebuild a matrix from its long frame (a ``.csv``: no method, approximate or meta)."""
    keys = frame["memory_key"].unique(maintain_order=True).to_list()
    n = len(keys)
    m = frame.height // n if n else 0
    if n * m != frame.height or (n and frame["memory_key"].to_list() != [
        k for k in keys for _ in range(m)
    ]):
        msg = f"{p}: not a full matrix frame ({frame.height} rows for {n} memories)"
        raise ExportError(msg)
    head = frame.head(m)
    firsts = frame.gather_every(m) if m else frame.head(0)
    return MemoryMatrix(
        keys=tuple(keys),
        entries=head["entry_index"].to_numpy(),
        baseline=head["baseline"].fill_null(np.nan).to_numpy(),
        without=frame["without"].fill_null(np.nan).to_numpy().reshape(n, m),
        errors=tuple(firsts["error"].to_list()),
        memory_texts=tuple(firsts["memory_text"].to_list()),
        response_texts=tuple(head["response_text"].to_list()),
    )
