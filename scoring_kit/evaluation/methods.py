"""Attribution methods: per-memory importance for a case's single response.

Every method takes a :class:`PreparedCase` (a :class:`~scoring_kit.evaluation.cases.Case`
rendered as a context) and returns a :class:`MethodOutput` whose ``scores`` has one value per
memory, in prompt order; **higher means more important**. All model-based methods go through
the same async :class:`~scoring_kit.backends.base.Scorer` and send their prompts in one
``score_batch`` (the fullest prompt first), so the local engine's prefix-KV reuse and a
server's prefix cache both help.

========================  =====================================================  ===========
name                      score of memory *i*                                    calls
========================  =====================================================  ===========
``loo``                   ``max(lp(all) - lp(all \\ i), 0)``: exact leave-one-out  N + 1
                          divergence (signed delta in ``extra["delta"]``)
``loo_signed``            ``lp(all) - lp(all \\ i)``, unclamped (a view of loo)   N + 1
``sufficiency``           ``lp({i}) - lp({})``: memory i alone vs no memories     N + 1
                          (SelfCite's sufficiency, paired with loo's necessity)
``surrogate``             ContextCite: Lasso weights of ``lp(mask)`` on random     <= A
                          keep-masks (p = 1/2), ``A = n_ablations``
``loo+sufficiency``       mean of the within-case ranks of loo_signed and         2N + 2
                          sufficiency
``lexical``               binary-cosine word overlap of the memory with question  0
                          + answer (no model)
``random``                seeded uniform noise (the chance baseline)              0
========================  =====================================================  ===========

``lp(S)`` is the total log-probability of the response with only the memories in ``S``
present (system prompt, question and response always present).

Randomness (surrogate masks, random scores) comes from a numpy ``Generator`` seeded from
``(seed, case id, method name)``, so results are reproducible and independent of the order
in which methods or cases run.

Measured on the embedded SmolLM2-135M-Instruct (60 LoCoMo cases × 6 memories, seed 0;
chance hit@1 = 1/6 = 0.167, MRR 0.408):

===================  =====  ========  =====  ==========
method               hit@1  recall@3  MRR    calls/case
===================  =====  ========  =====  ==========
loo                  0.383  0.400     0.492  7
loo_signed           0.500  0.700     0.646  7
sufficiency          0.550  0.717     0.679  7
surrogate            0.450  0.700     0.621  25.4
loo+sufficiency      0.533  0.650     0.654  14
lexical              0.800  0.933     0.864  0
random               0.100  0.483     0.365  0
===================  =====  ========  =====  ==========

Every model-based method beats chance, and plain word overlap beats every one of them. For
this model, removing the gold memory *raises* the answer's log-prob in 60 % of cases (median
gold delta -0.11 nats), so clamped ``loo`` is all-zero in 15/60 cases, and pessimistic ties
count those as misses. A memory on its own helps whether or not it is gold (sufficiency:
median +1.24 nats for the gold memory vs +1.01 for the best distractor). So rank on the
signed delta, and expect the model-based numbers to move with model size. ``loo+sufficiency``
is **not** better than ``sufficiency`` alone here; it is kept to compare on larger models.
Adding ``lexical`` to a rank average makes ``lexical`` worse (0.63).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .._exceptions import MissingDependencyError, ScoringError
from .._types import FloatArray
from ..backends.base import DEFAULT_PRIORITY, Scorer, ScoreRequest
from ..scoring.divergence import delta as _delta
from ..scoring.divergence import divergence as _divergence
from .cases import Case

if TYPE_CHECKING:
    from ..context.model import ContextState
    from ..context.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "MethodOutput",
    "PreparedCase",
    "get_method",
    "lexical_scores",
    "method_rng",
    "rank_average",
    "rank_average_scores",
    "surrogate",
]

BoolArray = npt.NDArray[np.bool_]

#: What :func:`~scoring_kit.evaluation.harness.evaluate` runs by default.
DEFAULT_METHODS: tuple[str, ...] = ("loo", "sufficiency", "surrogate", "lexical", "random")


# ── the case as a context ─────────────────────────────────────────
@dataclass(frozen=True, slots=True)
class PreparedCase:
    """A case rendered with a tokenizer, ready to be ablated.

    Attributes
    ----------
    case
        The case.
    ctx
        Its context (system, memories, question, answer); None when only model-free
        methods run (no tokenizer needed).
    keys
        Memory keys in prompt order (``scores[i]`` belongs to ``keys[i]``).
    gold_index
        Position of the gold memory in ``keys``.
    """

    case: Case
    ctx: ContextState | None
    keys: tuple[str, ...]
    gold_index: int
    priority: int | None = DEFAULT_PRIORITY

    @classmethod
    def build(
        cls,
        case: Case,
        tokenizer: Tokenizer,
        *,
        priority: int | None = DEFAULT_PRIORITY,
        render: Mapping[str, Any] | None = None,
    ) -> PreparedCase:
        """Render ``case`` with ``tokenizer`` and check it has exactly one response.

        ``render``: chat-template options for
        :func:`~scoring_kit.context.io.context_from_messages` (``chat_template``,
        ``memory_placement``, ``score_span``).
        """
        ctx = case.context(tokenizer, **(render or {}))
        keys = tuple(ctx.memory_keys())
        if keys != case.keys:
            msg = f"case {case.id}: context memory keys {keys} differ from the case's {case.keys}"
            raise ScoringError(msg)
        if len(ctx.response_indices()) != 1:
            msg = (
                f"case {case.id}: expected exactly one assistant response, "
                f"got {len(ctx.response_indices())}"
            )
            raise ScoringError(msg)
        return cls(case, ctx, keys, case.gold_index, priority)

    @property
    def n_memories(self) -> int:
        return len(self.keys)

    def request(self, keep: Sequence[bool] | BoolArray) -> ScoreRequest:
        """The score request with only the memories where ``keep`` is true present."""
        if self.ctx is None:
            msg = f"case {self.case.id} was prepared without a tokenizer: it has no prompt"
            raise ScoringError(msg)
        mask = np.asarray(keep, dtype=bool).reshape(-1)
        if mask.shape[0] != self.n_memories:
            msg = (
                f"case {self.case.id}: keep-mask has {mask.shape[0]} entries for "
                f"{self.n_memories} memories"
            )
            raise ScoringError(msg)
        dropped = {k for k, m in zip(self.keys, mask.tolist(), strict=True) if not m}
        wp = self.ctx.wire_prompt(
            skip=lambda n: n.kind == "memory" and n.key in dropped
        )
        if len(wp.ranges) != 1:
            msg = f"case {self.case.id}: the prompt has {len(wp.ranges)} responses, not 1"
            raise ScoringError(msg)
        return wp.request(priority=self.priority)


@dataclass(slots=True)
class MethodOutput:
    """What one method says about one case.

    Attributes
    ----------
    method
        The method's name.
    scores
        ``(N,)`` importance per memory, prompt order; higher = more important.
    n_calls
        Prompts scored (0 for model-free methods; a derived method counts its parts).
    seconds
        Wall time spent (a derived method: its parts' total).
    extra
        Method-specific results (``loo``: ``baseline``, ``without``, ``delta``;
        ``surrogate``: ``intercept``, ``r2``, ``masks``, ``targets`` ...).
    """

    method: str
    scores: FloatArray
    n_calls: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[Scorer, PreparedCase, np.random.Generator], Awaitable[MethodOutput]]
CombineFn = Callable[[Sequence[MethodOutput]], FloatArray]


@dataclass(frozen=True, slots=True)
class Method:
    """An attribution method: a base method (``run``) or a derived one (``parts`` +
    ``combine``, computed from the outputs of other methods on the same case).

    Attributes
    ----------
    name
        Registry name, also the label in results.
    description
        One line for tables and docs.
    run
        ``async (scorer, prepared_case, rng) -> MethodOutput`` (base methods).
    parts
        Names of the methods a derived method is computed from.
    combine
        ``(outputs of parts) -> scores`` (derived methods).
    uses_model
        False for model-free baselines.
    """

    name: str
    description: str
    run: MethodFn | None = None
    parts: tuple[str, ...] = ()
    combine: CombineFn | None = None
    uses_model: bool = True

    def __post_init__(self) -> None:
        if (self.run is None) == (self.combine is None):
            msg = f"method {self.name!r} needs either run, or parts and combine (not both)"
            raise ScoringError(msg)
        if self.combine is not None and not self.parts:
            raise ScoringError(f"derived method {self.name!r} names no parts")

    @property
    def derived(self) -> bool:
        return self.combine is not None

    async def arun(
        self,
        scorer: Scorer,
        case: PreparedCase,
        *,
        seed: int = 0,
        cache: dict[str, MethodOutput] | None = None,
        registry: Mapping[str, Method] | None = None,
    ) -> MethodOutput:
        """Run on one case (derived methods run or reuse their parts via ``cache``)."""
        memo = cache if cache is not None else {}
        if self.name in memo:
            return memo[self.name]
        if self.combine is None:
            assert self.run is not None
            t0 = time.perf_counter()
            out = await self.run(scorer, case, method_rng(seed, case.case.id, self.name))
            out.method = self.name
            out.seconds = out.seconds or time.perf_counter() - t0
        else:
            reg = registry if registry is not None else METHODS
            outs = []
            for part in self.parts:
                outs.append(
                    await get_method(part, registry=reg).arun(
                        scorer, case, seed=seed, cache=memo, registry=reg
                    )
                )
            scores = np.asarray(self.combine(outs), dtype=np.float64).reshape(-1)
            out = MethodOutput(
                self.name,
                scores,
                n_calls=sum(o.n_calls for o in outs),
                seconds=sum(o.seconds for o in outs),
                extra={"parts": list(self.parts)},
            )
        if out.scores.shape != (case.n_memories,):
            msg = (
                f"method {self.name!r} on case {case.case.id} returned {out.scores.shape} "
                f"scores for {case.n_memories} memories"
            )
            raise ScoringError(msg)
        memo[self.name] = out
        return out


def method_rng(seed: int, case_id: str, method: str) -> np.random.Generator:
    """The generator a method uses on a case: seeded from ``(seed, case, method)``."""
    return np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, zlib.crc32(case_id.encode()), zlib.crc32(method.encode())]
    )


# ── scoring helper ────────────────────────────────────────────────
async def _totals(
    scorer: Scorer, case: PreparedCase, masks: Sequence[BoolArray], labels: Sequence[str],
    method: str,
) -> FloatArray:
    """Response log-prob for each keep-mask (one ``score_batch``); raise on any failure."""
    reqs = [case.request(m) for m in masks]
    outs = await scorer.score_batch(reqs)
    if len(outs) != len(reqs):
        msg = (
            f"{method} on case {case.case.id}: the scorer returned {len(outs)} results "
            f"for {len(reqs)} requests"
        )
        raise ScoringError(msg)
    vals = np.empty(len(reqs), dtype=np.float64)
    for i, out in enumerate(outs):
        if isinstance(out, BaseException):
            msg = f"{method} on case {case.case.id}: prompt {labels[i]} failed: {out}"
            raise ScoringError(msg) from out
        arr = np.asarray(out, dtype=np.float64).reshape(-1)
        if arr.shape != (1,):
            msg = (
                f"{method} on case {case.case.id}: prompt {labels[i]} returned "
                f"{arr.shape[0]} scores for 1 response"
            )
            raise ScoringError(msg)
        vals[i] = arr[0]
    return vals


# ── base methods ──────────────────────────────────────────────────
def _flip_each(n: int, *, keep: bool) -> list[BoolArray]:
    """The mask with every memory ``keep``, then one per memory with only that one flipped."""
    base = np.full(n, keep, dtype=bool)
    return [base, *np.logical_xor(base, np.eye(n, dtype=bool))]


async def _loo(scorer: Scorer, case: PreparedCase, rng: np.random.Generator) -> MethodOutput:
    n = case.n_memories
    masks = _flip_each(n, keep=True)
    labels = ["full", *(f"without {k}" for k in case.keys)]
    t = await _totals(scorer, case, masks, labels, "loo")
    baseline, without = t[:1], t[1:].reshape(n, 1)
    d = _delta(baseline, without).reshape(n)
    div = _divergence(baseline, without).reshape(n)
    return MethodOutput(
        "loo",
        div,
        n_calls=len(masks),
        extra={"baseline": float(t[0]), "without": t[1:].copy(), "delta": d},
    )


async def _sufficiency(
    scorer: Scorer, case: PreparedCase, rng: np.random.Generator
) -> MethodOutput:
    n = case.n_memories
    masks = _flip_each(n, keep=False)
    labels = ["no memories", *(f"only {k}" for k in case.keys)]
    t = await _totals(scorer, case, masks, labels, "sufficiency")
    return MethodOutput(
        "sufficiency",
        t[1:] - t[0],
        n_calls=len(masks),
        extra={"empty": float(t[0]), "alone": t[1:].copy()},
    )


def _lasso(x: FloatArray, y: FloatArray, alpha: float) -> tuple[FloatArray, float]:
    try:
        from sklearn.linear_model import Lasso
    except ImportError as exc:  # pragma: no cover - sklearn is in the engine extra
        msg = (
            "the surrogate method needs scikit-learn: pip install 'scoring_kit[engine]' "
            "or pip install scikit-learn"
        )
        raise MissingDependencyError(msg) from exc
    model = Lasso(alpha=alpha, fit_intercept=True, max_iter=100_000, tol=1e-8)
    model.fit(x, y)
    return np.asarray(model.coef_, dtype=np.float64), float(model.intercept_)


def surrogate(
    n_ablations: int = 32, *, alpha: float = 0.01, keep_prob: float = 0.5, name: str = "surrogate"
) -> Method:
    """A ContextCite-style surrogate method.

    ``n_ablations`` random keep-masks (each memory kept with probability ``keep_prob``) are
    scored; a Lasso (``alpha``, sklearn's objective ``1/(2n)·||y - Xw - b||² + alpha·||w||₁``)
    is fit from masks to the response's total log-prob, and its weights are the scores.
    Identical masks are scored once (so calls can be fewer than ``n_ablations``; with N
    memories there are only ``2**N`` distinct masks) but every draw counts in the fit.

    Unlike ContextCite, the target is the total log-prob (not the per-token logit-prob) and
    the masks are not standardised: weights are then in nats, comparable to loo's deltas.
    """
    if n_ablations < 2:
        raise ScoringError(f"surrogate needs at least 2 ablations, got {n_ablations}")
    if not 0.0 < keep_prob < 1.0:
        raise ScoringError(f"surrogate keep_prob must be in (0, 1), got {keep_prob}")
    if alpha < 0:
        raise ScoringError(f"surrogate alpha must be >= 0, got {alpha}")

    async def run(scorer: Scorer, case: PreparedCase, rng: np.random.Generator) -> MethodOutput:
        n = case.n_memories
        masks = rng.random((n_ablations, n)) < keep_prob
        uniq, inverse = np.unique(masks, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        # fullest prompt first: it shares the longest prefix with the others
        order = np.argsort(-uniq.sum(axis=1), kind="stable")
        uniq, rank = uniq[order], np.argsort(order)
        inverse = rank[inverse]
        labels = [
            "keep {" + ",".join(k for k, m in zip(case.keys, row, strict=True) if m) + "}"
            for row in uniq.tolist()
        ]
        t = await _totals(scorer, case, list(uniq), labels, name)
        y = t[inverse]
        x = masks.astype(np.float64)
        coef, intercept = _lasso(x, y, alpha)
        resid = y - (x @ coef + intercept)
        ss_tot = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
        return MethodOutput(
            name,
            coef,
            n_calls=len(uniq),
            extra={"intercept": intercept, "r2": r2, "masks": masks, "targets": y},
        )

    return Method(
        name,
        f"ContextCite surrogate: Lasso(alpha={alpha:g}) on {n_ablations} random masks "
        f"(keep p={keep_prob:g})",
        run=run,
    )


# ── lexical baseline ──────────────────────────────────────────────
_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = """
    a an the and or but if of to in on at by for with from as is are was were be been being
    am do does did done have has had having i you he she it we they me him her us them my your
    his its our their this that these those what which who whom whose when where why how
    there here not no yes so than then too very can could would should will shall may might
    must just also about into over after before up down out off again all any both each few
    more most other some such only own same s t don now ever"""
_STOP = frozenset(_STOP_WORDS.split())


def _stem(w: str) -> str:
    """A crude suffix stripper (``researching`` -> ``research``), enough for a baseline."""
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def _words(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower().replace("'s", "")) if w not in _STOP}


def lexical_scores(memories: Sequence[str], query: str) -> FloatArray:
    """Binary-cosine word overlap of each memory with ``query``.

    ``|W(m) ∩ W(q)| / sqrt(|W(m)|·|W(q)|)`` over lower-cased, stop-word-free, crudely stemmed
    word sets (0 for an empty set). Pure Python/numpy; no model.
    """
    q = _words(query)
    out = np.zeros(len(memories), dtype=np.float64)
    for i, text in enumerate(memories):
        m = _words(text)
        if m and q:
            out[i] = len(m & q) / np.sqrt(len(m) * len(q))
    return out


async def _lexical(scorer: Scorer, case: PreparedCase, rng: np.random.Generator) -> MethodOutput:
    texts = [t for _, t in case.case.memories]
    query = f"{case.case.question} {case.case.answer}"
    return MethodOutput("lexical", lexical_scores(texts, query))


async def _random(scorer: Scorer, case: PreparedCase, rng: np.random.Generator) -> MethodOutput:
    return MethodOutput("random", rng.random(case.n_memories))


# ── derived methods ───────────────────────────────────────────────
def _average_ranks(x: FloatArray) -> FloatArray:
    """0-based ranks (higher value, higher rank), ties sharing their mean rank; NaN lowest."""
    v = np.where(np.isnan(x), -np.inf, np.asarray(x, dtype=np.float64))
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.shape[0], dtype=np.float64)
    ranks[order] = np.arange(v.shape[0], dtype=np.float64)
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    inv = np.asarray(inv).reshape(-1)
    sums = np.bincount(inv, weights=ranks)
    return np.asarray(sums[inv] / counts[inv], dtype=np.float64)


def rank_average_scores(score_lists: Sequence[FloatArray]) -> FloatArray:
    """Mean within-case rank (normalised to ``[0, 1]``) of several score vectors."""
    if not score_lists:
        raise ScoringError("rank average of no score vectors")
    n = np.asarray(score_lists[0]).shape[0]
    denom = max(n - 1, 1)
    return np.mean([_average_ranks(np.asarray(s)) / denom for s in score_lists], axis=0)


def _pick(out: MethodOutput) -> FloatArray:
    # loo's finer signal for ranking is its signed delta (ties at 0 otherwise)
    d = out.extra.get("delta")
    return np.asarray(d if d is not None else out.scores, dtype=np.float64)


def rank_average(name: str, parts: Sequence[str], *, use_signed: bool = True) -> Method:
    """A derived method: the mean within-case rank of ``parts`` (higher = more important).

    With ``use_signed`` a part that exposes a signed ``delta`` (loo) is ranked on it, so
    memories whose removal *raises* the response's log-prob rank below neutral ones.
    """

    def combine(outs: Sequence[MethodOutput]) -> FloatArray:
        return rank_average_scores([_pick(o) if use_signed else o.scores for o in outs])

    return Method(
        name, f"mean within-case rank of {' and '.join(parts)}", parts=tuple(parts),
        combine=combine,
    )


def _signed_loo(outs: Sequence[MethodOutput]) -> FloatArray:
    return np.asarray(outs[0].extra["delta"], dtype=np.float64)


# ── registry ──────────────────────────────────────────────────────
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("loo", "exact leave-one-out divergence max(lp(all) - lp(all minus i), 0)",
               run=_loo),
        Method("loo_signed", "exact leave-one-out delta lp(all) - lp(all minus i), unclamped",
               parts=("loo",), combine=_signed_loo),
        Method("sufficiency", "lp(only memory i) - lp(no memories)", run=_sufficiency),
        surrogate(),
        rank_average("loo+sufficiency", ("loo", "sufficiency")),
        Method("lexical", "word overlap of memory with question + answer (no model)",
               run=_lexical, uses_model=False),
        Method("random", "seeded uniform noise (chance)", run=_random, uses_model=False),
    )
}


def get_method(name: str | Method, *, registry: Mapping[str, Method] | None = None) -> Method:
    """The method called ``name`` (a :class:`Method` is returned as is).

    Raises
    ------
    ScoringError
        (a :class:`~scoring_kit.ScoringKitError`) unknown name; the message lists the
        valid ones.
    """
    if isinstance(name, Method):
        return name
    reg = registry if registry is not None else METHODS
    try:
        return reg[name]
    except KeyError:
        valid = ", ".join(sorted(reg))
        raise ScoringError(
            f"unknown attribution method {name!r}; valid methods: {valid}"
        ) from None
