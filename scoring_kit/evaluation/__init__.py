"""Attribution quality against gold evidence: LoCoMo cases, methods, metrics, harness.

Example (``scorer`` from :func:`scoring_kit.backends.auto.make_scorer`)::

    from scoring_kit.evaluation import build_cases, evaluate

    result = evaluate(scorer, build_cases(n_cases=12, memories_per_case=5))
    result.summary, result.chart()
"""

from .cases import CATEGORY_NAMES, LOCOMO_ENV, Case, build_cases, default_locomo_path
from .harness import (
    BASELINE_LABEL,
    PER_CASE_COLUMNS,
    EvaluationResult,
    aevaluate,
    evaluate,
    result_from_frames,
    run_evaluate_cli,
    summarize,
)
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    Method,
    MethodOutput,
    PreparedCase,
    get_method,
    lexical_scores,
    rank_average,
    surrogate,
)
from .metrics import (
    gold_rank,
    hit_at_k,
    random_baseline,
    recall_at_k,
    reciprocal_rank,
)

__all__ = [
    "BASELINE_LABEL",
    "CATEGORY_NAMES",
    "DEFAULT_METHODS",
    "LOCOMO_ENV",
    "METHODS",
    "PER_CASE_COLUMNS",
    "Case",
    "EvaluationResult",
    "Method",
    "MethodOutput",
    "PreparedCase",
    "aevaluate",
    "build_cases",
    "default_locomo_path",
    "evaluate",
    "get_method",
    "gold_rank",
    "hit_at_k",
    "lexical_scores",
    "random_baseline",
    "rank_average",
    "recall_at_k",
    "reciprocal_rank",
    "result_from_frames",
    "run_evaluate_cli",
    "summarize",
    "surrogate",
]
