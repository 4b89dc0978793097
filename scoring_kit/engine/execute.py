"""One ``score_many`` call carried out: the plan of ``plan.py`` run by ``forward.py``.

:func:`run_jobs` runs the jobs in two phases. First the parents (the jobs that later jobs
extend; the hub first), one at a time, keeping their KV within ``cache_tokens``; then the
rest, grouped by the prefix they extend and packed into batched suffix passes where the
budgets allow. It returns the prefixes to keep for the next call. No torch import of its own:
the torch work is :class:`~.forward.Forward`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._exceptions import PromptError
from .._types import FloatArray
from .plan import (
    FULLY_REUSED,
    Cached,
    Job,
    batches,
    best_source,
    group_plans,
    keep_between_calls,
    order_jobs,
    plan_job,
    totals,
)

if TYPE_CHECKING:
    from .forward import Forward

__all__ = ["Limits", "run_jobs"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The engine's KV and batching budgets for one call (see :class:`~.engine.Engine`)."""

    cache_tokens: int
    prefix_cache_tokens: int
    prefix_cache_entries: int
    batch_tokens: int
    max_batch: int
    batch_kv_tokens: int


def run_jobs(
    fwd: Forward,
    jobs: list[Job],
    results: list[FloatArray | PromptError | None],
    persisted: list[Cached],
    limits: Limits,
) -> list[Cached]:
    """Order, plan, compute and fill ``results[job.slot]`` for the valid jobs.

    ``persisted`` are the prefixes kept from earlier calls. Returns the prefixes to keep
    for the next call (none when ``limits.prefix_cache_tokens`` is 0).
    """
    keep_persist = limits.prefix_cache_tokens > 0
    plan_order = order_jobs(jobs, persisted, hub_cache_tokens=limits.prefix_cache_tokens)
    order, is_parent, top = plan_order.order, plan_order.is_parent, plan_order.top

    retained: list[Cached] = list(persisted)
    retained_tokens = sum(c.kv_len for c in retained)
    used: list[Cached] = []  # sources that served this call, in order of first use
    top_cached: Cached | None = None

    def source_for(job: Job) -> Cached | None:
        best = best_source(job, retained)
        if best is not None and all(u is not best for u in used):
            used.append(best)
        return best

    with fwd.inference_mode():
        # phase 1: items that others extend, one at a time, keeping their KV
        for i in order:
            if not is_parent[i]:
                continue
            job = jobs[i]
            plan = plan_job(job, source_for(job))
            keep = retained_tokens + plan.end <= limits.cache_tokens
            cached = fwd.run_single(plan, keep=keep)
            results[job.slot] = totals(plan.lp, job.spans)
            if cached is not None:
                retained.append(cached)
                retained_tokens += cached.kv_len
                if i == top:
                    top_cached = cached
        # phase 2: the rest, grouped by the prefix they extend, batched where it pays
        rest = [plan_job(jobs[i], source_for(jobs[i])) for i in order if not is_parent[i]]
        for key, plans in group_plans(rest).items():
            if key == FULLY_REUSED:
                for plan in plans:
                    fwd.account_plan(plan)
                    results[plan.job.slot] = totals(plan.lp, plan.job.spans)
                continue
            for batch in batches(
                plans,
                batch_tokens=limits.batch_tokens,
                max_batch=limits.max_batch,
                batch_kv_tokens=limits.batch_kv_tokens,
            ):
                if len(batch) == 1:
                    fwd.run_single(batch[0], keep=False)
                else:
                    fwd.run_batch(batch)
                for plan in batch:
                    results[plan.job.slot] = totals(plan.lp, plan.job.spans)

    if not keep_persist:
        return []
    # keep, most recent first: this call's hub, the kept prefixes it used, the others
    return keep_between_calls(
        [*([top_cached] if top_cached else []), *used, *persisted],
        max_tokens=limits.prefix_cache_tokens,
        max_entries=limits.prefix_cache_entries,
    )
