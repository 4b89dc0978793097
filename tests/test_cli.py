"""The ``scoring-kit`` CLI, called in-process through ``scoring_kit.cli.main`` against the
session's embedded server (``--server``); one subprocess checks the real process boundary."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pytest
from _helpers import (
    ROOT,
    SAMPLE,
    SMALL_MESSAGES,
    roomy_prefix_cache,
    run_cli,
    sample_context,
    write_jsonl,
)

from scoring_kit.analysis.export import read_candidates, read_chat
from scoring_kit.cli import build_parser
from scoring_kit.context.io import load_context
from scoring_kit.context.model import ContextState, Node, skip_key
from scoring_kit.scoring.matrix import MATRIX_COLUMNS, MemoryMatrix
from scoring_kit.server.runner import EmbeddedServer

SUBCOMMANDS = ["serve", "render", "score", "candidates", "incremental", "train", "evaluate",
               "demo"]


@pytest.fixture(autouse=True)
def _cli_env(monkeypatch: pytest.MonkeyPatch, engine: Any, tokenizer: Any) -> None:
    roomy_prefix_cache(monkeypatch, engine)
    monkeypatch.delenv("SCORING_KIT_API_KEY", raising=False)
    monkeypatch.delenv("SCORING_KIT_SERVER", raising=False)
    # the embedded tokenizer is already loaded in this process: the CLI reuses it
    monkeypatch.setattr("scoring_kit.engine.loader.load_tokenizer", lambda *_: tokenizer)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("conv") / "small.jsonl", SMALL_MESSAGES)


@pytest.fixture(scope="module")
def small_ctx(small: Path, tokenizer: Any) -> ContextState:
    return load_context(small, tokenizer)


@pytest.fixture(scope="module")
def bad_conversation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("bad") / "bad.jsonl",
                       [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _squash(text: str) -> str:
    """``text`` without whitespace (argparse wraps help, also at hyphens)."""
    return "".join(text.split())


# ── help ────────────────────────────────────────────────────────────
@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS], ids=["top", *SUBCOMMANDS])
def test_help_exits_0_and_explains_every_option(
    sub: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    res = run_cli(["--help"] if sub is None else [sub, "--help"], capsys)
    assert res.code == 0 and res.err == ""
    assert res.out.startswith(f"usage: scoring-kit{'' if sub is None else ' ' + sub}")
    parser = build_parser()
    if sub is not None:
        parser = _subparsers(parser)[sub]
    shown = _squash(res.out)
    explained = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            assert sorted(action.choices) == sorted(SUBCOMMANDS)
            for choice in action._choices_actions:
                assert choice.help and _squash(choice.help) in shown, choice.dest
                explained += 1
            continue
        assert action.help and action.help is not argparse.SUPPRESS, action
        for name in action.option_strings or [action.dest]:
            assert name in res.out, name
        assert _squash(action.help) in shown, action.help
        explained += 1
    assert explained >= (len(SUBCOMMANDS) + 1 if sub is None else 2)
    if sub is None:
        assert "Exit codes: 0 done, 1 some work failed" in res.out


# ── bad usage / bad input: exit 2, one line ─────────────────────────
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bogus"], "argument command: invalid choice: 'bogus'"),
        ([], "the following arguments are required: command"),
        (["score", "{sample}"], "the following arguments are required: --out"),
        (["render"], "the following arguments are required: conversation"),
        (["render", "{sample}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["render", "{bad}"], "{bad}:2, field 'role': unknown role 'robot'"),
        (["score", "{bad}", "--out", "{tmp}/o", "--server", "{server}", "--backend", "score",
          "--quiet"], "{bad}:2, field 'role'"),
        (["score", "{sample}", "--out", "{tmp}/file.txt", "--server", "{server}",
          "--backend", "score"], "{tmp}/file.txt"),
        (["score", "{sample}", "--out", "{tmp}/o", "--approx", "magic"],
         "argument --approx: invalid choice: 'magic'"),
        (["score", "{sample}", "--out", "{tmp}/o", "--approx", "windowed", "--restated", "2"],
         "argument --restated: must be a share in (0, 1], got '2'"),
        (["score", "{sample}", "--out", "{tmp}/o", "--restated", "0.5"],
         "argument --restated: only with --approx windowed"),
        (["score", "{sample}", "--out", "{tmp}/o", "--approx", "hierarchical", "--refine", "3"],
         "argument --refine: only with --approx windowed"),
        (["score", "{sample}", "--out", "{tmp}/o", "--approx", "windowed", "--refine", "-1"],
         "argument --refine: must be an integer >= 0, got -1"),
    ],
    ids=["unknown-subcommand", "no-subcommand", "missing-required-option",
         "missing-conversation", "unknown-option", "bad-conversation-render",
         "bad-conversation-score", "out-is-a-file", "unknown-approx", "restated-not-a-share",
         "restated-without-windowed", "refine-without-windowed", "refine-negative"],
)
def test_bad_usage_exits_2_with_one_clear_line(
    argv: list[str], says: str, bad_conversation: Path, server_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file.txt").write_text("not a folder")

    def fill(a: str) -> str:
        return (a.replace("{sample}", str(SAMPLE)).replace("{bad}", str(bad_conversation))
                .replace("{tmp}", str(tmp_path)).replace("{server}", server_url))

    res = run_cli([fill(a) for a in argv], capsys)
    assert res.code == 2
    assert res.out == ""
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("scoring-kit: error: ") and fill(says) in lines[0], lines[0]


def test_process_exit_codes_and_stderr(tmp_path: Path) -> None:
    """The console entry point (``python -m scoring_kit``) exits with main's code."""
    ok = subprocess.run([sys.executable, "-m", "scoring_kit", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0 and "usage: scoring-kit" in ok.stdout and ok.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "scoring_kit", "render", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"scoring-kit: error: {tmp_path / 'x'}: no such file"]


# ── render ──────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    ("extra", "entries", "skip", "model"),
    [
        ([], None, [], "default"),
        (["--skip", "D2:5"], None, ["D2:5"], "default"),
        (["--range", "4:12"], range(4, 12), [], "default"),
        (["--skip", "D2:5", "--skip", "D1:14", "--range", ":12", "--model", "smol"],
         range(0, 12), ["D2:5", "D1:14"], "smol"),
    ],
    ids=["full", "skip", "range", "skip2-range-model"],
)
def test_render_prints_the_exact_score_body(
    extra: list[str], entries: range | None, skip: list[str], model: str, tokenizer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ctx = sample_context(tokenizer)
    res = run_cli(["render", SAMPLE, *extra], capsys)
    assert res.code == 0 and res.err == ""
    assert res.out.endswith("\n") and res.out.count("\n") == 1
    body = orjson.loads(res.out)

    def skip_fn(n: Node) -> bool:
        return any(skip_key(k)(n) for k in skip)

    wp = ctx.wire_prompt(entries, skip_fn if skip else None)
    reading = body.pop("reading")  # how each node was read (memory / response / other)
    assert [r["read_as"] == "memory" for r in reading].count(True) == 8
    shown = {"scored", "score_span", "chat_template"}  # for a reader; not sent to a server
    assert {k: v for k, v in body.items() if k not in shown} == {
        **wp.body(model), "entries": list(wp.entries)}
    assert body["scored"] == [tokenizer.decode(wp.tokens[a:b].tolist()) for a, b in wp.ranges]
    assert body["score_span"] == "turn" and body["chat_template"]["ablation"] == "cut"
    assert {"prompt", "score_ranges", "entries", "logprobs", "model"} <= set(body)
    assert body["model"] == model and len(body["score_ranges"]) == len(body["entries"])
    full = ctx.wire_prompt(entries)
    if skip:  # the memories' tokens are gone, every response is still scored
        assert len(body["prompt"]) < len(full.tokens)
        assert body["entries"] == list(full.entries)
    if entries is not None:
        assert all(e in entries for e in body["entries"])
        assert len(body["entries"]) < len(ctx.response_indices())


# ── score ───────────────────────────────────────────────────────────
def test_score_no_chart_writes_the_matrix_only(
    small: Path, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    res = run_cli(["score", small, "--out", out, "--server", server_url, "--quiet",
                   "--no-chart"], capsys)
    assert res.code == 0, res.err
    assert res.out == f"scored 3 memories x 2 responses -> {out}/matrix.parquet\n"
    assert (out / "matrix.parquet").exists() and (out / "matrix.npz").exists()
    assert not (out / "heatmap.html").exists() and not (out / "heatmap.png").exists()


def test_score_writes_matrix_parquet_and_heatmaps(
    small: Path, small_ctx: ContextState, engine: Any, server_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    res = run_cli(["score", small, "--out", out, "--server", server_url, "--quiet"], capsys)
    assert res.code == 0, res.err
    assert res.out == (f"scored 3 memories x 2 responses -> {out}/matrix.parquet, heatmap.html, "
                       "heatmap.png\n")
    frame = pl.read_parquet(out / "matrix.parquet")
    assert frame.columns == ["memory_key", "entry_index", "baseline", "without", "delta",
                             "divergence", "error", "memory_text", "response_text"]
    assert frame.columns[:7] == list(MATRIX_COLUMNS)
    assert frame.height == 3 * 2 and frame["error"].null_count() == 6
    assert frame["memory_key"].unique(maintain_order=True).to_list() == ["pet", "city", "food"]
    assert np.allclose(frame["divergence"], np.maximum(frame["baseline"] - frame["without"], 0))
    assert "<html" in (out / "heatmap.html").read_text()[:2000].lower()
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "matrix.ckpt.npz").exists()
    # the numbers are what the engine gives these prompts directly
    m = MemoryMatrix.load(out / "matrix.parquet")
    base = small_ctx.wire_prompt()
    np.testing.assert_allclose(m.baseline, engine.score(base.tokens, base.ranges), atol=1e-4)
    for i, key in enumerate(m.keys):
        wp = small_ctx.wire_prompt(skip=skip_key(key))
        np.testing.assert_allclose(m.without[i], engine.score(wp.tokens, wp.ranges), atol=1e-4)


def test_score_approx_is_labelled_and_reports_its_cost(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    res = run_cli(["score", SAMPLE, "--out", out, "--server", server_url, "--quiet",
                   "--approx", "hierarchical", "--group-size", "4"], capsys)
    assert res.code == 0, res.err
    assert res.out.startswith("scored 8 memories x 13 responses")
    line = res.err.strip().splitlines()[-1]
    assert line.startswith("approximate (hierarchical): ") and " of 9 calls, " in line, line
    m = MemoryMatrix.load(out / "matrix.parquet")
    assert m.approximate and m.method == "hierarchical"
    assert m.meta["calls"] >= 1 and m.meta["group_size"] == 4
    assert MemoryMatrix.load(out / "matrix.npz").approximate
    res = run_cli(["score", SAMPLE, "--out", out, "--server", server_url, "--quiet",
                   "--approx", "windowed", "--window", "1"], capsys)
    assert res.code == 0, res.err
    assert "approximate (windowed): " in res.err and " cells estimated" in res.err
    m = MemoryMatrix.load(out / "matrix.parquet")
    assert m.approximate and m.method == "windowed" and m.meta["window"] == 1
    res = run_cli(["score", SAMPLE, "--out", out, "--server", server_url, "--quiet",
                   "--approx", "windowed", "--window", "1", "--restated", "0.5"], capsys)
    assert res.code == 0, res.err
    assert " memories restated later" in res.err
    m = MemoryMatrix.load(out / "matrix.parquet")
    assert m.meta["restated"] == 0.5 and isinstance(m.meta["extended"], dict)
    res = run_cli(["score", SAMPLE, "--out", out, "--server", server_url, "--quiet",
                   "--approx", "windowed", "--window", "1", "--refine", "2"], capsys)
    assert res.code == 0, res.err
    assert "; 2 heaviest rows made exact" in res.err
    m = MemoryMatrix.load(out / "matrix.parquet")
    assert m.meta["refine"] == 2 and len(m.meta["refined"]) == 2


def test_score_exits_1_when_the_server_refuses_some_rows(
    small: Path, small_ctx: ContextState, engine: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real, deterministic partial failure: the server's body limit fits every single
    prompt, but not the ``/score/batch`` round trip that carries two ablations."""
    def body(key: str | None) -> dict[str, Any]:
        wp = small_ctx.wire_prompt(skip=skip_key(key) if key else None)
        return wp.request().body("default")

    limit = len(orjson.dumps(body(None)))
    items = [{k: v for k, v in body(key).items() if k != "model"} for key in ("city", "food")]
    assert len(orjson.dumps({"model": "default", "requests": items})) > limit
    assert all(len(orjson.dumps(body(k))) <= limit for k in ("pet", "city", "food"))
    out = tmp_path / "out"
    with EmbeddedServer(engine, max_body_bytes=limit) as srv:
        res = run_cli(["score", small, "--out", out, "--server", srv.url, "--backend", "score",
                       "--quiet"], capsys)
    assert res.code == 1, res
    assert res.out.startswith("scored 3 memories x 2 responses")
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scoring-kit: 2 memories failed: city: ")
    assert "HTTP 413" in lines[0] and f"limit of {limit} bytes" in lines[0] and "food: " in lines[0]
    m = MemoryMatrix.load(out / "matrix.parquet")  # results still written
    assert m.failed == ["city", "food"]
    assert np.isnan(m.without[1:]).all() and np.isfinite(m.without[0]).all()
    assert (out / "matrix.ckpt.npz").exists()  # kept: a rerun redoes only the failed rows


# ── candidates, incremental, train ──────────────────────────────────
@pytest.fixture()
def job_server(engine: Any, tmp_path: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(engine, train_dir=tmp_path / "jobs") as srv:
        yield srv


def test_candidates_then_train_marks_them(
    small: Path, server_url: str, job_server: EmbeddedServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cands = tmp_path / "cands.jsonl"
    trained = tmp_path / "trained.json"
    argv = ["candidates", small, "--out", cands, "--threshold", "0", "--trained", trained,
            "--server", server_url]
    res = run_cli(argv, capsys)
    assert res.code == 0, res.err
    chat = tmp_path / "cands.chat.jsonl"
    assert res.out.startswith("1 candidates of 1 responses (threshold 0, max divergence ")
    assert res.out.rstrip().endswith(f"-> {cands} and {chat}")
    (cand,) = read_candidates(cands)
    assert cand.entry_idx == 6 and cand.response_text == "You live in Lisbon."
    (record,) = read_chat(chat)
    assert record["messages"][-1] == {"role": "assistant", "content": "You live in Lisbon."}

    train = ["train", cands, "--server", job_server.url, "--trained", trained]
    res = run_cli(train, capsys)
    assert res.code == 0, res.err
    assert res.out.startswith(f"sent 1 samples to {job_server.url}/train: job_id=")
    job_id = res.out.strip().rsplit("job_id=", 1)[1]
    (sample,) = [orjson.loads(x) for x in
                 (tmp_path / "jobs" / f"{job_id}.jsonl").read_bytes().splitlines() if x.strip()]
    assert sample == {"context_ids": list(cand.context_ids),
                      "continuation_ids": list(cand.continuation_ids)}
    assert orjson.loads(trained.read_bytes()) == [cand.timestamp_ns]
    # marked: a second train sends nothing, and candidates skips the trained response
    res = run_cli(train, capsys)
    assert (res.code, res.out) == (0, "all candidates are already trained; nothing sent\n")
    assert len(list((tmp_path / "jobs").glob("*.jsonl"))) == 1
    res = run_cli(argv, capsys)
    assert res.code == 0 and res.out.startswith("0 candidates of 1 responses")


def test_incremental_prints_scored_and_skipped(
    small: Path, small_ctx: ContextState, server_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store.json"
    argv = ["incremental", small, "--store", store, "--server", server_url, "--quiet"]
    res = run_cli(argv, capsys)
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    # pet opens the conversation; city and food come after 60% of its tokens
    assert lines[0].startswith("scored  pet: max divergence ")
    assert " -> weight " in lines[0]
    assert [ln.split(":")[0] for ln in lines[1:3]] == ["skipped city", "skipped food"]
    assert all("past the 60% cutoff" in ln for ln in lines[1:3])
    assert lines[-1] == f"1 scored, 2 skipped, 0 not due, 0 failed; store: {store}"
    assert "pet" in orjson.loads(store.read_bytes()).__repr__()
    # scored just now: not due on the next run (no scoring call at all)
    res = run_cli(argv, capsys)
    assert res.code == 0 and "not due pet" in res.out.splitlines()
    assert res.out.splitlines()[-1].startswith("0 scored, 2 skipped, 1 not due, 0 failed")


def test_backend_choices_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """--backend lists exactly ``auto`` and the registered names; a newly registered backend
    shows up without touching the CLI."""
    import inspect
    import types

    from scoring_kit.backends import registry
    from scoring_kit.session import Session, open_session

    def choices() -> list[str]:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        act = next(a for a in sub.choices["score"]._actions if "--backend" in a.option_strings)
        return list(act.choices or [])

    assert choices() == ["auto", "score", "vllm", "sglang", "echo", "local"]
    extended = types.MappingProxyType({**registry.REGISTRY, "other": "tests.fake:Other"})
    monkeypatch.setattr(registry, "REGISTRY", extended)
    assert choices()[-1] == "other"
    # open_session shows Session's parameters (not **kwargs)
    assert inspect.signature(open_session).parameters.keys() == \
        inspect.signature(Session).parameters.keys()
