"""Scoring flows: full matrix, single memory, incremental, finetune, training hand-off."""

from .divergence import column_scores, delta, divergence, ewma_weight, row_weights
from .finetune import (
    DEFAULT_THRESHOLD,
    AlternateParams,
    FinetuneCandidate,
    FinetuneStats,
    ascore_finetune,
    ascore_finetune_candidates,
    iter_finetune_candidates,
    score_finetune,
    score_finetune_candidates,
)
from .matrix import (
    MATRIX_COLUMNS,
    MATRIX_FILE_COLUMNS,
    MATRIX_FORMATS,
    MATRIX_SCHEMA,
    MATRIX_TEXT_COLUMNS,
    MemoryMatrix,
    ascore_memories,
    read_matrix_frame,
    score_memories,
)
from .store import MemoryRecord, MemoryStore, TrainedSet
from .train import TrainData, asend_to_train, send_to_train
from .triggers import FinetuneScoringTask, MemoryScoringTask
from .windows import (
    IncrementalResult,
    ascore_memories_incremental,
    ascore_memory,
    score_memories_incremental,
    score_memory,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "MATRIX_COLUMNS",
    "MATRIX_FILE_COLUMNS",
    "MATRIX_FORMATS",
    "MATRIX_SCHEMA",
    "MATRIX_TEXT_COLUMNS",
    "AlternateParams",
    "FinetuneCandidate",
    "FinetuneScoringTask",
    "FinetuneStats",
    "IncrementalResult",
    "MemoryMatrix",
    "MemoryRecord",
    "MemoryScoringTask",
    "MemoryStore",
    "TrainData",
    "TrainedSet",
    "ascore_finetune",
    "ascore_finetune_candidates",
    "ascore_memories",
    "ascore_memories_incremental",
    "ascore_memory",
    "asend_to_train",
    "column_scores",
    "delta",
    "divergence",
    "ewma_weight",
    "iter_finetune_candidates",
    "read_matrix_frame",
    "row_weights",
    "score_finetune",
    "score_finetune_candidates",
    "score_memories",
    "score_memories_incremental",
    "score_memory",
    "send_to_train",
]
