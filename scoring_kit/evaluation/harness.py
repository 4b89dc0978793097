"""Run attribution methods over cases and score them against the gold memory.

:func:`aevaluate` (async) / :func:`evaluate` (sync, works inside Jupyter) run every method
on every case through one :class:`~scoring_kit.backends.base.Scorer` and return an
:class:`EvaluationResult`:

* ``per_case``: one row per (case, method): gold rank, hit@1, recall@3, reciprocal rank,
  calls and seconds, plus the scores themselves (so derived methods can be recomputed later);
* ``summary``: one row per method: hit@1, recall@3, MRR, hit@1 per category, cases, calls per
  case, and a ``random (1/K)`` row with the chance levels.

Parts shared by several methods on a case (``loo`` for ``loo_signed`` and
``loo+sufficiency``) are computed once; a derived method still reports the calls and
seconds it would cost on its own.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .. import _settings
from .._exceptions import ExportError, ScoringError, ScoringKitError, StoreError
from .._files import atomic_write_bytes
from .._types import PathLike
from ..backends.base import Scorer
from .cases import Case, build_cases
from .methods import DEFAULT_METHODS, METHODS, Method, MethodOutput, PreparedCase, get_method
from .metrics import expected_hit_at_k, expected_reciprocal_rank, gold_rank

if TYPE_CHECKING:
    import altair as alt
    import polars as pl

    from ..context.tokenizer import Tokenizer

__all__ = [
    "BASELINE_LABEL",
    "PER_CASE_COLUMNS",
    "EvaluationResult",
    "aevaluate",
    "evaluate",
    "result_from_frames",
    "run_evaluate_cli",
    "summarize",
]

log = logging.getLogger(__name__)

#: ``method`` label of the chance row in :attr:`EvaluationResult.summary`.
BASELINE_LABEL = "random (1/K)"

#: Columns of :attr:`EvaluationResult.per_case`.
PER_CASE_COLUMNS = (
    "case_id",
    "category",
    "method",
    "n_memories",
    "gold_key",
    "top_key",
    "gold_rank",
    "hit1",
    "recall3",
    "rr",
    "n_calls",
    "seconds",
    "scores",
    "error",
)

_PARQUET_KEY = "scoring_kit.evaluation"


def _per_case_schema() -> dict[str, Any]:
    import polars as pl

    return {
        "case_id": pl.String,
        "category": pl.Int64,
        "method": pl.String,
        "n_memories": pl.Int64,
        "gold_key": pl.String,
        "top_key": pl.String,
        "gold_rank": pl.Int64,
        "hit1": pl.Float64,
        "recall3": pl.Float64,
        "rr": pl.Float64,
        "n_calls": pl.Int64,
        "seconds": pl.Float64,
        "scores": pl.List(pl.Float64),
        "error": pl.String,
    }


def summarize(per_case: pl.DataFrame) -> pl.DataFrame:
    """The summary table of a ``per_case`` frame.

    One row per method (in first-seen order) with ``n_cases`` (scored without error),
    ``n_failed``, ``hit@1``, ``hit@1_se`` (binomial standard error), ``recall@3``, ``MRR``,
    ``hit@1_cat<c>`` per category, ``calls_per_case`` and ``seconds_per_case``; then the
    :data:`BASELINE_LABEL` row: the chance level of each metric averaged over the cases
    (``1/K`` for hit@1, ``min(3, K)/K`` for recall@3, ``H_K/K`` for MRR).
    """
    import polars as pl

    cats = sorted(per_case["category"].unique().to_list()) if per_case.height else []
    methods = list(dict.fromkeys(per_case["method"].to_list()))
    rows: list[dict[str, Any]] = []

    def metrics(frame: pl.DataFrame) -> dict[str, Any]:
        ok = frame.filter(pl.col("error").is_null())
        n = ok.height
        h1 = float(ok["hit1"].mean()) if n else float("nan")  # type: ignore[arg-type]
        row: dict[str, Any] = {
            "n_cases": n,
            "n_failed": frame.height - n,
            "hit@1": h1,
            "hit@1_se": float(np.sqrt(h1 * (1 - h1) / n)) if n else float("nan"),
            "recall@3": float(ok["recall3"].mean()) if n else float("nan"),  # type: ignore[arg-type]
            "MRR": float(ok["rr"].mean()) if n else float("nan"),  # type: ignore[arg-type]
        }
        for c in cats:
            sub = ok.filter(pl.col("category") == c)
            row[f"hit@1_cat{c}"] = (
                float(sub["hit1"].mean()) if sub.height else float("nan")  # type: ignore[arg-type]
            )
        row["calls_per_case"] = float(frame["n_calls"].mean()) if frame.height else 0.0  # type: ignore[arg-type]
        row["seconds_per_case"] = float(frame["seconds"].mean()) if frame.height else 0.0  # type: ignore[arg-type]
        return row

    for m in methods:
        rows.append({"method": m, **metrics(per_case.filter(pl.col("method") == m))})

    # chance level over the distinct cases
    cases = per_case.unique(subset=["case_id"], keep="first", maintain_order=True)
    if cases.height:
        ks = cases["n_memories"].to_numpy()
        h1s = np.array([expected_hit_at_k(int(k), 1) for k in ks])
        r3s = np.array([expected_hit_at_k(int(k), 3) for k in ks])
        rrs = np.array([expected_reciprocal_rank(int(k)) for k in ks])
        cat_arr = cases["category"].to_numpy()
        base: dict[str, Any] = {
            "method": BASELINE_LABEL,
            "n_cases": cases.height,
            "n_failed": 0,
            "hit@1": float(h1s.mean()),
            "hit@1_se": float("nan"),
            "recall@3": float(r3s.mean()),
            "MRR": float(rrs.mean()),
        }
        for c in cats:
            sel = cat_arr == c
            base[f"hit@1_cat{c}"] = float(h1s[sel].mean()) if sel.any() else float("nan")
        base["calls_per_case"] = 0.0
        base["seconds_per_case"] = 0.0
        rows.append(base)
    if not rows:
        return pl.DataFrame(
            schema={"method": pl.String, "n_cases": pl.Int64, "hit@1": pl.Float64,
                    "recall@3": pl.Float64, "MRR": pl.Float64}
        )
    return pl.DataFrame(rows)


@dataclass(slots=True)
class EvaluationResult:
    """Per-case results and their summary.

    Attributes
    ----------
    per_case
        One row per (case, method): :data:`PER_CASE_COLUMNS`.
    meta
        Run facts: methods, seed, backend, number of cases, wall time.
    """

    per_case: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> pl.DataFrame:
        """See :func:`summarize`."""
        return summarize(self.per_case)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.per_case["method"].to_list()))

    def chart(self, metrics: Sequence[str] = ("hit@1", "MRR")) -> alt.FacetChart:
        """Grouped bars of ``metrics`` per method, the chance level as a dashed rule.

        One panel per metric; the rule is the :data:`BASELINE_LABEL` value of that metric.
        """
        import altair as alt
        import polars as pl

        summ = self.summary
        base = summ.filter(pl.col("method") == BASELINE_LABEL)
        rows = summ.filter(pl.col("method") != BASELINE_LABEL)
        long: list[dict[str, Any]] = []
        for metric in metrics:
            if metric not in summ.columns:
                msg = f"unknown metric {metric!r}; summary has {', '.join(summ.columns[1:])}"
                raise ScoringError(msg)
            chance = float(base[metric][0]) if base.height else float("nan")
            for r in rows.iter_rows(named=True):
                long.append(
                    {"metric": metric, "method": r["method"], "value": r[metric],
                     "chance": chance, "n_cases": r["n_cases"]}
                )
        data = pl.DataFrame(long) if long else pl.DataFrame(
            schema={"metric": pl.String, "method": pl.String, "value": pl.Float64,
                    "chance": pl.Float64, "n_cases": pl.Int64}
        )
        order = rows["method"].to_list()
        bars = alt.Chart().mark_bar().encode(
            x=alt.X("method:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
            y=alt.Y("value:Q", title="score", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("method:N", sort=order, legend=None),
            tooltip=["method:N", "metric:N", alt.Tooltip("value:Q", format=".3f"),
                     "n_cases:Q"],
        )
        rule = alt.Chart().mark_rule(color="black", strokeDash=[4, 3]).encode(
            y="chance:Q", tooltip=[alt.Tooltip("chance:Q", format=".3f", title="random 1/K")]
        )
        return (
            alt.layer(bars, rule, data=data)
            .properties(width=max(140, 34 * len(order)), height=220)
            .facet(column=alt.Column("metric:N", sort=list(metrics), title=None))
            .properties(title="Gold-memory attribution (dashed: random baseline)")
        )

    # ── persistence ────────────────────────────────────────────
    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write ``per_case`` as parquet, atomically, with ``meta`` and the summary in the
        file's key-value metadata (``scoring_kit.evaluation``); an existing file is an
        error unless ``overwrite``."""
        p = Path(path)
        if p.suffix != ".parquet":
            msg = f"cannot save an evaluation as {p.suffix or 'no suffix'!r}: use .parquet"
            raise ExportError(msg)
        if p.exists() and not overwrite:
            raise ExportError(f"{p} exists; pass overwrite=True to replace it")
        buf = io.BytesIO()
        header = {
            "meta": self.meta,
            "summary": self.summary.to_dicts(),
        }
        meta = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY, default=str).decode()
        self.per_case.write_parquet(buf, metadata={_PARQUET_KEY: meta})
        atomic_write_bytes(p, buf.getvalue())
        return p

    @classmethod
    def load(cls, path: PathLike) -> EvaluationResult:
        """Read a file written by :meth:`save`."""
        import polars as pl

        p = Path(path)
        try:
            raw = pl.read_parquet_metadata(p).get(_PARQUET_KEY)
            if raw is None:
                raise ExportError(f"{p} is a parquet file but not a scoring_kit evaluation")
            frame = pl.read_parquet(p)
        except ExportError:
            raise
        except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
            raise StoreError(f"{p}: not a readable scoring_kit evaluation: {exc}") from exc
        header = orjson.loads(raw)
        return cls(frame, dict(header.get("meta", {})))

    def __repr__(self) -> str:
        n = self.per_case["case_id"].n_unique() if self.per_case.height else 0
        return f"EvaluationResult({n} cases × {len(self.methods)} methods: {self.methods})"


