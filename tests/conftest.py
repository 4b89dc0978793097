"""Shared fixtures: the embedded model is loaded once per test session and served over
real HTTP on 127.0.0.1 (random port) from a background thread of this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def engine() -> Any:
    from scoring_kit.engine.engine import Engine

    return Engine.load()


@pytest.fixture(scope="session")
def tokenizer(engine: Any) -> Any:
    return engine.tokenizer


@pytest.fixture(scope="session")
def server(engine: Any) -> Iterator[Any]:
    from scoring_kit.server.runner import EmbeddedServer

    with EmbeddedServer(engine, host="127.0.0.1", port=0) as srv:
        yield srv


@pytest.fixture(scope="session")
def server_url(server: Any) -> str:
    return str(server.url)


@pytest.fixture(scope="session")
def sample_matrix(tokenizer: Any, server_url: str) -> Any:
    """The exact matrix of ``data/sample_conversation.jsonl``, scored once over HTTP."""
    import asyncio

    from scoring_kit.backends.http import ScoreClient
    from scoring_kit.context.io import load_context
    from scoring_kit.scoring import score_memories

    ctx = load_context(DATA / "sample_conversation.jsonl", tokenizer)
    c = ScoreClient(server_url)
    try:
        return score_memories(ctx, c, progress=False)
    finally:
        asyncio.run(c.aclose())
