"""Benchmark: the full memory matrix, the seed's way against scoring_kit's exact and
approximate ways, on the embedded engine, in one run.

    .venv/bin/python benchmarks/bench_matrix.py            # default: 2.2k+ tokens, 24 memories
    .venv/bin/python benchmarks/bench_matrix.py --ways seed,exact,window,restated,hier --window 4
    .venv/bin/python benchmarks/bench_matrix.py --repeats 5 --device cuda
    .venv/bin/python benchmarks/bench_matrix.py --cli      # + end-to-end CLI figures, 2000 x 20

Two conversations are built from LoCoMo dialogue (real text) with 24 memories each:
``even`` (memories spread evenly through the conversation) and ``late`` (memories surfaced
in the last third, as in a running agent). As in a real agent, most retrieved memories are
never used: one in six is followed by a question whose answer restates it. For each it times, median of ``--repeats`` runs:

(a) seed     - the reference's way: N+1 sequential calls, each a full prefill of the whole
               prompt with logits at every position (``Engine.score_naive``);
(b) exact    - scoring_kit's exact matrix (``score_memories`` on the in-process engine:
               prefix-KV reuse, logits only at scored rows, batched suffixes on a GPU);
(c) window   - the windowed approximate mode: each memory ablated only through the
               ``--window`` responses after it (those cells exact, later ones estimated 0);
(d) restated - the windowed mode with the smallest ``--window``, each memory's window extended
               through the later responses that restate at least ``--restated`` of its
               content words (a text-only screen for long-range copying; label ``w1+r0.5``);
(e) hier     - the hierarchical approximate mode (groups first, descend where it matters);
               slow on these layouts, so only with ``--ways seed,exact,window,restated,hier``.

The seed's way is N + 1 dense full passes, so its cost depends only on the prompt lengths; the
two default layouts have the same ones, so it is timed once, on the first (the second layout
spot-checks its exact matrix against it on the baseline and the heaviest row instead);
``--seed-every-layout`` times it on each. The script
prints wall time, speedup over (a), tokens pushed through the model, the exact-LOO
minimum ``L + sum_i (L - e_i)`` and the speedup bound it implies, engine tokens/s against the
raw single-pass prefill throughput (timed just before and just after the exact run), and for (c)-(e) top-5 recall against the exact matrix. It also
times building a 1000 x 1000 divergence matrix from raw totals. Ratios are what to read: the
machine is shared and noisy.

``--cli`` (see ``benchmarks/bench_cli.py``) runs at ``--cli-point`` (default 2000 tokens x 20
memories, both layouts, ways seed and exact unless ``--ways`` says more) and adds two rows to
each table: ``cli``, the wall time of ``scoring-kit score FILE --server URL`` run as a
subprocess against one embedded server (median of ``--cli-repeats``; speedup over the seed's
way, share of the bound, and the fixed cost over the in-process exact time; its matrix checked
against the exact one), and ``render``, the wall time of ``scoring-kit render FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoring_kit._files import atomic_write_text  # noqa: E402
from scoring_kit._types import FloatArray  # noqa: E402
from scoring_kit.backends.local import LocalScorer  # noqa: E402
from scoring_kit.context.io import context_from_messages  # noqa: E402
from scoring_kit.context.model import ContextState, skip_key  # noqa: E402
from scoring_kit.engine.engine import Engine  # noqa: E402
from scoring_kit.evaluation.cases import default_locomo_path  # noqa: E402
from scoring_kit.scoring.approx import (  # noqa: E402
    _ablation_lengths,
    score_memories_hierarchical,
    score_memories_windowed,
    top_k_recall,
)
from scoring_kit.scoring.divergence import divergence  # noqa: E402
from scoring_kit.scoring.matrix import MemoryMatrix, score_memories  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_cli import DEFAULT_POINT, CliBench, parse_point  # noqa: E402

LOCOMO = default_locomo_path()


def build_conversation(
    layout: str,
    *,
    n_memories: int,
    target_tokens: int,
    tokenizer: Any,
    locomo: Path,
    relevant_every: int = 6,
) -> ContextState:
    """A LoCoMo-derived conversation of about ``target_tokens`` with ``n_memories`` memories."""
    return conversation_and_messages(
        layout, n_memories=n_memories, target_tokens=target_tokens, tokenizer=tokenizer,
        locomo=locomo, relevant_every=relevant_every)[0]


def conversation_and_messages(
    layout: str,
    *,
    n_memories: int,
    target_tokens: int,
    tokenizer: Any,
    locomo: Path,
    relevant_every: int = 6,
) -> tuple[ContextState, list[dict[str, str]]]:
    """:func:`build_conversation` and the plain messages it was rendered from."""
    data = json.loads(locomo.read_text())
    conv = data[0]["conversation"]
    turns = [t for s in range(1, 20) for t in conv.get(f"session_{s}", [])]
    facts = [
        (k, f)
        for s in range(1, 20)
        for per in data[0]["observation"].get(f"session_{s}_observation", {}).values()
        for f, k in per
    ]
    seen: set[str] = set()
    memories = []
    for k, f in facts:
        if k not in seen:
            seen.add(k)
            memories.append((k, f))
    memories = memories[:n_memories]
    filler: list[dict[str, str]] = []
    for i in range(0, len(turns) - 1, 2):
        filler.append({"role": "user", "content": turns[i]["text"]})
        filler.append({"role": "assistant", "content": turns[i + 1]["text"]})

    relevant = set(range(0, len(memories), relevant_every))
    head = [{"role": "system", "content": "You are a helpful assistant with a memory."}]
    # grow the filler budget until the rendered prompt reaches target_tokens (the memories,
    # questions and ChatML markup take a share that is only known once rendered)
    budget = target_tokens // 2
    for _ in range(8):
        ctx, messages = _assemble(layout, head, memories, filler, relevant, budget, tokenizer)
        have = len(ctx.wire_prompt())
        if have >= target_tokens or budget > 10 * target_tokens:
            break
        budget += target_tokens - have + 16
    return ctx, messages


def _assemble(
    layout: str,
    head: list[dict[str, str]],
    memories: list[tuple[str, str]],
    filler: list[dict[str, str]],
    relevant: set[int],
    budget: int,
    tokenizer: Any,
) -> tuple[ContextState, list[dict[str, str]]]:
    def qa(k: str, f: str) -> list[dict[str, str]]:
        if memories.index((k, f)) not in relevant:  # surfaced, never used (the common case)
            return [{"role": "memory", "key": k, "content": f}]
        return [
            {"role": "memory", "key": k, "content": f},
            {"role": "user", "content": "What do you remember about that?"},
            {"role": "assistant", "content": f"I remember this: {f}"},
        ]

    picked: list[dict[str, str]] = []
    used = 0
    for m in filler:
        cost = len(tokenizer.encode(m["content"])) + 6
        if used + cost > budget:
            break
        picked.append(m)
        used += cost
    pairs = [picked[i : i + 2] for i in range(0, len(picked), 2)]
    if layout not in ("even", "late"):
        raise ValueError(f"unknown layout {layout!r}")
    # even: memories interleaved from the start; late: only in the last third
    cut = 0 if layout == "even" else int(len(pairs) * 2 / 3)
    out = list(head)
    for p in pairs[:cut]:
        out += p
    rest = pairs[cut:]
    every = max(1, len(rest) // max(1, len(memories)))
    mi = 0
    for pi, p in enumerate(rest):
        if pi % every == 0 and mi < len(memories):
            out += qa(*memories[mi])
            mi += 1
        out += p
    for k, f in memories[mi:]:
        out += qa(k, f)
    return context_from_messages(out, tokenizer), out


@dataclass(frozen=True, slots=True)
class Ablations:
    """What the seed's way and the exact-LOO minimum read off one context's full matrix."""

    length: int  #: tokens of the full prompt
    scored: tuple[tuple[int, int], ...]  #: its scored token ranges (start, end)
    #: per memory key: (start, end) of its first node in the full prompt, and the length of
    #: the prompt without it
    memories: dict[str, tuple[int, int, int]]

    @property
    def last(self) -> int:
        """End of the last scored range: no score reads a token after it."""
        return max((b for _, b in self.scored), default=0)


def ablations(ctx: ContextState) -> Ablations:
    """Render the full prompt and each single-memory ablation once; see :class:`Ablations`."""
    base = ctx.wire_prompt()
    first: dict[str, tuple[int, int]] = {}
    for s in base.spans:
        node = ctx.section(s.section)[s.index]
        if node.key is not None and node.kind == "memory":
            first.setdefault(node.key, (s.start, s.end))
    return Ablations(
        length=len(base),
        scored=tuple((int(a), int(b)) for a, b in base.ranges),
        memories={k: (*first[k], len(ctx.wire_prompt(skip=skip_key(k))))
                  for k in ctx.memory_keys()},
    )


def exact_minimum(ctx: ContextState, ab: Ablations | None = None) -> tuple[int, int]:
    """(seed-way tokens, exact-LOO minimum tokens) for the full matrix of ``ctx``.

    The seed prefills every prompt whole. The minimum is what exact leave-one-out cannot
    avoid: the baseline up to its last scored token, and per memory the tokens after it up to
    that last scored token (a memory after the last response costs nothing; nor do the
    tokens after the last response, which no score reads).
    """
    ab = ab if ab is not None else ablations(ctx)
    seed = ab.length + sum(n for _, _, n in ab.memories.values())
    last = ab.last
    minimum = last + sum(max(0, last - end) for _, end, _ in ab.memories.values())
    return seed, minimum


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def seed_way(engine: Engine, ctx: ContextState, keys: list[str] | None = None) -> MemoryMatrix:
    """The seed's matrix (all memories, or the rows of ``keys``): one full prefill per call."""
    keys = ctx.memory_keys() if keys is None else keys
    base = ctx.wire_prompt()
    b = engine.score_naive(base.tokens.tolist(), base.ranges)
    rows = []
    for k in keys:
        wp = ctx.wire_prompt(skip=skip_key(k))
        rows.append(engine.score_naive(wp.tokens.tolist(), wp.ranges))
    w = np.stack(rows)
    return MemoryMatrix(tuple(keys), np.asarray(base.entries), b, w, (None,) * len(rows))


