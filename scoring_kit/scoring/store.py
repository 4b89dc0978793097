"""Durable state the flows keep between runs: the memory store and the trained set.

Both are JSON files written atomically (temp + fsync + rename) under a file lock, so two
processes updating at once lose nothing, and a corrupt or truncated file raises
:class:`~scoring_kit.StoreError` naming its path instead of being silently reset.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import StoreError
from .._files import locked_update_json
from .._settings import CACHE_ENV, cache_dir
from .._types import PathLike
from .divergence import DEFAULT_INITIAL_WEIGHT, ewma_weight

__all__ = [
    "CACHE_ENV",
    "MemoryRecord",
    "MemoryStore",
    "TrainedSet",
    "default_cache_dir",
]

STORE_VERSION = 1


def default_cache_dir() -> Path:
    """``$SCORING_KIT_CACHE`` or ``~/.cache/scoring_kit`` (read by
    :func:`scoring_kit._settings.cache_dir`)."""
    return cache_dir()


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc}") from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = f"{path}: corrupt or truncated JSON ({exc}); fix or move the file, it is not reset"
        raise StoreError(msg) from None


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """What the store knows of one memory."""

    key: str
    weight: float
    last_scored: int  # unix seconds; 0 = never
    history: tuple[tuple[int, float, float], ...] = field(default=())  # (time, score, weight)


class MemoryStore:
    """Per-memory weight, ``last_scored`` and score history, in one JSON file.

    File shape: ``{"version": 1, "memories": {key: {"weight", "last_scored", "history":
    [[unix_s, score, weight], ...]}}}``.
    """

    def __init__(
        self, path: PathLike | None = None, *, initial_weight: float = DEFAULT_INITIAL_WEIGHT
    ) -> None:
        self.path = Path(path) if path is not None else default_cache_dir() / "memory-store.json"
        self.initial_weight = initial_weight

    def _validate(self, data: Any) -> dict[str, Any]:
        if data is None:
            return {"version": STORE_VERSION, "memories": {}}
        if not isinstance(data, dict) or not isinstance(data.get("memories"), dict):
            raise StoreError(f"{self.path}: not a memory store (no 'memories' object)")
        if data.get("version") != STORE_VERSION:
            raise StoreError(f"{self.path}: unsupported store version {data.get('version')!r}")
        return data

    def _records(self) -> dict[str, Any]:
        return self._validate(_read_json(self.path))["memories"]  # type: ignore[no-any-return]

    def get(self, key: str) -> MemoryRecord | None:
        raw = self._records().get(key)
        if raw is None:
            return None
        return MemoryRecord(
            key,
            float(raw["weight"]),
            int(raw["last_scored"]),
            tuple((int(t), float(s), float(w)) for t, s, w in raw.get("history", [])),
        )

    def last_scored(self, key: str) -> int:
        """Unix seconds of the last score of ``key`` (0 when never scored)."""
        raw = self._records().get(key)
        return 0 if raw is None else int(raw["last_scored"])

    def all(self) -> list[MemoryRecord]:
        return [r for k in self._records() if (r := self.get(k)) is not None]

    def update(self, key: str, score: float, *, now: int | None = None) -> MemoryRecord:
        """Apply the EWMA rule to ``key`` with ``score`` and persist (locked, atomic)."""
        ts = int(time.time()) if now is None else int(now)
        out: dict[str, Any] = {}

        def fn(data: Any) -> Any:
            data = self._validate(data)
            rec = data["memories"].get(key)
            old = self.initial_weight if rec is None else float(rec["weight"])
            new = ewma_weight(old, score)
            hist = [] if rec is None else list(rec.get("history", []))
            hist.append([ts, float(score), new])
            data["memories"][key] = {"weight": new, "last_scored": ts, "history": hist}
            out.update(data["memories"][key])
            return data

        locked_update_json(self.path, fn, default=None)
        return MemoryRecord(
            key, out["weight"], out["last_scored"],
            tuple((int(t), float(s), float(w)) for t, s, w in out["history"]),
        )

    def to_frame(self) -> Any:
        """Weight history as a polars frame: key, time, score, weight."""
        import polars as pl

        rows = [
            {"key": r.key, "time": t, "score": s, "weight": w}
            for r in self.all()
            for t, s, w in r.history
        ]
        schema = {"key": pl.String, "time": pl.Int64, "score": pl.Float64, "weight": pl.Float64}
        frame = pl.DataFrame(rows, schema=schema)
        return frame.with_columns(pl.from_epoch("time", time_unit="s").alias("scored_at"))


class TrainedSet:
    """The set of response timestamps (ns) already sent to training.

    Same file format as the reference (a JSON array of integers); default path
    ``~/.cache/scoring_kit/trained-responses.json``.
    """

    def __init__(self, path: PathLike | None = None) -> None:
        self.path = (
            Path(path) if path is not None else default_cache_dir() / "trained-responses.json"
        )

    def _validate(self, data: Any) -> list[int]:
        if data is None:
            return []
        if not isinstance(data, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in data
        ):
            raise StoreError(f"{self.path}: not a trained set (expected a JSON array of integers)")
        return data

    def load(self) -> set[int]:
        return set(self._validate(_read_json(self.path)))

    def __contains__(self, ts: object) -> bool:
        return ts in self.load()

    def mark(self, timestamps: Iterable[int]) -> None:
        """Add ``timestamps`` (locked, atomic; concurrent markers lose nothing)."""
        new = [int(t) for t in timestamps]

        def fn(data: Any) -> Any:
            cur = set(self._validate(data))
            cur.update(new)
            return sorted(cur)

        locked_update_json(self.path, fn, default=None)
