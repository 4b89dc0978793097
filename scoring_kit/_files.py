"""Crash-safe, process-safe writes of the files scoring_kit owns.

Every writer here goes through :func:`atomic_write_bytes`: the data is written to a temporary
file in the *same* folder, flushed and ``fsync``-ed, moved over the target with
:func:`os.replace` (atomic on POSIX and Windows), and the folder is ``fsync``-ed so that the
rename itself survives a power cut. A reader therefore sees either the old file or the new
one, never a torn mix.

Read-modify-write cycles (:func:`locked_update_json`, :func:`append_jsonl_atomic`) also hold
an advisory lock file next to the target (``<path>.lock``, via :mod:`filelock`), so two
processes — a notebook and a CLI run, say — never lose each other's updates.

A file that exists but cannot be parsed is an error (:class:`~scoring_kit.StoreError` naming
the path and the parse error); it is never silently replaced by a default.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ._exceptions import StoreError
from ._types import PathLike

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "append_jsonl_atomic",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_lock",
    "locked_update_json",
    "read_json",
    "read_jsonl",
]

T = TypeVar("T")

#: Seconds :func:`file_lock` waits for another process before it gives up.
DEFAULT_LOCK_TIMEOUT = 60.0

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _fsync_dir(directory: Path) -> None:
    """``fsync`` a folder so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows cannot open folders
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Parameters
    ----------
    path
        The target file. Its folder is created if missing. An existing file keeps its
        permission bits; a new one gets ``0o644``.
    data
        The complete new content.

    Raises
    ------
    StoreError
        The file could not be written (the message names the path and the OS error). The
        target is then unchanged and no temporary file is left behind.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = p.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        msg = f"could not write {p}: {exc}"
        raise StoreError(msg) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            msg = f"could not write {p}: {exc}"
            raise StoreError(msg) from exc
        raise
    _fsync_dir(p.parent)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


def _dumps(obj: Any, *, where: PathLike, indent: bool = False) -> bytes:
    option = _JSON_OPTIONS | (orjson.OPT_INDENT_2 if indent else 0)
    try:
        return orjson.dumps(obj, option=option)
    except TypeError as exc:
        msg = f"cannot write {where}: value is not JSON-serialisable: {exc}"
        raise StoreError(msg) from exc


def atomic_write_json(path: PathLike, obj: Any, *, indent: bool = False) -> None:
    """Replace ``path`` with ``obj`` as JSON (orjson; numpy arrays allowed), plus a newline.

    Parameters
    ----------
    path
        The target file.
    obj
        Any orjson-serialisable value (dict keys need not be strings).
    indent
        Pretty-print with two-space indentation.
    """
    atomic_write_bytes(path, _dumps(obj, where=path, indent=indent) + b"\n")


@contextlib.contextmanager
def file_lock(path: PathLike, *, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the advisory lock ``<path>.lock`` (across processes and threads).

    Parameters
    ----------
    path
        The file being protected (the lock file lies next to it).
    timeout
        Seconds to wait for the lock; a negative value waits forever.

    Raises
    ------
    StoreError
        The lock was not acquired within ``timeout`` seconds (names the path and timeout),
        or the lock file could not be created.

    Notes
    -----
    Locks are not re-entrant across ``file_lock`` calls: do not nest two ``file_lock`` calls
    on the same path in one thread (the inner one would wait for the outer one and time out).
    """
    import filelock

    p = Path(path)
    lock_path = str(p) + ".lock"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"could not create the folder of lock file {lock_path}: {exc}"
        raise StoreError(msg) from exc
    # thread_local=False: a fresh lock object per call, so threads exclude each other
    # through the OS lock, exactly like processes do.
    lock = filelock.FileLock(lock_path, timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        msg = (
            f"could not lock {p}: {lock_path} is held by another process or thread "
            f"and was not released within {timeout:g} s"
        )
        raise StoreError(msg) from exc
    except OSError as exc:
        msg = f"could not create lock file {lock_path} for {p}: {exc}"
        raise StoreError(msg) from exc
    try:
        yield
    finally:
        lock.release()


def read_json(path: PathLike, default: T) -> Any | T:
    """Parse the JSON file ``path``; return a deep copy of ``default`` if it does not exist.

    Raises
    ------
    StoreError
        The file exists but cannot be read or parsed (empty, truncated, not JSON): the
        message names the path and the parse error.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return copy.deepcopy(default)
    except OSError as exc:
        msg = f"could not read {p}: {exc}"
        raise StoreError(msg) from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = (
            f"{p} is corrupt or truncated ({len(raw)} bytes): {exc}; "
            "fix or remove it (it is never reset automatically)"
        )
        raise StoreError(msg) from exc


def locked_update_json(
    path: PathLike,
    fn: Callable[[Any], Any],
    default: Any,
    *,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    indent: bool = False,
) -> Any:
    """Lock, read, transform and atomically rewrite the JSON file ``path``.

    Parameters
    ----------
    path
        The JSON file.
    fn
        Called with the current value (a deep copy of ``default`` when the file does not
        exist yet); returns the new value. It may mutate its argument and return it.
        If it raises, the file is left unchanged.
    default
        The value used when the file does not exist.
    timeout
        Seconds to wait for the lock.
    indent
        Pretty-print the written JSON.

    Returns
    -------
    Any
        The new value, as written.

    Raises
    ------
    StoreError
        The lock timed out, the existing file is corrupt (path and parse error named), or it
        could not be written.
    """
    with file_lock(path, timeout=timeout):
        value = read_json(path, default)
        new = fn(value)
        atomic_write_json(path, new, indent=indent)
        return new


def read_jsonl(path: PathLike) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); a missing file gives ``[]``.

    Raises
    ------
    StoreError
        A line is not valid JSON: the message names the path, the 1-based line number and
        the parse error.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        msg = f"could not read {p}: {exc}"
        raise StoreError(msg) from exc
    out: list[Any] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            msg = f"{p}:{lineno} is not valid JSON: {exc}"
            raise StoreError(msg) from exc
    return out


def append_jsonl_atomic(
    path: PathLike, records: Iterable[Any], *, timeout: float = DEFAULT_LOCK_TIMEOUT
) -> int:
    """Append ``records`` (one JSON value per line) to ``path``, all or nothing.

    Strategy: under :func:`file_lock`, the existing bytes are read and the whole file is
    rewritten with the new lines through :func:`atomic_write_bytes`. A crash therefore
    leaves either the old file or the old file plus *all* new records — never a torn last
    line, which ``O_APPEND`` writes cannot promise. The price is O(file size) per call,
    which is fine for the files this is meant for (job queues, trained-sample sets: up to
    some tens of MB). A file that does not end with a newline (hand-edited) gets one before
    the new records.

    Parameters
    ----------
    path
        The JSON-lines file (created if missing).
    records
        JSON-serialisable values; each is written on its own line.
    timeout
        Seconds to wait for the lock.

    Returns
    -------
    int
        The number of records appended.
    """
    lines = [_dumps(r, where=path) + b"\n" for r in records]
    if not lines:
        return 0
    p = Path(path)
    with file_lock(p, timeout=timeout):
        try:
            old = p.read_bytes()
        except FileNotFoundError:
            old = b""
        except OSError as exc:
            msg = f"could not read {p}: {exc}"
            raise StoreError(msg) from exc
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(p, old + b"".join(lines))
    return len(lines)