def bench_assembly(repeats: int = 7) -> float:
    rng = np.random.default_rng(0)
    baseline = -rng.random(1000) * 50
    rows = [baseline - rng.random(1000) for _ in range(1000)]
    keys = [f"m{i}" for i in range(1000)]

    def build() -> float:
        m = MemoryMatrix(tuple(keys), np.arange(1000), baseline, np.stack(rows), (None,) * 1000)
        return float(divergence(m.baseline, m.without).sum() + m.memory_weights.sum())

    t, _ = median_time(build, repeats)
    return t


def seed_shape(ctx: ContextState) -> tuple[int, ...]:
    """Prompt lengths of the seed's N + 1 calls: all its cost depends on (dense full passes)."""
    base = ctx.wire_prompt()
    lengths = _ablation_lengths(ctx, base, ctx.memory_keys()).values()
    return (len(base), *sorted(lengths))


def run_layout(
    layout: str,
    engine: Engine,
    scorer: LocalScorer,
    ctx: ContextState,
    args: argparse.Namespace,
    seed_timed: dict[tuple[int, ...], tuple[str, float, int]],
    cli: Callable[[MemoryMatrix, dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Time the ways on one conversation and print a table; return the figures.

    ``cli(exact_matrix, row)`` (``--cli``) prints its rows after the exact one and returns
    its figures, kept as ``row["cli"]``.
    """
    base = ctx.wire_prompt()
    L, n, m = len(base), len(ctx.memory_keys()), len(base.ranges)
    seed_tokens, minimum = exact_minimum(ctx)
    bound = seed_tokens / minimum
    print(f"\n== {layout}: {L} tokens, {n} memories, {m} responses; seed computes "
          f"{seed_tokens} tokens, exact-LOO minimum {minimum} -> speedup bound {bound:.2f}x")

    def raw_pass() -> FloatArray:
        engine.clear_cache()
        return engine.score(base.tokens.tolist(), base.ranges)

    engine.reset_stats()
    shape = seed_shape(ctx)
    seed_m: MemoryMatrix | None = None
    if shape in seed_timed and not args.seed_every_layout:
        # the seed's way is N + 1 dense full passes: its cost is a function of the prompt
        # lengths alone, which are the same here as in a layout already timed
        seed_from, t_seed, seed_fwd = seed_timed[shape]
        seed_note = f"timed on {seed_from} (same {len(shape)} prompt lengths)"
    else:
        t_seed, seed_m = median_time(lambda: seed_way(engine, ctx), args.seed_repeats)
        seed_fwd = engine.stats.forward_tokens // max(1, args.seed_repeats)
        seed_timed[shape] = (layout, t_seed, seed_fwd)
        seed_note = "N+1 full prefills, logits everywhere"

    def exact_run() -> MemoryMatrix:
        engine.clear_cache()
        return score_memories(ctx, scorer, chunk_size=max(1, n), progress=False)

    # raw prefill throughput is measured just before and just after the exact run (median of
    # 3 passes each) and averaged: a shared machine's speed drifts over a several-minute run
    t_raw, _ = median_time(raw_pass, 3)
    raw_before = L / t_raw
    engine.reset_stats()
    t_exact, exact_m = median_time(exact_run, args.repeats)
    exact_fwd = engine.stats.forward_tokens // args.repeats
    t_raw, _ = median_time(raw_pass, 3)
    raw_after = L / t_raw
    raw_tps = (raw_before + raw_after) / 2
    if seed_m is not None:
        assert np.allclose(exact_m.divergence, seed_m.divergence, atol=2e-3), (
            "exact and seed matrices differ")
    else:  # spot check: the seed's way on the baseline and the heaviest memory's row
        i = int(np.argmax(exact_m.memory_weights))
        spot = seed_way(engine, ctx, keys=[exact_m.keys[i]])
        assert np.allclose(exact_m.baseline, spot.baseline, atol=2e-3), (
            "exact and seed baselines differ")
        assert np.allclose(exact_m.without[i], spot.without[0], atol=2e-3), (
            "exact and seed rows differ")

    row: dict[str, Any] = {
        "prompt_tokens": L, "memories": n, "responses": m,
        "seed_tokens": seed_tokens, "exact_min_tokens": minimum, "bound": bound,
        "raw_prefill_tps": raw_tps, "raw_prefill_tps_before_after": [raw_before, raw_after],
        "seed": {"s": t_seed, "forward_tokens": seed_fwd, "note": seed_note},
        "exact": {"s": t_exact, "forward_tokens": exact_fwd,
                  "speedup": t_seed / t_exact, "tps": exact_fwd / t_exact},
    }
    print(f"raw single-pass prefill: {raw_tps:,.0f} tokens/s (before / after exact: "
          f"{raw_before:,.0f} / {raw_after:,.0f})")
    print(f"{'way':<8}{'wall s':>9}{'speedup':>9}{'fwd tokens':>12}{'vs min':>8}"
          f"{'tok/s':>9}  notes")
    print(f"{'seed':<8}{t_seed:>9.2f}{1.0:>9.2f}{seed_fwd:>12,}{seed_fwd / minimum:>8.2f}"
          f"{seed_fwd / t_seed:>9,.0f}  {seed_note}")
    print(f"{'exact':<8}{t_exact:>9.2f}{t_seed / t_exact:>9.2f}{exact_fwd:>12,}"
          f"{exact_fwd / minimum:>8.2f}{exact_fwd / t_exact:>9,.0f}  "
          f"{t_seed / t_exact / bound:.0%} of the bound; "
          f"{exact_fwd / t_exact / raw_tps:.0%} of raw prefill tokens/s")
    if cli is not None:
        row["cli"] = cli(exact_m, row)

    def windowed(w: int, restated: float | None = None) -> Callable[[], MemoryMatrix]:
        return lambda: score_memories_windowed(ctx, scorer, window=w, restated=restated)

    approx_ways: list[tuple[str, Callable[[], MemoryMatrix]]] = []
    if "window" in args.ways:
        for w in args.window:
            approx_ways.append((f"window{w}" if len(args.window) > 1 else "window", windowed(w)))
    if "restated" in args.ways:
        w = min(args.window)
        for r in args.restated:
            approx_ways.append((f"w{w}+r{r:g}", windowed(w, r)))
    if "hier" in args.ways:
        approx_ways.append(("hier", lambda: score_memories_hierarchical(ctx, scorer)))
    for way, fn in approx_ways:

        def approx_run(fn: Callable[[], MemoryMatrix] = fn) -> MemoryMatrix:
            engine.clear_cache()
            return fn()

        engine.reset_stats()
        t_a, approx_m = median_time(approx_run, args.repeats)
        a_fwd = engine.stats.forward_tokens // args.repeats
        rec_overall, rec_per = top_k_recall(exact_m, approx_m, 5)
        window = approx_m.meta.get("window")
        extended = approx_m.meta.get("extended") or {}
        row[way] = {"s": t_a, "forward_tokens": a_fwd, "speedup": t_seed / t_a,
                    "top5_recall": rec_overall, "top5_recall_per_response": rec_per,
                    "calls": approx_m.meta.get("calls"),
                    "exact_calls": approx_m.meta.get("exact_calls"),
                    "estimated_cells": approx_m.meta.get("estimated_cells"),
                    "window": window, "restated": approx_m.meta.get("restated"),
                    "extended_keys": len(extended)}
        what = (f"window {window} response(s)" if window is not None
                else f"{approx_m.meta.get('calls')} of {approx_m.meta.get('exact_calls')} calls")
        if approx_m.meta.get("restated") is not None:
            what += (f", extended for {len(extended)} memories restated (share >= "
                     f"{approx_m.meta['restated']:g})")
        print(f"{way:<8}{t_a:>9.2f}{t_seed / t_a:>9.2f}{a_fwd:>12,}"
              f"{a_fwd / minimum:>8.2f}{a_fwd / t_a:>9,.0f}  top-5 recall "
              f"{rec_overall:.2f} overall, {rec_per:.2f} per response; {what}")
    return row


def comma_list(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str
) -> Callable[[str], list[Any]]:
    """An argparse type: one or more comma-separated values, each converted and checked."""

    def parse(text: str) -> list[Any]:
        try:
            values = [convert(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, got {text!r}")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per measurement of exact and approximate ways (median); 1 keeps "
                         "the default run near 10 minutes on 2 CPU cores")
    ap.add_argument("--ways", default=None,
                    help="comma list of seed,exact,window,restated,hier (seed and exact always "
                         "run; default seed,exact,window,restated, with --cli seed,exact)")
    ap.add_argument("--window", type=comma_list(int, lambda w: w >= 1, "integers >= 1"),
                    default="1",
                    help="responses after each memory the windowed mode scores; a comma list "
                         "(e.g. 1,2,4) times one windowed run per value (default 1)")
    ap.add_argument("--restated", type=comma_list(float, lambda r: 0.0 < r <= 1.0,
                                                  "shares in (0, 1]"),
                    default="0.5",
                    help="with the restated way: the windowed mode with the smallest --window, "
                         "extended through responses restating at least this share of a "
                         "memory's content words; a comma list times one run per value "
                         "(default 0.5)")
    ap.add_argument("--seed-repeats", type=int, default=1,
                    help="runs of the slow seed way (median); default 1 to stay under 10 min")
    ap.add_argument("--seed-every-layout", action="store_true",
                    help="time the seed's way on every layout (default: once per set of prompt "
                         "lengths; both default layouts have the same, so it runs once)")
    ap.add_argument("--memories", type=int, default=None, help="default 24")
    ap.add_argument("--tokens", type=int, default=None, help="default 2200")
    ap.add_argument("--layouts", default="even,late")
    ap.add_argument("--device", default=None)
    ap.add_argument("--locomo", type=Path, default=LOCOMO)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    g = ap.add_argument_group("end-to-end CLI figures (benchmarks/bench_cli.py)")
    g.add_argument("--cli", action="store_true",
                   help="at --cli-point, also time `scoring-kit score FILE --server URL` and "
                        "`scoring-kit render FILE` as subprocesses (one embedded server for the "
                        "run) beside the in-process seed and exact ways")
    g.add_argument("--cli-point", type=parse_point, default=DEFAULT_POINT,
                   metavar="TOKENSxMEMORIES",
                   help=f"the point of the --cli run (default {DEFAULT_POINT}; replaces --tokens "
                        "and --memories)")
    g.add_argument("--cli-repeats", type=int, default=3,
                   help="CLI calls per measurement (median; default 3)")
    g.add_argument("--cli-fresh-cache", action="store_true",
                   help="the CLI children get an empty $SCORING_KIT_CACHE, so the first render "
                        "is cold (converts the GGUF tokenizer)")
    args = ap.parse_args(argv)
    if args.cli:
        if args.tokens is not None or args.memories is not None:
            ap.error("--cli measures at --cli-point TOKENSxMEMORIES: drop --tokens/--memories")
        if args.cli_repeats < 1:
            ap.error("--cli-repeats must be >= 1")
        args.tokens, args.memories = args.cli_point
    args.tokens = 2200 if args.tokens is None else args.tokens
    args.memories = 24 if args.memories is None else args.memories
    if args.ways is None:
        args.ways = "seed,exact" if args.cli else "seed,exact,window,restated"

    t0 = time.perf_counter()
    engine = Engine.load(device=args.device)
    print(f"engine: {engine.name} on {engine.device} (load {time.perf_counter() - t0:.1f} s)")
    scorer = LocalScorer(engine)
    results: dict[str, Any] = {"device": engine.device, "layouts": {}}
    seed_timed: dict[tuple[int, ...], tuple[str, float, int]] = {}
    with contextlib.ExitStack() as stack:
        bench = None
        if args.cli:
            bench = stack.enter_context(CliBench(repeats=args.cli_repeats, device=args.device,
                                                 fresh_cache=args.cli_fresh_cache))
        for layout in args.layouts.split(","):
            ctx, messages = conversation_and_messages(
                layout, n_memories=args.memories, target_tokens=args.tokens,
                tokenizer=engine.tokenizer, locomo=args.locomo)
            cli = None if bench is None else functools.partial(
                bench.measure, layout, ctx, messages, tokenizer=engine.tokenizer)
            results["layouts"][layout] = run_layout(layout, engine, scorer, ctx, args,
                                                    seed_timed, cli)
        if bench is not None:
            results["cli"] = {"point": list(args.cli_point), "repeats": args.cli_repeats,
                              "server_start_s": bench.server_start_s,
                              "fresh_cache": args.cli_fresh_cache}

    t_asm = bench_assembly()
    results["assembly_1000x1000_ms"] = t_asm * 1000
    print(f"\n1000 x 1000 divergence matrix from raw totals: {t_asm * 1000:.1f} ms (median)")
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