def _tokenizer_for(scorer: Scorer) -> Tokenizer:
    tok = getattr(scorer, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(scorer, "engine", None), "tokenizer", None)
    if tok is not None:
        return tok  # type: ignore[no-any-return]
    from ..engine.loader import load_tokenizer

    log.warning(
        "scorer %r exposes no tokenizer: using the embedded model's; pass tokenizer= if the "
        "server runs another model", getattr(scorer, "name", type(scorer).__name__)
    )
    return load_tokenizer()


def _resolve(methods: Iterable[str | Method]) -> tuple[list[Method], dict[str, Method]]:
    chosen = [get_method(m) for m in methods]
    names = [m.name for m in chosen]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ScoringError(f"method(s) {sorted(dup)} given more than once")
    registry = {**METHODS, **{m.name: m for m in chosen}}
    # check derived parts resolve now, not in the middle of a run
    for m in chosen:
        for part in m.parts:
            get_method(part, registry=registry)
    return chosen, registry


def _row(
    case: Case, method: str, out: MethodOutput | None, error: str | None, seconds: float
) -> dict[str, Any]:
    n = len(case.memories)
    row: dict[str, Any] = {
        "case_id": case.id,
        "category": case.category,
        "method": method,
        "n_memories": n,
        "gold_key": case.gold_key,
        "top_key": None,
        "gold_rank": None,
        "hit1": None,
        "recall3": None,
        "rr": None,
        "n_calls": 0 if out is None else out.n_calls,
        "seconds": seconds if out is None else out.seconds,
        "scores": None,
        "error": error,
    }
    if out is not None:
        s = out.scores
        rank = gold_rank(s, case.gold_index)
        finite = np.where(np.isnan(s), -np.inf, s)
        row.update(
            top_key=case.keys[int(np.argmax(finite))],
            gold_rank=rank,
            hit1=float(rank <= 1),
            recall3=float(rank <= 3),
            rr=1.0 / rank,
            scores=[float(v) for v in s],
        )
    return row


