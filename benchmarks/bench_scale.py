"""Benchmark at agent scale: the memory matrix on 2k-8k-token contexts with 16-128 memories.

    .venv/bin/python benchmarks/bench_scale.py                       # the documented scale run
    .venv/bin/python benchmarks/bench_scale.py --grid 2000x16 --ways exact,w1+r0.5
    .venv/bin/python benchmarks/bench_scale.py --vllm http://127.0.0.1:8001 --vllm-model m

Each point of the grid (``TOKENSxMEMORIES``, both layouts) runs in its own child process, so
its peak resident memory is its own. For each point the child builds the LoCoMo-derived
conversation of ``bench_matrix.build_conversation`` and measures, on the embedded engine:

- ``exact``: the exact matrix (``score_memories``): wall time, tokens pushed through the model,
  the exact-LOO token minimum and the token bound (seed tokens / minimum), the share of the
  bound reached (speedup over the seed's way / bound);
- each approximate way (``w1`` the 1-response window, ``w1+r0.5`` with the restatement screen,
  ``w1+r0.5+f8`` also refining the 8 heaviest rows over the whole conversation, ``hier`` the
  hierarchical mode): wall time, tokens, speedup, top-5 recall against exact
  (overall and per response) and the exact weight its top 5 holds (``top_k_weight_share``:
  what a swap at the 5th place cost);
- the seed's way (N + 1 dense full prefills, logits everywhere): *timed* when its estimated
  time fits ``--seed-budget`` seconds, otherwise *estimated* from its token count at the
  per-token cost of dense full prefills measured in the same child (the mean of one pass of
  the full prompt before the ways and one after them, after an untimed warm-up; both rates
  are kept) — the table says which;
- with ``--vllm URL``: the exact matrix through ``--backend vllm`` against that server, and
  the ratio of its time to the embedded engine's.

Results go to ``--json`` (default ``out/bench-scale.json``) and a growth chart (cost against N
at the length measured with the most memory counts, and against L at N = 64) to ``--chart``
(default ``docs/scale-growth.png``). Exact matrices are kept in ``--cache`` (default
``out/scale-cache``) and reused for the same prompt, so a rerun (new approximate ways) times only
those; ``--fresh`` recomputes them. Peak memory is read per way (``VmHWM``, reset before each).
Read ratios: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import queue
import re
import resource
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scoring_kit._files import atomic_write_text  # noqa: E402  (the figures survive a kill)

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench_matrix import Ablations

#: the documented scale run: 25.5 min on a 2-core Intel Xeon (2026-12-02), 49 min on a 2-core
#: Zen 4 (the 8k x 64 late point about a third of it), 48 min on slower Xeon cores (2026-12-03)
DEFAULT_GRID = "2000x16,2000x32,4000x64,8000x64:late"
#: the issue's whole grid (2k-8k tokens x 16-128 memories, both layouts): many hours on 2 cores
#: (the 8k x 64 even exact matrix alone 15.5 min on the Xeon, ~40 on the Zen 4), for a bigger
#: machine
FULL_GRID = ",".join(f"{t}x{n}" for t in (2000, 4000, 8000) for n in (16, 32, 64, 128))
DEFAULT_WAYS = "exact,w1+r0.5"


def _parse_grid(text: str) -> list[tuple[int, int, str | None]]:
    """``TOKENSxMEMORIES[:layout]`` points: (tokens, memories, layout or None for all);
    ``full`` is :data:`FULL_GRID`."""
    if text == "full":
        text = FULL_GRID
    out: list[tuple[int, int, str | None]] = []
    for part in text.split(","):
        point, _, layout = part.partition(":")
        try:
            t, n = point.lower().split("x")
            out.append((int(t), int(n), layout or None))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"grid points are TOKENSxMEMORIES[:even|late] separated by commas, got {part!r}"
            ) from None
        if out[-1][0] < 200 or out[-1][1] < 1:
            raise argparse.ArgumentTypeError(f"grid point {part!r}: tokens >= 200, memories >= 1")
        if layout not in ("", "even", "late"):
            raise argparse.ArgumentTypeError(f"grid point {part!r}: layout is even or late")
    return out


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old`` for one point: what ``new`` measured replaces, the rest stays.

    Where ``new`` reused the cached exact matrix, the seed's way stays ``old``'s too: the
    exact figures were measured against it (each way's speedup is against the seed's way of
    the run that measured that way)."""
    if "error" in new:
        return {**old, "last_error": new["error"]} if old else new
    merged = {**old, **new}
    if "reused_from" in new.get("exact", {}) and "exact" in old and "seed" in old:
        merged["seed"], merged["exact"] = old["seed"], old["exact"]
    return merged


