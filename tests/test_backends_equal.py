"""All four backends produce the same numbers on the sample conversation: ``score`` (the
seed's ``/score``), ``vllm`` (``/v1/completions`` prompt_logprobs), ``sglang`` (``/generate``
input_token_logprobs), all against the session's embedded server, and ``local`` (the engine
in-process). The ``score`` matrix is the shared reference (see ``_helpers``: the engine's
prefix cache makes every backend after the first nearly free, the numbers are unchanged)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import SAMPLE, reference_matrix, roomy_prefix_cache, run_cli, sample_context

from scoring_kit.backends.auto import make_scorer
from scoring_kit.backends.base import Scorer
from scoring_kit.backends.local import LocalScorer
from scoring_kit.backends.vllm import CostWarning
from scoring_kit.scoring.matrix import MemoryMatrix, score_memories

HTTP_BACKENDS = ("score", "vllm", "sglang")


@pytest.fixture(autouse=True)
def _roomy_cache(monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    roomy_prefix_cache(monkeypatch, engine)


def _scorer(backend: str, server_url: str, engine: Any) -> Scorer:
    if backend == "local":
        return LocalScorer(engine)
    return make_scorer(server_url, backend=backend)


def test_auto_detection_picks_score_and_says_why(server_url: str) -> None:
    scorer = make_scorer(server_url)
    try:
        assert scorer.name == "score"
        det = scorer.detection  # type: ignore[attr-defined]
        assert det.backend == "score"
        assert det.reason == "GET /v1/models: owned_by 'scoring_kit'"
        assert det.probes and det.probes[0].startswith("GET /v1/models")
        assert det.model == "SmolLM2-135M-Instruct" and det.max_model_len == 8192
    finally:
        asyncio.run(scorer.aclose())


@pytest.mark.filterwarnings("ignore::scoring_kit.backends.vllm.CostWarning")
def test_baseline_totals_are_the_same_on_every_backend(
    engine: Any, tokenizer: Any, server_url: str
) -> None:
    req = sample_context(tokenizer).wire_prompt().request()
    totals: dict[str, np.ndarray] = {}
    for backend in ("vllm", "sglang", "score", "local"):
        scorer = _scorer(backend, server_url, engine)
        try:
            totals[backend] = asyncio.run(scorer.score(req))
        finally:
            asyncio.run(scorer.aclose())
        assert scorer.name == backend
    for backend, got in totals.items():
        assert got.shape == (13,) and np.isfinite(got).all() and (got < 0).all()
        np.testing.assert_allclose(got, totals["score"], atol=1e-3, err_msg=backend)


@pytest.mark.parametrize("backend", ["vllm", "sglang", "local"])
def test_full_matrix_is_the_same_on_every_backend(
    backend: str, engine: Any, tokenizer: Any, server_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vs the ``score`` reference; ``vllm`` goes through ``scoring-kit score --backend vllm``."""
    ctx = sample_context(tokenizer)
    if backend == "vllm":
        monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)
        monkeypatch.setattr("scoring_kit.engine.loader.load_tokenizer", lambda *_: tokenizer)
        out = tmp_path / "out"
        with pytest.warns(CostWarning, match="prompt_logprobs"):
            res = run_cli(["score", SAMPLE, "--out", out, "--server", server_url,
                           "--backend", "vllm", "--quiet"], capsys)
        assert res.code == 0, res.err
        got = MemoryMatrix.load(out / "matrix.parquet")
    else:
        scorer = _scorer(backend, server_url, engine)
        try:
            got = score_memories(ctx, scorer, progress=False)
        finally:
            asyncio.run(scorer.aclose())
    ref = reference_matrix(server_url, tokenizer)
    assert got.meta["backend"] == backend
    assert ref.meta["backend"] == "score"
    assert got.complete and got.keys == ref.keys
    assert np.array_equal(got.entries, ref.entries)
    np.testing.assert_allclose(got.baseline, ref.baseline, atol=1e-3)
    np.testing.assert_allclose(got.without, ref.without, atol=1e-3)
    np.testing.assert_allclose(got.divergence, ref.divergence, atol=1e-3)
