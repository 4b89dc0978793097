"""Windowed settings replayed on the scale run's exact matrices: recall and tokens, no model time.

    .venv/bin/python benchmarks/bench_replay.py                  # every point in out/scale-cache
    .venv/bin/python benchmarks/bench_replay.py --ways w1,w1+r0.5,w1+f2 --points 8000x64-even
    .venv/bin/python benchmarks/bench_replay.py --merge --points 2000x128-even   # add to --json

On a causal model the windowed mode's cells inside a window are the exact leave-one-out cells,
so an exact matrix answers what any ``window`` / ``restated`` / ``refine`` would return
(:func:`scoring_kit.scoring.replay.replay_windowed`). For each exact matrix that
``bench_scale.py`` kept in ``--cache`` (``TOKENSxMEMORIES-LAYOUT.npz`` and its ``.json``) this
rebuilds the conversation (refused if its prompt hash differs from the one the cache holds) and
replays each way: top-5 recall against exact, the exact weight its top 5 holds, the tokens a
prefix-caching engine computes, and the ratio of the seed's tokens (the full prompt and each
full ablated prompt) to those. Where ``bench_scale.py`` measured the way at that point (``--measured`` files) the
measured speedup stands beside it: the token ratio is an upper reading of the speedup (a
window's tokens attend over a longer cached prefix than the seed's average token).

Per point it also says how much of the exact ranking is decided past the windows by noise:
``exact_top5_sign_agreement`` (the share of the exact top 5 that is also the top 5 by signed
row sums, ``scoring_kit.scoring.approx.top_k_sign_agreement``), ``after_w1_windows`` (the
divergence in the cells past one-response windows, their signed sum, and the share of them
below 0), and per way ``top5_recall_signed`` (recall with both sides ranked by signed sums).

Figures to ``--json`` (default ``docs/bench-replay.json``); a markdown table to stdout. With
``--merge`` the points and ways already in ``--json`` are kept and the ones replayed now are
added way by way (a fresh machine has only the matrices it computed in its cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_matrix import ablations, build_conversation, exact_minimum  # noqa: E402
from bench_scale import _parse_way  # noqa: E402

from scoring_kit._files import atomic_write_text  # noqa: E402

DEFAULT_WAYS = "w1,w1+r0.5,w2,w3,w1+f1,w1+f2,w1+f4,w1+r0.5+f6,w1+f10"
MEASURED = [ROOT / "docs" / "bench-scale-grid.json", ROOT / "docs" / "bench-scale-8kx64.json",
            ROOT / "docs" / "bench-scale-8kx64-epyc.json", ROOT / "docs" / "bench-scale-128.json"]
STEM = re.compile(r"^(\d+)x(\d+)-(even|late)$")


def replay_point(stem: str, cache: Path, ways: list[str], tokenizer: Any, locomo: Path,
                 measured: dict[tuple[int, int, str], dict[str, Any]]) -> dict[str, Any]:
    """Every way replayed on the exact matrix ``cache/stem.npz``; its figures."""
    from scoring_kit.scoring.approx import (
        signed_weights,
        top_k_recall,
        top_k_sign_agreement,
        top_k_weight_share,
    )
    from scoring_kit.scoring.memory_matrix import MemoryMatrix
    from scoring_kit.scoring.replay import replay_windowed

    m = STEM.match(stem)
    if m is None:
        raise SystemExit(f"--points: {stem!r} is not TOKENSxMEMORIES-LAYOUT (e.g. 8000x64-even)")
    tokens, memories, layout = int(m[1]), int(m[2]), m[3]
    npz, meta_json = cache / f"{stem}.npz", cache / f"{stem}.json"
    if not npz.exists() or not meta_json.exists():
        raise SystemExit(f"{npz}: no exact matrix kept for {stem} (run bench_scale.py --grid "
                         f"{tokens}x{memories}:{layout} first)")
    ctx = build_conversation(layout, n_memories=memories, target_tokens=tokens,
                             tokenizer=tokenizer, locomo=locomo)
    base = ctx.wire_prompt()
    sha = hashlib.sha256(base.tokens.astype(">i8").tobytes()).hexdigest()
    kept = json.loads(meta_json.read_text())
    if kept.get("prompt_sha") != sha:
        raise SystemExit(f"{meta_json}: its exact matrix is of another prompt (hash "
                         f"{str(kept.get('prompt_sha'))[:12]}, this conversation's {sha[:12]})")
    exact = MemoryMatrix.load(npz)
    seed_tokens, _ = exact_minimum(ctx, ablations(ctx))  # as bench_scale.py counts them
    out: dict[str, Any] = {"target_tokens": tokens, "memories": memories, "layout": layout,
                           "prompt_tokens": len(base), "seed_tokens": seed_tokens,
                           "exact_top5_sign_agreement": top_k_sign_agreement(exact, 5)}
    # the cells past one-response windows: their clipped weight against their net effect
    w1 = replay_windowed(exact, ctx, window=1)
    out["after_w1_windows"] = {
        "divergence_nats": float(np.nansum(exact.memory_weights)
                                 - np.nansum(w1.memory_weights)),
        "signed_nats": float(np.nansum(signed_weights(exact)) - np.nansum(signed_weights(w1))),
        "negative_cell_share": _negative_share(exact, w1)}
    lived = measured.get((tokens, memories, layout), {})
    for way in ways:
        parsed = _parse_way(way)
        if parsed is None:
            raise SystemExit(f"--ways: unknown way {way!r} (w<N>[+r<share>][+f<rows>])")
        window, restated, refine = parsed
        t0 = time.perf_counter()
        a = replay_windowed(exact, ctx, window=window, restated=restated, refine=refine)
        overall, per = top_k_recall(exact, a, 5)
        fig = {"top5_recall": overall, "top5_recall_per_response": per,
               "top5_recall_signed": top_k_recall(exact, a, 5, signed=True)[0],
               "top5_weight_share": top_k_weight_share(exact, a, 5),
               "computed_tokens": a.meta["computed_tokens"],
               "token_ratio": seed_tokens / a.meta["computed_tokens"],
               "calls": a.meta["calls"], "replay_s": time.perf_counter() - t0}
        if "speedup" in lived.get(way, {}):
            fig["measured_speedup"] = lived[way]["speedup"]
            fig["measured_tokens"] = lived[way].get("forward_tokens")
        out[way] = fig
        if "exact" not in out:
            out["exact"] = {"computed_tokens": a.meta["exact_computed_tokens"],
                            "token_ratio": seed_tokens / a.meta["exact_computed_tokens"]}
    return out


def _negative_share(exact: Any, w1: Any) -> float:
    """Of the exact cells past the one-response windows (the ones ``w1`` estimates), the
    share whose signed value is below 0."""
    ends = np.array([w1.meta["window_entries"][k][1] for k in w1.keys])
    far = np.asarray(w1.entries)[None, :] >= ends[:, None]
    d = exact.delta[far & np.isfinite(exact.delta)]
    return float((d < 0).mean()) if d.size else 0.0


def _order(stem: str) -> tuple[int, int, str]:
    m = STEM.match(stem)
    assert m is not None
    return int(m[1]), int(m[2]), m[3]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old``'s points with ``new``'s added, a point in both updated way by way (``new`` wins);
    ordered by tokens, memories, layout."""
    by: dict[tuple[int, int, str], dict[str, Any]] = {}
    for r in [*old, *new]:
        by.setdefault((r["target_tokens"], r["memories"], r["layout"]), {}).update(r)
    return [by[k] for k in sorted(by)]


