"""A disk cache of the tokenizers that transformers converts from GGUF files.

Converting a GGUF's tokenizer takes seconds (SmolLM2: about 7 s) to minutes (Gemma 3's
262k-entry vocabulary, 20-85 s on 2 cores); reading back what ``save_pretrained`` wrote takes
a fraction of that. Every CLI call on a plain conversation loads a tokenizer, so the
converted one is kept in the kit's cache folder, named by the GGUF file's content::

    $SCORING_KIT_CACHE/tokenizers/
      index.json         {resolved path: [size, mtime_ns, sha256]}: each file is hashed once
      <sha256>/          save_pretrained's files (tokenizer.json, tokenizer_config.json, ...)
        complete.json    written last: {"sha256", "tag", "format"}; without it (or with
                         another hash, transformers version or format) the entry is rebuilt
      <sha256>.lock      held while an entry is (re)built, so two processes build it once

An entry is written into a temporary folder next to it and renamed into place, so a reader
never sees a half-written one. ``SCORING_KIT_TOKENIZER_CACHE=0`` turns the cache off.
:data:`STATS` counts hits, builds and rebuilds in this process (tests read it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _settings
from .._exceptions import ScoringKitWarning, StoreError
from .._files import atomic_write_json, file_lock, read_json

__all__ = ["FORMAT", "MARKER", "STATS", "cache_root", "cached", "file_sha256"]

#: bumped when what an entry holds changes; an entry of another format is rebuilt
FORMAT = 1
MARKER = "complete.json"
#: per-process counts: "hit" (served from the cache), "build" (converted and stored),
#: "rebuild" (an entry was there but unusable), "uncached" (the cache could not be used)
STATS: Counter[str] = Counter()
#: a Gemma conversion takes minutes on a busy machine: wait that long for another builder
LOCK_TIMEOUT = 1800.0
_INDEX_LIMIT = 256


def cache_root() -> Path:
    """``$SCORING_KIT_CACHE/tokenizers`` (read when asked)."""
    return _settings.cache_dir() / "tokenizers"


# ── content hash, remembered per (path, size, mtime) ───────────────
def _hash_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_index(index: Path) -> dict[str, Any]:
    """The index, or {} when it is missing or unreadable (it is rewritten on the next hash)."""
    try:
        data: Any = read_json(index, {})
    except StoreError:
        return {}
    return dict(data) if isinstance(data, dict) else {}


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``, read from the index when its size and mtime are unchanged."""
    resolved = path.resolve()
    st = resolved.stat()
    key, stamp = str(resolved), [st.st_size, st.st_mtime_ns]
    index = cache_root() / "index.json"
    known = _read_index(index).get(key)
    if isinstance(known, list) and len(known) == 3 and known[:2] == stamp:
        return str(known[2])
    digest = _hash_file(resolved)
    with contextlib.suppress(StoreError, OSError), file_lock(index, timeout=10.0):
        data = {k: v for k, v in _read_index(index).items() if k != key and Path(k).exists()}
        data = dict(list(data.items())[-(_INDEX_LIMIT - 1):])
        data[key] = [*stamp, digest]
        atomic_write_json(index, data)
    return digest


# ── entries ──────────────────────────────────────────────────────
def _marker(digest: str, tag: str) -> dict[str, Any]:
    return {"sha256": digest, "tag": tag, "format": FORMAT}


def _valid(entry: Path, digest: str, tag: str) -> bool:
    try:
        return bool(read_json(entry / MARKER, None) == _marker(digest, tag))
    except StoreError:
        return False


def _try_load(entry: Path, load: Callable[[Path], Any]) -> Any | None:
    try:
        return load(entry)
    except Exception:  # an unreadable entry is rebuilt, never fatal
        return None


def _store(
    entry: Path, tok: Any, save: Callable[[Any, Path], None], marker: dict[str, Any]
) -> None:
    """Write ``tok`` as ``entry``: into a temporary folder, marker last, then one rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the entry from other users
        save(tok, tmp)
        atomic_write_json(tmp / MARKER, marker)
        if entry.exists():  # a stale or broken entry: move it aside, then away
            old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".old", dir=entry.parent))
            os.replace(entry, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            # someone else put a complete entry there first (only without the lock)
            if read_json(entry / MARKER, None) != marker:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached(
    gguf: Path,
    *,
    tag: str,
    convert: Callable[[], Any],
    load: Callable[[Path], Any],
    save: Callable[[Any, Path], None],
) -> Any:
    """The tokenizer of ``gguf``: from its cache entry, or ``convert()``-ed and stored.

    Parameters
    ----------
    gguf
        The model file; its sha256 names the entry.
    tag
        What else the entry depends on (the transformers version): another tag rebuilds it.
    convert
        Builds the tokenizer from the GGUF (the slow path).
    load
        Reads a tokenizer back from an entry's folder.
    save
        Writes a tokenizer into a folder (``save_pretrained`` and whatever it misses).

    A cache that cannot be read or written (read-only folder, full disk) never fails the
    load: the tokenizer is converted as without a cache, with a :class:`ScoringKitWarning`.
    """
    try:
        digest = file_sha256(gguf)
    except OSError as exc:
        return _uncached(convert, f"could not hash {gguf}: {exc}")
    entry = cache_root() / digest
    if _valid(entry, digest, tag) and (tok := _try_load(entry, load)) is not None:
        STATS["hit"] += 1
        return tok
    try:
        with file_lock(entry, timeout=LOCK_TIMEOUT):
            broken = entry.exists()
            if broken and _valid(entry, digest, tag):  # built meanwhile by another process
                tok = _try_load(entry, load)
                if tok is not None:
                    STATS["hit"] += 1
                    return tok
            tok = convert()
            try:
                _store(entry, tok, save, _marker(digest, tag))
            except Exception as exc:  # a full disk, a tokenizer save_pretrained refuses
                return _uncached(lambda: tok, f"could not write {entry}: {exc}")
            STATS["rebuild" if broken else "build"] += 1
            return tok
    except StoreError as exc:  # the lock file could not be made or was held too long
        return _uncached(convert, str(exc))


def _uncached(convert: Callable[[], Any], why: str) -> Any:
    STATS["uncached"] += 1
    msg = (
        f"tokenizer cache not used ({why}); converting the GGUF tokenizer each time "
        f"(set {_settings.TOKENIZER_CACHE_ENV}=0 to skip the cache quietly)"
    )
    warnings.warn(msg, ScoringKitWarning, stacklevel=3)
    return convert()
