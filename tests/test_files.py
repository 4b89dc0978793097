"""Atomic, locked file helpers: content, corruption handling, and two real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from scoring_kit._exceptions import StoreError
from scoring_kit._files import (
    append_jsonl_atomic,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    locked_update_json,
    read_json,
    read_jsonl,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "j.json", {"a": np.arange(3), 1: "x"})
    assert orjson.loads((tmp_path / "j.json").read_bytes()) == {"a": [0, 1, 2], "1": "x"}
    assert _leftovers(tmp_path) == []
    assert _leftovers(tmp_path / "sub") == []


def test_atomic_write_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "m.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write_text(target, "new")
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.read_text() == "new"


def test_unserialisable_json_leaves_file_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "j.json"
    atomic_write_json(target, [1])
    with pytest.raises(StoreError, match=r"j\.json.*not JSON-serialisable"):
        atomic_write_json(target, {"x": object()})
    assert orjson.loads(target.read_bytes()) == [1]
    assert _leftovers(tmp_path) == []


def test_write_into_a_file_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="blocker"):
        atomic_write_text(blocker / "child.txt", "y")


def test_locked_update_json_default_and_update(tmp_path: Path) -> None:
    target = tmp_path / "store.json"
    default: list[int] = []
    out = locked_update_json(target, lambda v: [*v, 1], default)
    assert out == [1]
    assert default == []  # the default is copied, never mutated
    out = locked_update_json(target, lambda v: (v.append(2), v)[1], default)
    assert orjson.loads(target.read_bytes()) == [1, 2]


def test_locked_update_json_fn_error_leaves_file(tmp_path: Path) -> None:
    target = tmp_path / "store.json"
    atomic_write_json(target, {"n": 1})

    def boom(value: Any) -> Any:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        locked_update_json(target, boom, {})
    assert orjson.loads(target.read_bytes()) == {"n": 1}


@pytest.mark.parametrize("content", [b"", b'{"a": [1, 2', b"not json"])
def test_corrupt_file_raises_and_is_not_reset(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "store.json"
    target.write_bytes(content)
    with pytest.raises(StoreError) as info:
        locked_update_json(target, lambda v: v, {})
    msg = str(info.value)
    assert str(target) in msg
    assert "corrupt or truncated" in msg
    assert f"({len(content)} bytes)" in msg
    assert target.read_bytes() == content
    with pytest.raises(StoreError, match=r"store\.json"):
        read_json(target, None)


def test_read_json_missing_gives_default_copy(tmp_path: Path) -> None:
    default = {"a": []}
    got = read_json(tmp_path / "none.json", default)
    assert got == default and got is not default


def test_lock_timeout_names_path(tmp_path: Path) -> None:
    target = tmp_path / "store.json"
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with file_lock(target):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(StoreError) as info, file_lock(target, timeout=0.05):
            pass
        assert str(target) in str(info.value)
        assert "0.05 s" in str(info.value)
    finally:
        release.set()
        t.join(10)
    with file_lock(target, timeout=1):  # released again
        pass


def test_append_jsonl_atomic(tmp_path: Path) -> None:
    target = tmp_path / "q.jsonl"
    assert append_jsonl_atomic(target, []) == 0
    assert not target.exists()
    assert append_jsonl_atomic(target, [{"a": 1}, {"b": [1, 2]}]) == 2
    target.write_bytes(target.read_bytes() + b'{"hand": "edit"}')  # no final newline
    assert append_jsonl_atomic(target, iter([3])) == 1
    assert read_jsonl(target) == [{"a": 1}, {"b": [1, 2]}, {"hand": "edit"}, 3]
    assert target.read_bytes().endswith(b"3\n")
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_names_bad_line(tmp_path: Path) -> None:
    target = tmp_path / "q.jsonl"
    target.write_bytes(b'{"a": 1}\n\n{"b":\n')
    with pytest.raises(StoreError, match=r"q\.jsonl:3 is not valid JSON"):
        read_jsonl(target)


def _add_items(path: str, worker: int, count: int) -> None:
    for i in range(count):
        locked_update_json(path, lambda v, i=i: [*v, f"{worker}-{i}"], [])


def _append_items(path: str, worker: int, count: int) -> None:
    for i in range(count):
        append_jsonl_atomic(path, [{"w": worker, "i": i}])


def test_two_processes_locked_updates(tmp_path: Path) -> None:
    target = tmp_path / "shared.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add_items, args=(str(target), w, 200)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    items = orjson.loads(target.read_bytes())
    assert len(items) == 400
    assert set(items) == {f"{w}-{i}" for w in range(2) for i in range(200)}


def test_two_processes_append_jsonl(tmp_path: Path) -> None:
    target = tmp_path / "shared.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_items, args=(str(target), w, 100)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    records = read_jsonl(target)
    assert len(records) == 200
    assert {(r["w"], r["i"]) for r in records} == {(w, i) for w in range(2) for i in range(100)}