def markdown_table(rows: list[dict[str, Any]], ways: list[str]) -> str:
    """Per point: each way's recall [its recall by signed sums, where that differs] / token
    ratio (measured speedup), the cheapest way with recall 1.0 among those replayed ("-"
    where a point has not replayed a way), and the exact top 5's sign agreement."""
    head = ["point (tokens × memories)", *ways, "cheapest at recall 1.0",
            "exact top 5 = signed top 5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['prompt_tokens']:,} × {r['memories']} {r['layout']}"]
        for w in ways:
            if w not in r:
                cells.append("-")
                continue
            f = r[w]
            s = f"{f['top5_recall']:.1f}"
            if f.get("top5_recall_signed", f["top5_recall"]) != f["top5_recall"]:
                s += f" [{f['top5_recall_signed']:.1f}]"
            s += f" / {f['token_ratio']:.1f}×"
            if "measured_speedup" in f:
                s += f" ({f['measured_speedup']:.1f}×)"
            cells.append(s)
        full = [w for w in ways if w in r and r[w]["top5_recall"] >= 1.0]
        best = max(full, key=lambda w: r[w]["token_ratio"]) if full else None
        cells.append(f"{best}: {r[best]['token_ratio']:.1f}×" if best else "none replayed")
        agree = r.get("exact_top5_sign_agreement")
        cells.append("-" if agree is None else f"{agree:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from scoring_kit.engine.loader import load_tokenizer
    from scoring_kit.evaluation.cases import default_locomo_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ways", default=DEFAULT_WAYS, help="comma list of w<N>[+r<share>]"
                    "[+f<rows>] (default %(default)s)")
    ap.add_argument("--points", default=None,
                    help="comma list of TOKENSxMEMORIES-LAYOUT (default: every kept matrix)")
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "scale-cache")
    ap.add_argument("--measured", type=Path, nargs="*", default=MEASURED,
                    help="bench_scale.py figures whose measured speedups stand beside the "
                         "replayed token ratios")
    ap.add_argument("--locomo", type=Path, default=default_locomo_path())
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench-replay.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the points and ways already in --json, add those replayed now")
    args = ap.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    stems = (args.points.split(",") if args.points else
             sorted((p.stem for p in args.cache.glob("*.npz") if STEM.match(p.stem)),
                    key=_order))
    if not stems:
        raise SystemExit(f"{args.cache}: no exact matrices kept (run bench_scale.py first)")
    measured: dict[tuple[int, int, str], dict[str, Any]] = {}
    for f in args.measured:
        if f.exists():
            for r in json.loads(f.read_text()):
                # a later file's ways replace an earlier one's, way by way
                measured.setdefault((r["target_tokens"], r["memories"], r["layout"]),
                                    {}).update(r)
    tok = load_tokenizer()
    rows = [replay_point(s, args.cache, ways, tok, args.locomo, measured) for s in stems]
    if args.merge and args.json.exists():
        rows = merge_rows(json.loads(args.json.read_text()), rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(rows, indent=2))
    print("top-5 recall [by signed sums, where it differs] / seed tokens ÷ computed tokens "
          "(measured speedup where bench_scale.py ran the way)\n")
    print(markdown_table(rows, ways))
    print(f"\nfigures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
