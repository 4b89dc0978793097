"""scoring_kit: which memories in an LLM agent's context shape its answers.

The public verbs are re-exported here lazily (``import scoring_kit`` stays cheap: no torch,
no polars, no httpx until used).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._exceptions import (
    BackendError,
    BackendUnavailable,
    ContextError,
    ExportError,
    MissingDependencyError,
    ModelLoadError,
    PromptError,
    ProtocolError,
    ScoringAPIError,
    ScoringError,
    ScoringKitError,
    StoreError,
)

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # context
    "ContextState": "scoring_kit.context.model",
    "Node": "scoring_kit.context.model",
    "WirePrompt": "scoring_kit.context.model",
    "load_context": "scoring_kit.context.io",
    "save_context": "scoring_kit.context.io",
    "context_from_messages": "scoring_kit.context.io",
    # backends
    "ScoreRequest": "scoring_kit.wire",
    "CompletionRequest": "scoring_kit.wire",
    "Scorer": "scoring_kit.backends.base",
    "make_scorer": "scoring_kit.backends.auto",
    "ScoreClient": "scoring_kit.backends.http",
    "LocalScorer": "scoring_kit.backends.local",
    # engine / server
    "Engine": "scoring_kit.engine.engine",
    "load_tokenizer": "scoring_kit.engine.loader",
    "EmbeddedServer": "scoring_kit.server.runner",
    # session
    "Session": "scoring_kit.session",
    "open_session": "scoring_kit.session",
    # flows
    "MemoryMatrix": "scoring_kit.scoring.matrix",
    "score_memories": "scoring_kit.scoring.matrix",
    "ascore_memories": "scoring_kit.scoring.matrix",
    "score_memories_windowed": "scoring_kit.scoring.approx",
    "ascore_memories_windowed": "scoring_kit.scoring.approx",
    "score_memories_hierarchical": "scoring_kit.scoring.approx",
    "ascore_memories_hierarchical": "scoring_kit.scoring.approx",
    "replay_windowed": "scoring_kit.scoring.replay",
    "score_memory": "scoring_kit.scoring.windows",
    "score_memories_incremental": "scoring_kit.scoring.windows",
    "score_finetune": "scoring_kit.scoring.finetune",
    "score_finetune_candidates": "scoring_kit.scoring.finetune",
    "FinetuneCandidate": "scoring_kit.scoring.finetune",
    "MemoryStore": "scoring_kit.scoring.store",
    "TrainedSet": "scoring_kit.scoring.store",
    "send_to_train": "scoring_kit.scoring.train",
    "MemoryScoringTask": "scoring_kit.scoring.triggers",
    "FinetuneScoringTask": "scoring_kit.scoring.triggers",
}

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ContextError",
    "ExportError",
    "MissingDependencyError",
    "ModelLoadError",
    "PromptError",
    "ProtocolError",
    "ScoringAPIError",
    "ScoringError",
    "ScoringKitError",
    "StoreError",
    "__version__",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        msg = f"module 'scoring_kit' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
