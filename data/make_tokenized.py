"""Regenerate data/sample_conversation.tokens.jsonl from the plain sample (embedded tokenizer)."""

from __future__ import annotations

from pathlib import Path

from scoring_kit.context.io import load_context, save_context
from scoring_kit.engine.loader import load_tokenizer

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    ctx = load_context(HERE / "sample_conversation.jsonl", load_tokenizer())
    out = save_context(ctx, HERE / "sample_conversation.tokens.jsonl")
    print(f"wrote {out} ({ctx.summary()})")
