"""Scorer backends: the seed's /score, stock vLLM, SGLang, and the embedded engine."""

from .base import (
    DEFAULT_PRIORITY,
    CompletionRequest,
    Scorer,
    ScoreRequest,
    ScorerStats,
    WireImage,
    validate_score_request,
)

__all__ = [
    "DEFAULT_PRIORITY",
    "CompletionRequest",
    "ScoreRequest",
    "Scorer",
    "ScorerStats",
    "WireImage",
    "validate_score_request",
]
