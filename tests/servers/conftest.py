"""Real inference servers, started by ``make test-servers`` (``scripts/real_servers.py``).

The runner exports where each server listens; without it (plain ``make test``) every test
here skips, saying how to run them. These variables belong to the test harness, not to the
kit (the kit's own settings are in ``scoring_kit/_settings.py``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from _real import (
    LLAMA_KEY_ENV,
    LLAMA_SKIP_ENV,
    LLAMA_URL_ENV,
    SKIP_ENV,
    VLLM_KEY_ENV,
    VLLM_SKIP_ENV,
    VLLM_URL_ENV,
    RealServer,
)

HOW = "real-server tests run under `make test-servers` (scripts/real_servers.py)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "servers: needs a real inference server (make test-servers)")


def _server(url_env: str, key_env: str, skip_env: str | None = None) -> RealServer:
    reason = os.environ.get(SKIP_ENV) or (os.environ.get(skip_env) if skip_env else None)
    if reason:
        pytest.skip(reason)
    url = os.environ.get(url_env)
    if not url:
        pytest.skip(f"{url_env} is not set: {HOW}")
    return RealServer(url, os.environ.get(key_env, ""))


@pytest.fixture(scope="session")
def vllm_server() -> RealServer:
    return _server(VLLM_URL_ENV, VLLM_KEY_ENV, VLLM_SKIP_ENV)


@pytest.fixture(scope="session")
def llama_server() -> RealServer:
    return _server(LLAMA_URL_ENV, LLAMA_KEY_ENV, LLAMA_SKIP_ENV)


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test passes its key explicitly; an exported SCORING_KIT_API_KEY must not help."""
    monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)


@pytest.fixture(scope="session")
def local_matrix(engine: Any, tokenizer: Any) -> Any:
    """The sample's matrix from the embedded engine in-process (``--backend local``)."""
    from _helpers import sample_context

    from scoring_kit.backends.local import LocalScorer
    from scoring_kit.scoring.matrix import score_memories

    return score_memories(sample_context(tokenizer), LocalScorer(engine), progress=False)
