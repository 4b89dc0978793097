"""Helpers shared by test_reliability.py, test_cli.py and test_backends_equal.py.

Cost control (the model runs on a shared 2-core CPU): the reference matrix of the sample
conversation is computed once per test process and shared by the files that compare against
it, and :func:`roomy_prefix_cache` lets the session engine keep more prefixes between calls,
so that the same prompts sent again (by another backend, a resumed run, a repeated request)
reuse the work instead of recomputing it. Results do not depend on it.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_conversation.jsonl"

#: A small conversation for CLI runs: 3 memories, 2 responses (~100 tokens).
SMALL_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "memory", "key": "pet", "content": "The user's dog is called Pepper."},
    {"role": "user", "content": "What is my dog called?"},
    {"role": "assistant", "content": "Your dog is called Pepper."},
    {"role": "memory", "key": "city", "content": "The user lives in Lisbon, in Portugal."},
    {"role": "memory", "key": "food", "content": "The user's favourite food is paella."},
    {"role": "user", "content": "Where do I live?"},
    {"role": "assistant", "content": "You live in Lisbon."},
]

#: A small conversation for chat-template tests: 3 memories (two in a row), 2 responses.
TEMPLATE_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "memory", "key": "m1", "content": "Mel paints lakes."},
    {"role": "user", "content": "What do I paint?"},
    {"role": "assistant", "content": "You paint lakes."},
    {"role": "memory", "key": "m2", "content": "Mel plays the violin."},
    {"role": "memory", "key": "m3", "content": "Mel runs on Saturdays."},
    {"role": "user", "content": "Which instrument?"},
    {"role": "assistant", "content": "The violin."},
]

_REFERENCE: dict[str, Any] = {}

#: Prefixes the engine keeps between calls while these tests run (the engine's default is 4;
#: the sample's baseline and 8 ablations are 9, ~6k tokens, within its token budget, and the
#: short prompts of the other tests must not push them out).
PREFIX_CACHE_ENTRIES = 128


def roomy_prefix_cache(monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    """Let ``engine`` keep :data:`PREFIX_CACHE_ENTRIES` prefixes for this test (restored
    after it by ``monkeypatch``)."""
    monkeypatch.setattr(engine, "prefix_cache_entries",
                        max(PREFIX_CACHE_ENTRIES, engine.prefix_cache_entries))


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    """Write ``rows`` as JSONL; a ``str`` row is written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else orjson.dumps(r).decode() for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sample_context(tokenizer: Any) -> Any:
    """The sample conversation, loaded with the session tokenizer (cached)."""
    from scoring_kit.context.io import load_context

    key = f"ctx:{id(tokenizer)}"
    if key not in _REFERENCE:
        _REFERENCE[key] = load_context(SAMPLE, tokenizer)
    return _REFERENCE[key]


def sample_matrix(server_url: str, tokenizer: Any, backend: str) -> Any:
    """An uninterrupted in-process ``score_memories`` run of the sample against the session
    server with ``backend``, one request per memory, computed once per process.

    The ``vllm`` run always goes first: its prompt_logprobs requests score every position,
    so with :func:`roomy_prefix_cache` the engine then answers the same prompts for every
    other backend (and for the CLI runs on the sample) from its prefix cache."""
    from scoring_kit.backends.auto import make_scorer
    from scoring_kit.backends.http import ScoreClient
    from scoring_kit.scoring.matrix import score_memories

    for name in dict.fromkeys(("vllm", backend)):
        key = f"matrix:{server_url}:{name}"
        if key in _REFERENCE:
            continue
        scorer = (ScoreClient(server_url, batch=False) if name == "score"
                  else make_scorer(server_url, backend=name))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vllm's CostWarning: known, see the backend
                m = score_memories(sample_context(tokenizer), scorer, progress=False)
        finally:
            asyncio.run(scorer.aclose())
        assert m.complete and m.shape == (8, 13) and m.meta["backend"] == name, m
        _REFERENCE[key] = m
    return _REFERENCE[f"matrix:{server_url}:{backend}"]


def reference_matrix(server_url: str, tokenizer: Any) -> Any:
    """The reference: :func:`sample_matrix` with the seed's ``/score`` backend."""
    return sample_matrix(server_url, tokenizer, "score")


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> CliResult:
    """``scoring_kit.cli.main(argv)`` in-process; argparse's ``SystemExit`` becomes a code."""
    from scoring_kit.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    cap = capsys.readouterr()
    return CliResult(int(code), cap.out, cap.err)


class GatedEngine:
    """An engine proxy for an :class:`EmbeddedServer`: the first ``allow`` scoring calls go
    through, later ones wait in the engine until :meth:`open` (so a client can be stopped at
    an exact point of its run without racing it)."""

    def __init__(self, engine: Any, *, allow: int) -> None:
        self._engine = engine
        self.allow = allow
        self.calls = 0
        self.waiting = 0
        self._opened = False
        self._cond = threading.Condition()

    def __getattr__(self, name: str) -> Any:  # name, tokenizer, vocab_size, max_len, ...
        return getattr(self._engine, name)

    def _gate(self) -> None:
        with self._cond:
            self.calls += 1
            if self.calls <= self.allow or self._opened:
                return
            self.waiting += 1
            self._cond.notify_all()
            try:
                # bounded: a test that forgets to open() fails instead of hanging the server
                self._cond.wait_for(lambda: self._opened, timeout=300)
            finally:
                self.waiting -= 1

    def wait_until(self, predicate: Callable[[GatedEngine], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (checked on every gate event) or timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def open(self) -> None:
        with self._cond:
            self._opened = True
            self._cond.notify_all()

    def score(self, prompt: Any, ranges: Any) -> Any:
        self._gate()
        return self._engine.score(prompt, ranges)

    def score_many(self, items: Any) -> Any:
        self._gate()
        return self._engine.score_many(items)