async def aevaluate(
    scorer: Scorer,
    cases: Sequence[Case],
    methods: Iterable[str | Method] = DEFAULT_METHODS,
    *,
    tokenizer: Tokenizer | None = None,
    seed: int = 0,
    progress: bool = True,
    render: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Run ``methods`` on ``cases`` and score each against the gold memory.

    Parameters
    ----------
    scorer
        Any :class:`~scoring_kit.backends.base.Scorer` (model-free methods do not call it).
    cases
        From :func:`~scoring_kit.evaluation.cases.build_cases`.
    methods
        Registry names (:data:`~scoring_kit.evaluation.methods.METHODS`) or
        :class:`~scoring_kit.evaluation.methods.Method` objects (e.g.
        ``surrogate(64, alpha=0.02)``).
    tokenizer
        The tokenizer of the scorer's model; default: the scorer's (local engine) or the
        embedded model's.
    seed
        Seeds every method's randomness (with the case id and the method name).
    progress
        Show a tqdm bar over cases.

    Returns
    -------
    EvaluationResult

    Notes
    -----
    A method that fails on a case (a :class:`~scoring_kit.ScoringKitError`, e.g. a backend
    error) gives a row with ``error`` set and null metrics; it is left out of the summary's
    means and counted in ``n_failed``.
    """
    import polars as pl

    chosen, registry = _resolve(methods)
    if not cases:
        raise ScoringError("no cases to evaluate")
    tok = None
    if any(m.uses_model or m.derived for m in chosen):
        tok = tokenizer if tokenizer is not None else _tokenizer_for(scorer)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc="evaluating", unit="case", leave=True)
    try:
        for case in cases:
            prepared = (
                PreparedCase.build(case, tok, render=render)
                if tok is not None
                else PreparedCase(case, None, case.keys, case.gold_index)
            )
            memo: dict[str, MethodOutput] = {}
            for m in chosen:
                t0 = time.perf_counter()
                try:
                    out = await m.arun(scorer, prepared, seed=seed, cache=memo,
                                       registry=registry)
                except ScoringKitError as exc:
                    log.warning("%s failed on case %s: %s", m.name, case.id, exc)
                    rows.append(_row(case, m.name, None, str(exc),
                                     time.perf_counter() - t0))
                    continue
                rows.append(_row(case, m.name, out, None, 0.0))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(case.id)
    finally:
        if bar is not None:
            bar.close()
    frame = pl.DataFrame(rows, schema=_per_case_schema())
    meta = {
        "methods": [m.name for m in chosen],
        "method_descriptions": {m.name: m.description for m in chosen},
        "seed": seed,
        "n_cases": len(cases),
        "backend": getattr(scorer, "name", type(scorer).__name__),
        "tokenizer": getattr(tok, "name", None),
        "wall_seconds": time.perf_counter() - t_start,
    }
    return EvaluationResult(frame, meta)


def evaluate(
    scorer: Scorer,
    cases: Sequence[Case],
    methods: Iterable[str | Method] = DEFAULT_METHODS,
    *,
    tokenizer: Tokenizer | None = None,
    seed: int = 0,
    progress: bool = True,
    render: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Synchronous :func:`aevaluate` (works inside Jupyter too)."""
    from .._sync import run_sync

    return run_sync(
        aevaluate(scorer, cases, methods, tokenizer=tokenizer, seed=seed, progress=progress,
                  render=render)
    )


# ── CLI ───────────────────────────────────────────────────────────
def _cli_scorer(args: Any) -> tuple[Scorer, Tokenizer | None]:
    """The CLI's scorer and tokenizer.

    ``--server`` / ``$SCORING_KIT_SERVER``: :func:`~scoring_kit.backends.auto.make_scorer`,
    with the tokenizer of ``--model-path`` (default: the embedded model's). Otherwise the
    embedded engine in-process (``--model-path``, ``--device``).
    """
    server = getattr(args, "server", None) or _settings.server()
    model_path = getattr(args, "model_path", None)
    if server:
        from ..backends.auto import make_scorer
        from ..engine.loader import load_tokenizer

        scorer = make_scorer(
            server,
            backend=getattr(args, "backend", None) or "auto",
            model=getattr(args, "model", None),
            api_key=getattr(args, "api_key", None) or _settings.api_key(),
            concurrency=int(getattr(args, "concurrency", None) or 4),
        )
        return scorer, load_tokenizer(model_path)
    from ..backends.local import LocalScorer

    return LocalScorer(model_path=model_path, device=getattr(args, "device", None)), None


def run_evaluate_cli(args: Any) -> int:
    """``scoring-kit evaluate``: build cases, evaluate, print the summary, write parquet.

    ``args`` is an ``argparse.Namespace`` (or anything with these attributes):
    ``method`` (list of names, or None for the defaults), ``cases``, ``memories``, ``seed``,
    ``out`` (a ``.parquet`` path or None), ``locomo`` (path or None); optional ``server``,
    ``backend``, ``model``, ``api_key``, ``model_path``, ``device``, ``concurrency``,
    ``progress``.

    Returns
    -------
    int
        0 on success, 1 on a :class:`~scoring_kit.ScoringKitError` (printed to stderr).
    """
    import sys

    import polars as pl

    methods = list(getattr(args, "method", None) or DEFAULT_METHODS)
    try:
        for m in methods:
            get_method(m)
        out = getattr(args, "out", None)
        if out is not None and Path(out).suffix != ".parquet":
            raise ExportError(f"--out {out}: the evaluation is written as .parquet")
        cases = build_cases(
            getattr(args, "locomo", None),
            n_cases=int(args.cases),
            memories_per_case=int(args.memories),
            seed=int(args.seed),
        )
        needs_model = any(get_method(m).uses_model or get_method(m).derived for m in methods)
        scorer: Any = None
        tokenizer = None
        if needs_model:
            scorer, tokenizer = _cli_scorer(args)
        try:
            result = evaluate(
                scorer, cases, methods, tokenizer=tokenizer, seed=int(args.seed),
                progress=bool(getattr(args, "progress", True)),
                render={k: getattr(args, k) for k in
                        ("chat_template", "memory_placement", "score_span")
                        if getattr(args, k, None) is not None},
            )
        finally:
            if scorer is not None:
                from .._sync import run_sync

                run_sync(scorer.aclose())
        with pl.Config(tbl_cols=-1, tbl_rows=-1, tbl_width_chars=200, float_precision=3):
            print(result.summary)
        if out is not None:
            result.save(out, overwrite=True)
            print(f"wrote {out}")
    except ScoringKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def result_from_frames(
    frames: Iterable[pl.DataFrame], meta: Mapping[str, Any] | None = None
) -> EvaluationResult:
    """Concatenate ``per_case`` frames (e.g. several runs) into one result."""
    import polars as pl

    return EvaluationResult(pl.concat(list(frames), how="vertical"), dict(meta or {}))