def _parse_way(way: str) -> tuple[int, float | None, int] | None:
    """``w<window>[+r<share>][+f<rows>]`` as (window, restated, refine); None if not one."""
    m = re.fullmatch(r"w(\d+)(?:\+r(\d*\.?\d+))?(?:\+f(\d+))?", way)
    if m is None or int(m[1]) < 1 or (m[2] is not None and not 0.0 < float(m[2]) <= 1.0):
        return None
    return int(m[1]), float(m[2]) if m[2] else None, int(m[3] or 0)


def _reset_peak() -> None:
    """Reset this process's peak resident set (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    """Peak resident set since the last :func:`_reset_peak` (VmHWM), else since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flop_counts(ctx: Any, config: Any, ab: Ablations | None = None) -> tuple[float, float]:
    """(seed-way FLOPs, exact-LOO minimum FLOPs) of the full matrix, from the architecture.

    Per token: ``2 x`` the layer weights it passes through, plus attention over every
    earlier position (``4 x heads x head_dim`` per key per layer: scores and values), plus
    the LM head where logits are taken — at every position for the seed's dense prefills,
    only at the scored tokens for the exact minimum (which recomputes, per memory, the tokens
    after it, at their positions in the ablated prompt). The token bound counts tokens as
    equal; this bound prices the suffix tokens of a late layout, which attend over more keys.
    ``ab``: the context's :func:`bench_matrix.ablations`, when the caller has them.
    """
    from bench_matrix import ablations

    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = int(c.hidden_size), int(c.num_hidden_layers)
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", heads) or heads)
    hd = int(getattr(c, "head_dim", None) or h // heads)
    inter = int(c.intermediate_size)
    lin = 2.0 * layers * (h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * inter)
    att = 4.0 * layers * heads * hd  # per (query, key) pair
    head = 2.0 * h * int(c.vocab_size)

    def span(a: int, b: int) -> float:  # positions a..b-1, each attending over p + 1 keys
        return (b - a) * lin + att * ((b * (b + 1) - a * (a + 1)) / 2)

    ab = ab if ab is not None else ablations(ctx)
    L, last, scored = ab.length, ab.last, ab.scored  # no score reads a token after ``last``
    seed = span(0, L) + L * head
    minimum = span(0, last) + sum(b - a for a, b in scored) * head
    for start, end, n_k in ab.memories.values():
        seed += span(0, n_k) + n_k * head
        # the tokens after the memory's first node up to the last scored one, at their
        # places in the ablated prompt
        minimum += span(start, start + max(0, last - end))
        minimum += sum(max(0, b - max(a, end)) for a, b in scored) * head
    return seed, minimum


def _cache_paths(args: dict[str, Any], tokens: int, memories: int, layout: str) -> tuple[Path, Path]:
    d = Path(args["cache"])
    stem = f"{tokens}x{memories}-{layout}"
    return d / f"{stem}.npz", d / f"{stem}.json"


def _point(tokens: int, memories: int, layout: str, args: dict[str, Any]) -> dict[str, Any]:
    """One grid point, in a child process; returns its figures."""
    import numpy as np
    from bench_matrix import ablations, build_conversation, exact_minimum, median_time, seed_way

    from scoring_kit.backends.local import LocalScorer
    from scoring_kit.engine.engine import Engine
    from scoring_kit.scoring.approx import (
        score_memories_hierarchical,
        score_memories_windowed,
        top_k_recall,
        top_k_weight_share,
    )
    from scoring_kit.scoring.matrix import score_memories
    from scoring_kit.scoring.memory_matrix import MemoryMatrix

    engine = Engine.load(device=args["device"])
    scorer = LocalScorer(engine)
    ctx = build_conversation(layout, n_memories=memories, target_tokens=tokens,
                             tokenizer=engine.tokenizer, locomo=Path(args["locomo"]))
    base = ctx.wire_prompt()
    L, n, m = len(base), len(ctx.memory_keys()), len(base.ranges)
    ab = ablations(ctx)  # every ablated prompt rendered once, for both bounds
    seed_tokens, minimum = exact_minimum(ctx, ab)
    seed_flops, min_flops = flop_counts(ctx, engine.model.config, ab)
    out: dict[str, Any] = {"target_tokens": tokens, "layout": layout, "prompt_tokens": L,
                           "memories": n, "responses": m, "seed_tokens": seed_tokens,
                           "exact_min_tokens": minimum, "bound": seed_tokens / minimum,
                           "flop_bound": seed_flops / min_flops}
    prompt_sha = hashlib.sha256(base.tokens.astype(">i8").tobytes()).hexdigest()

    # per-token cost of the seed's dense full prefills, measured here: one pass of the whole
    # prompt after an untimed warm-up on its first 512 tokens (the process's first forward
    # allocates); where the seed is estimated, a second pass after the ways brackets them
    # (_bracket_seed)
    warm = base.tokens[:512].tolist()
    engine.score_naive(warm, [(1, len(warm))])

    def dense() -> Any:
        return engine.score_naive(base.tokens.tolist(), base.ranges)

    _reset_peak()
    t_dense, _ = median_time(dense, 1)
    seed_est = seed_tokens * t_dense / L
    if seed_est <= args["seed_budget"]:
        t0 = time.perf_counter()
        seed_m = seed_way(engine, ctx)
        out["seed"] = {"s": time.perf_counter() - t0, "how": "timed"}
    else:
        seed_m = None
        out["seed"] = {"s": seed_est, "how": f"estimated: {seed_tokens:,} tokens at the dense "
                                              f"prefill cost measured here ({L / t_dense:,.0f} tok/s)"}
    out["seed"]["peak_mb"] = _peak_mb()
    t_seed = out["seed"]["s"]

    npz, meta_json = _cache_paths(args, tokens, memories, layout)
    cached = json.loads(meta_json.read_text()) if meta_json.exists() and npz.exists() else None
    if cached is not None and cached.get("prompt_sha") == prompt_sha and not args["fresh"]:
        # the exact matrix of an earlier run of this point (same prompt): its own figures,
        # measured against the seed's way of *that* run, are kept as they were
        exact_m = MemoryMatrix.load(npz)
        out["exact"] = {**cached["exact"], "reused_from": str(npz)}
    else:
        engine.clear_cache()
        engine.reset_stats()
        _reset_peak()
        t0 = time.perf_counter()
        exact_m = score_memories(ctx, scorer, chunk_size=max(1, n), progress=False)
        t_exact = time.perf_counter() - t0
        fwd = engine.stats.forward_tokens
        out["exact"] = {"s": t_exact, "forward_tokens": fwd, "speedup": t_seed / t_exact,
                        "share_of_bound": t_seed / t_exact / out["bound"],
                        "share_of_flop_bound": t_seed / t_exact / out["flop_bound"],
                        "tokens_vs_min": fwd / minimum, "seed_s": t_seed,
                        "peak_mb": _peak_mb(), "measured": time.strftime("%Y-%m-%d %H:%M")}
        if seed_m is not None:
            out["exact"]["max_abs_diff_vs_seed"] = float(
                np.nanmax(np.abs(exact_m.divergence - seed_m.divergence)))
        npz.parent.mkdir(parents=True, exist_ok=True)
        exact_m.save(npz, overwrite=True)
    t_exact = float(out["exact"]["s"])

    for way in args["ways"]:
        if way == "exact" or way in args.get("skip_ways", ()):
            continue
        engine.clear_cache()
        engine.reset_stats()
        _reset_peak()
        t0 = time.perf_counter()
        if way == "hier":
            a = score_memories_hierarchical(ctx, scorer)
        else:
            parsed = _parse_way(way)
            assert parsed is not None
            window, restated, refine = parsed
            a = score_memories_windowed(ctx, scorer, window=window, restated=restated,
                                        refine=refine)
        t_a = time.perf_counter() - t0
        overall, per = top_k_recall(exact_m, a, 5)
        out[way] = {"s": t_a, "forward_tokens": engine.stats.forward_tokens,
                    "speedup": t_seed / t_a, "top5_recall": overall,
                    "top5_recall_per_response": per,
                    "top5_weight_share": top_k_weight_share(exact_m, a, 5),
                    "peak_mb": _peak_mb(),
                    "calls": a.meta.get("calls")}

    if seed_m is None:
        _bracket_seed(out, dense, t_dense, seed_tokens, L, args["ways"])
    if "reused_from" not in out["exact"]:
        atomic_write_text(meta_json, json.dumps({"prompt_sha": prompt_sha, "exact": out["exact"]}))

    if args["vllm"] and (not args["vllm_points"]
                         or (tokens, memories) in [p[:2] for p in args["vllm_points"]]):
        try:
            out["vllm"] = _through_vllm(ctx, exact_m, t_exact, args)
        except Exception as exc:  # the point's other figures stand
            out["vllm"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _bracket_seed(out: dict[str, Any], dense: Any, t_before: float, seed_tokens: int, L: int,
                  ways: list[str], clock: Any = None) -> None:
    """The seed's estimate from the dense pass before the ways *and* one after them.

    The cores' speed drifts under other load (one pass moved the estimate 2x between two
    points of one run): the mean of the two passes brackets the ways it prices, and both
    rates are kept so the table's reader sees the drift. Every speedup measured here is
    recomputed against that mean (a reused exact matrix keeps its own run's figures).
    ``clock(dense)`` times the second pass (default: one timed call)."""
    from bench_matrix import median_time

    t_after = clock(dense) if clock is not None else median_time(dense, 1)[0]
    t_dense = (t_before + t_after) / 2
    seed = seed_tokens * t_dense / L
    rates = (L / t_before, L / t_after)
    out["seed"].update(s=seed, dense_tok_s=list(rates),
                       how=f"estimated: {seed_tokens:,} tokens at the dense prefill cost measured "
                           f"here, before and after the ways ({rates[0]:,.0f} and "
                           f"{rates[1]:,.0f} tok/s)")
    for way in ways:
        w = out.get(way)
        if not w or "s" not in w or "reused_from" in w:
            continue
        w["speedup"] = seed / w["s"]
        if way == "exact":
            w.update(seed_s=seed, share_of_bound=w["speedup"] / out["bound"],
                     share_of_flop_bound=w["speedup"] / out["flop_bound"])


def _through_vllm(ctx: Any, exact_m: Any, t_exact: float, args: dict[str, Any]) -> dict[str, Any]:
    """The exact matrix through ``--backend vllm``: at ``--vllm URL``, or (``auto``) on a vLLM
    started here from the real-server target's environment for this point only (so it
    takes no CPU while the engine is timed)."""
    import asyncio

    import numpy as np

    from scoring_kit.backends.vllm import VLLMScorer
    from scoring_kit.scoring.matrix import ascore_memories

    async def run(url: str, model: str | None, key: str | None, *, warm_up: bool = False) -> Any:
        v = VLLMScorer(url, model=model, api_key=key)
        try:
            keys = ctx.memory_keys()[:1] if warm_up else None
            return await ascore_memories(ctx, v, keys=keys, progress=False)
        finally:
            await v.aclose()

    with contextlib.ExitStack() as stack:
        if args["vllm"] == "auto":
            sys.path.insert(0, str(ROOT / "scripts"))
            import real_servers

            srv, key, _ = stack.enter_context(real_servers.running_vllm())
            url, model = srv.url, real_servers.SERVED_NAME
        else:
            url, model, key = args["vllm"], args["vllm_model"], None
        asyncio.run(run(url, model, key, warm_up=True))  # first requests allocate; untimed
        t0 = time.perf_counter()
        vm = asyncio.run(run(url, model, key))
        t_v = time.perf_counter() - t0
    return {"s": t_v, "engine_over_vllm": t_v / t_exact,
            "max_abs_diff": float(np.nanmax(np.abs(vm.divergence - exact_m.divergence)))}


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like an exception, so ``finally`` blocks (a vLLM to stop, a point's
    process to end) run when a run is killed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _child(q: Any, tokens: int, memories: int, layout: str, args: dict[str, Any]) -> None:
    _exit_on_sigterm()
    try:
        q.put(_point(tokens, memories, layout, args))
    except Exception as exc:  # reported in the table, the run goes on
        q.put({"target_tokens": tokens, "memories": memories, "layout": layout,
               "error": f"{type(exc).__name__}: {exc}"})


def run_point(tokens: int, memories: int, layout: str, args: dict[str, Any], *,
              child: Callable[..., object] = _child) -> dict[str, Any]:
    """One point in its own process (its peak memory is its own). A process that ends
    without reporting (killed for memory, a signal) is a failed point naming its exit code;
    the process is ended with the run (an interrupt or a kill of the run does not orphan it)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q, tokens, memories, layout, args))
    p.start()
    try:
        while True:
            try:
                res: dict[str, Any] = q.get(timeout=2.0)
                break
            except queue.Empty:
                if p.is_alive():
                    continue
                try:  # it may have reported just before it ended
                    res = q.get(timeout=1.0)
                except queue.Empty:
                    res = {"target_tokens": tokens, "memories": memories, "layout": layout,
                           "error": f"the point's process ended with exit code {p.exitcode} "
                                    "before reporting (killed for memory or by a signal?)"}
                break
        p.join()
    finally:
        if p.is_alive():
            p.terminate()
            p.join(30)
    return res


def _print_row(r: dict[str, Any], ways: list[str]) -> None:
    if "error" in r:
        print(f"{r['target_tokens']:>6} {r['memories']:>4} {r['layout']:<5} FAILED: {r['error']}")
        return
    print(f"{r['prompt_tokens']:>6} {r['memories']:>4} {r['layout']:<5} bound "
          f"{r['bound']:5.2f}x (FLOPs {r['flop_bound']:5.2f}x)  seed {r['seed']['s']:8.1f} s "
          f"({r['seed']['how'].split(':')[0]}, peak {r['seed']['peak_mb']:,.0f} MB)")
    for way in ways:
        if way not in r:
            continue
        w = r[way]
        if way == "exact":
            flop = w.get("share_of_flop_bound", w["share_of_bound"] * r["bound"] / r["flop_bound"])
            extra = (f"{w['share_of_bound']:.0%} of bound ({flop:.0%} of FLOP bound), "
                     f"{w['tokens_vs_min']:.2f}x min tokens"
                     + (" [reused]" if "reused_from" in w else ""))
        else:
            extra = (f"top-5 recall {w['top5_recall']:.2f} / {w['top5_recall_per_response']:.2f}"
                     + _share(w))
        peak = f"{w['peak_mb']:>6,.0f} MB" if "peak_mb" in w else " " * 9
        print(f"        {way:<12}{w['s']:>8.1f} s {w['speedup']:>7.1f}x {w['forward_tokens']:>9,}"
              f" tok {peak}  {extra}")
    if "vllm" in r and "error" in r["vllm"]:
        print(f"        vllm         FAILED: {r['vllm']['error']}")
    elif "vllm" in r:
        print(f"        vllm        {r['vllm']['s']:>8.1f} s  = {r['vllm']['engine_over_vllm']:.2f}x "
              f"the engine's exact time; max |diff| {r['vllm']['max_abs_diff']:.1e}")


def _share(way: dict[str, Any]) -> str:
    """`` (weight 99%)``: the exact weight the way's top 5 holds (figures that have it)."""
    share = way.get("top5_weight_share")
    return f" (weight {share:.0%})" if share is not None else ""


def _ways_in(rows: list[dict[str, Any]]) -> list[str]:
    """The ways (exact, hier, windowed variants) measured in ``rows``, in first-seen order."""
    return [w for w in dict.fromkeys(k for r in rows for k in r)
            if w in ("exact", "hier") or _parse_way(w) is not None]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The scale table (README / docs) from the figures of :func:`main`."""
    ways = [w for w in _ways_in(rows) if w != "exact"]
    head = ["L", "N", "layout", "bound (FLOPs)", "seed s (how)", "exact s: x seed, % of bound "
            "(% FLOP bound), peak MB",
            *[f"{w}: x seed, top-5 recall overall / per response (exact weight held)"
              for w in ways], "vLLM exact s (x engine exact)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r or "exact" not in r:
            continue
        e = r["exact"]
        flop = e.get("share_of_flop_bound", e["share_of_bound"] * r["bound"] / r["flop_bound"])
        cells = [f"{r['prompt_tokens']:,}", str(r["memories"]), r["layout"],
                 f"{r['bound']:.2f}x ({r['flop_bound']:.2f}x)",
                 f"{r['seed']['s']:,.0f} ({r['seed']['how'].split(':')[0]})",
                 f"{e['s']:,.0f}: {e['speedup']:.1f}x, {e['share_of_bound']:.0%} ({flop:.0%}), "
                 f"{e.get('peak_mb', float('nan')):,.0f}"]
        for w in ways:
            a = r.get(w)
            cells.append(f"{a['speedup']:.1f}x, {a['top5_recall']:.2f} / "
                         f"{a['top5_recall_per_response']:.2f}{_share(a)}"
                         if a and "s" in a else "-")
        v = r.get("vllm")
        cells.append(f"{v['s']:,.0f} ({v['engine_over_vllm']:.2f}x)" if v and "s" in v else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth_chart(rows: list[dict[str, Any]], ways: list[str], path: Path) -> None:
    """Cost (s) against N at the largest L and against L at N = 64, one line per way."""
    import altair as alt
    import polars as pl

    recs = []
    for r in rows:
        if "error" in r:
            continue
        for way in ["seed", *ways, "vllm"]:
            if way in r and "s" in r[way]:
                recs.append({"way": way, "layout": r["layout"], "L": r["target_tokens"],
                             "N": r["memories"], "seconds": r[way]["s"]})
    if not recs:
        return
    df = pl.DataFrame(recs)
    # the N panel at the L with the most memory counts (ties: the largest L); the L panel
    # at the N measured at the most lengths (ties: 64, else the largest)
    per_l = df.group_by("L").agg(pl.col("N").n_unique().alias("k")).sort(["k", "L"])
    top_l = int(per_l["L"][-1])
    per_n = df.group_by("N").agg(pl.col("L").n_unique().alias("k"),
                                 (pl.col("N") == 64).any().alias("is64")).sort(["k", "is64", "N"])
    n_fixed = int(per_n["N"][-1])

    def panel(data: pl.DataFrame, x: str, title: str) -> alt.Chart:
        return alt.Chart(data).mark_line(point=True).encode(
            # not nice: a nice log-2 domain starts the L panel at 2,048 below its first point
            x=alt.X(f"{x}:Q", scale=alt.Scale(type="log", base=2, nice=False)),
            y=alt.Y("seconds:Q", scale=alt.Scale(type="log"), title="wall time (s)"),
            color=alt.Color("way:N", legend=alt.Legend(symbolType="stroke")),
            strokeDash=alt.StrokeDash("layout:N", scale=alt.Scale(domain=["even", "late"],
                                                                  range=[[1, 0], [6, 3]]),
                                      legend=alt.Legend(title="layout: even solid, late dashed",
                                                        symbolType="stroke",
                                                        symbolStrokeColor="gray",
                                                        symbolStrokeWidth=2,
                                                        symbolOpacity=1,
                                                        symbolFillColor="transparent")),
        ).properties(title=title, width=320, height=240)

    chart = alt.hconcat(
        panel(df.filter(pl.col("L") == top_l), "N", f"cost against N (L = {top_l})"),
        panel(df.filter(pl.col("N") == n_fixed), "L", f"cost against L (N = {n_fixed})"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    chart.save(str(path), scale_factor=2)


def main(argv: list[str] | None = None) -> int:
    from scoring_kit.evaluation.cases import default_locomo_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=_parse_grid, default=_parse_grid(DEFAULT_GRID),
                    help=f"TOKENSxMEMORIES[:even|late] points, or 'full' (the issue's "
                         f"whole grid: {FULL_GRID}); default {DEFAULT_GRID}")
    ap.add_argument("--layouts", default="even,late")
    ap.add_argument("--ways", default=DEFAULT_WAYS,
                    help="comma list of exact (always runs), w<N>[+r<share>][+f<rows>], hier "
                         "(default %(default)s)")
    ap.add_argument("--seed-budget", type=float, default=60.0,
                    help="time the seed's way where its estimate fits this many seconds, "
                         "else estimate it from its tokens (default %(default)s)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--locomo", type=Path, default=default_locomo_path())
    ap.add_argument("--vllm", default=None, metavar="URL",
                    help="also score the exact matrix through --backend vllm at URL, or "
                         "'auto': on a vLLM started per point from the real-server "
                         "target's environment (scripts/server_envs.py vllm)")
    ap.add_argument("--vllm-points", type=_parse_grid, default=None, metavar="GRID",
                    help="only these TOKENSxMEMORIES points go through vLLM (default all)")
    ap.add_argument("--vllm-model", default=None)
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "scale-cache",
                    help="exact matrices of earlier runs, reused for the same prompt (so a "
                         "rerun times only the approximate ways); default out/scale-cache")
    ap.add_argument("--fresh", action="store_true", help="recompute the exact matrices")
    ap.add_argument("--report", action="store_true",
                    help="print the figures in --json as a markdown table and draw --chart "
                         "from them; measure nothing")
    ap.add_argument("--merge", action="store_true",
                    help="add to the figures already in --json: ways measured there for a "
                         "point are skipped, the rest are measured and merged in")
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "bench-scale.json")
    ap.add_argument("--chart", type=Path, default=ROOT / "docs" / "scale-growth.png")
    args = ap.parse_args(argv)
    if args.report:  # the table, and the chart drawn again from the same figures
        measured = json.loads(args.json.read_text())
        print(markdown_table(measured))
        growth_chart(measured, _ways_in(measured), args.chart)
        return 0
    ways = [w for w in args.ways.split(",") if w]
    for w in ways:
        if w not in ("exact", "hier") and _parse_way(w) is None:
            ap.error(f"--ways: unknown way {w!r} (exact, hier, w<N>[+r<share in (0, 1]>]"
                     "[+f<rows>])")
    child_args = {"device": args.device, "locomo": str(args.locomo), "ways": ways,
                  "seed_budget": args.seed_budget, "vllm": args.vllm,
                  "vllm_model": args.vllm_model, "cache": str(args.cache),
                  "vllm_points": args.vllm_points,
                  "fresh": args.fresh}
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = (
        json.loads(args.json.read_text()) if args.merge and args.json.exists() else [])

    def where(tokens: int, memories: int, layout: str) -> int | None:
        return next((i for i, r in enumerate(rows) if (r["target_tokens"], r["memories"],
                                                      r["layout"]) == (tokens, memories, layout)),
                    None)

    for tokens, memories, only in args.grid:
        for layout in [only] if only else args.layouts.split(","):
            at = where(tokens, memories, layout)
            old = rows[at] if at is not None else {}
            skip = [w for w in ways if w in old and "s" in old[w]] if args.merge else []
            r = run_point(tokens, memories, layout, {**child_args, "skip_ways": skip})
            r = _merge(old, r) if args.merge else r
            if at is None:
                rows.append(r)
            else:
                rows[at] = r
            _print_row(r, ways)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.json, json.dumps(rows, indent=2))
    growth_chart(rows, _ways_in(rows), args.chart)
    print(f"total {time.perf_counter() - t0:.0f} s; figures in {args.json}, chart {args.chart}")
    return 0


if __name__ == "__main__":
    _exit_on_sigterm()
    sys.exit(main())
