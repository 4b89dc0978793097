"""The public sync wrappers show their real parameters (inspect.signature, Jupyter's ``?``),
and the package root exports the session and the approximate flows."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import scoring_kit
from scoring_kit.scoring import approx, finetune, matrix, windows
from scoring_kit.session import Session, open_session

TWINS: list[tuple[Callable[..., Any], Callable[..., Any]]] = [
    (matrix.score_memories, matrix.ascore_memories),
    (windows.score_memory, windows.ascore_memory),
    (windows.score_memories_incremental, windows.ascore_memories_incremental),
    (approx.score_memories_windowed, approx.ascore_memories_windowed),
    (approx.score_memories_hierarchical, approx.ascore_memories_hierarchical),
    (finetune.score_finetune, finetune.ascore_finetune),
    (finetune.score_finetune_candidates, finetune.ascore_finetune_candidates),
]


@pytest.mark.parametrize(("sync", "twin"), TWINS, ids=lambda f: getattr(f, "__name__", ""))
def test_sync_wrapper_has_its_async_twins_signature(
    sync: Callable[..., Any], twin: Callable[..., Any]
) -> None:
    sig = inspect.signature(sync)
    assert sig == inspect.signature(twin)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert sync.__name__ == twin.__name__[1:]  # score_x, not ascore_x
    assert not inspect.iscoroutinefunction(sync)
    assert f":func:`{twin.__name__}`" in (sync.__doc__ or "")


def test_signatures_list_the_parameters_notebooks_use() -> None:
    assert list(inspect.signature(matrix.score_memories).parameters) == [
        "ctx", "scorer", "keys", "checkpoint", "chunk_size", "priority", "progress", "on_row",
        "write_back"]
    params = inspect.signature(finetune.score_finetune_candidates).parameters
    assert params["threshold"].default == finetune.DEFAULT_THRESHOLD
    assert {"count", "trained", "alternates", "on_candidate"} <= set(params)
    assert inspect.signature(approx.score_memories_windowed).parameters["window"].default == 4


def test_open_session_has_the_session_parameters() -> None:
    sig = inspect.signature(open_session)
    want = [n for n in inspect.signature(Session).parameters]
    assert list(sig.parameters) == want
    assert want[:3] == ["server", "backend", "model"] and "**" not in str(sig)
    assert sig.return_annotation in (Session, "Session")


ROOT_NAMES = ("open_session", "Session", "score_memories_windowed",
              "score_memories_hierarchical", "ascore_memories_windowed",
              "ascore_memories_hierarchical")


def test_root_exports_the_session_and_the_approximate_flows() -> None:
    assert set(ROOT_NAMES) <= set(scoring_kit.__all__) <= set(dir(scoring_kit))
    assert scoring_kit.open_session is open_session
    assert scoring_kit.score_memories_windowed is approx.score_memories_windowed
    assert scoring_kit.score_memories_hierarchical is approx.score_memories_hierarchical
    for name in scoring_kit.__all__:
        assert getattr(scoring_kit, name) is not None, name


def test_import_stays_cheap() -> None:
    code = ("import sys, scoring_kit; scoring_kit.__all__; "
            "print(sorted(m for m in ('torch', 'polars', 'httpx', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
