"""End-to-end CLI figures beside the in-process ones: ``bench_matrix.py --cli``.

    .venv/bin/python benchmarks/bench_matrix.py --cli                    # 2000 tokens x 20 memories
    .venv/bin/python benchmarks/bench_matrix.py --cli --cli-point 700x6  # a tiny point
    .venv/bin/python benchmarks/bench_matrix.py --cli --cli-fresh-cache  # also a cold render

The in-process figures (the seed's way, the kit's exact matrix) measure the scoring alone; a
user runs ``scoring-kit score`` in a fresh interpreter, which pays a fixed start-up cost on top
(imports, the tokenizer, tokenizing the file, the tokenizer agreement check with the server,
HTTP, writing the matrix files and the heatmap). For each layout this module:

1. writes the benchmark conversation as plain messages JSONL (the format of
   ``data/sample_conversation.jsonl``; memories carry their key) and checks that the file reads
   back into the same token prompt as the in-process context, in this process and through the
   CLI's own ``render`` (tokens and score ranges equal, else it stops with an error);
2. times ``python -m scoring_kit render FILE`` from outside (wall clock, a subprocess of this
   interpreter): the first call, cold when the tokenizer cache held no entry for the model
   (see ``--cli-fresh-cache``), then the median of ``--cli-repeats`` warm calls;
3. times ``python -m scoring_kit score FILE --server URL --out DIR --quiet --no-chart
   --chunk-size N`` (median of ``--cli-repeats``; one more run with the heatmap, reported
   beside it: importing and rendering Altair costs several seconds) against one embedded server (``start_server_process``),
   started once, before the first ``score``, and kept for the whole run; ``--chunk-size`` is
   the number of memories, as in the in-process exact run (one batch), so that the fixed cost
   is not a difference in chunking. The server's engine keeps the KV of recent prompts
   between calls (its persistent prefix cache): a repeat would reuse the previous run's
   baseline and compute a fraction of the tokens (at 700 x 6, 223 instead of 1,106). The
   in-process exact run clears its engine's cache before each run, so before each timed
   ``score`` a few tiny unrelated ``/score`` calls push those prefixes out (untimed);
4. reads ``DIR/matrix.npz`` back and checks it against the in-process exact matrix (max
   ``|diff|`` of the baseline and ablated totals <= 1e-3, else it stops with an error).

It reports the CLI's wall time, its speedup over the seed's way measured in-process in the same
run, its share of the token bound (speedup / bound), the fixed cost (CLI wall time minus the
in-process exact time) and the render wall time. The children run this checkout's code
(``PYTHONPATH`` starts with the repository root), with the same interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scoring_kit import _settings  # noqa: E402
from scoring_kit.context.io import load_context  # noqa: E402
from scoring_kit.context.model import ContextState  # noqa: E402
from scoring_kit.scoring.memory_matrix import MemoryMatrix  # noqa: E402
from scoring_kit.server.process import ServerProcess, start_server_process  # noqa: E402

DEFAULT_POINT = "2000x20"
#: the CLI's matrix must equal the in-process exact matrix within this (log-prob totals)
MATRIX_ATOL = 1e-3
#: the unrelated one-prompt ``/score`` calls that empty the server's prefix cache before each
#: timed ``score`` (the engine keeps ``prefix_cache_entries``, 4 by default, most recent
#: first); each prompt is FLUSH_LEN tokens whose first id differs from every other's
FLUSH_CALLS, FLUSH_LEN = 8, 8


class CliBenchError(RuntimeError):
    """The CLI's input or output differs from the in-process run (the benchmark stops)."""


def parse_point(text: str) -> tuple[int, int]:
    """An argparse type: ``TOKENSxMEMORIES`` (tokens >= 200, memories >= 1)."""
    try:
        t, n = text.lower().split("x")
        point = int(t), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENSxMEMORIES, got {text!r}") from None
    if point[0] < 200 or point[1] < 1:
        raise argparse.ArgumentTypeError(f"point {text!r}: tokens >= 200, memories >= 1")
    return point


def write_messages(messages: list[dict[str, str]], path: Path) -> Path:
    """Plain messages JSONL, one message a line (memories carry their ``key``)."""
    path.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages))
    return path


def check_same_prompt(ctx: ContextState, tokens: list[int], ranges: list[list[int]],
                      what: str) -> None:
    """Stop with :class:`CliBenchError` unless ``tokens`` / ``ranges`` are ``ctx``'s prompt."""
    wp = ctx.wire_prompt()
    want_tokens = wp.tokens.tolist()
    want_ranges = [list(r) for r in wp.ranges]
    if tokens != want_tokens:
        at = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens, strict=False))
                   if a != b), min(len(tokens), len(want_tokens)))
        msg = (f"{what}: the file does not read back into the benchmark's token prompt "
               f"({len(tokens)} tokens against {len(want_tokens)}; first difference at {at})")
        raise CliBenchError(msg)
    if ranges != want_ranges:
        raise CliBenchError(f"{what}: the score ranges differ from the benchmark's")


def check_round_trip(path: Path, ctx: ContextState, tokenizer: Any) -> None:
    """The file, read back with ``tokenizer``, is ``ctx``'s prompt (fail loudly otherwise)."""
    back = load_context(path, tokenizer).wire_prompt()
    check_same_prompt(ctx, back.tokens.tolist(), [list(r) for r in back.ranges],
                      f"{path} read back in process")


def matrix_diff(cli: MemoryMatrix, exact: MemoryMatrix) -> dict[str, float]:
    """Max ``|diff|`` of the baseline, the ablated totals and the divergence (NaN: failed)."""
    if cli.keys != exact.keys or cli.entries.tolist() != exact.entries.tolist():
        raise CliBenchError(f"the CLI's matrix has other keys or responses: {cli.keys} / "
                            f"{cli.entries.tolist()} against {exact.keys} / "
                            f"{exact.entries.tolist()}")

    def worst(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a - b))) if a.size else 0.0

    return {"baseline": worst(cli.baseline, exact.baseline),
            "without": worst(cli.without, exact.without),
            "divergence": worst(cli.divergence, exact.divergence)}


def flush_prefix_cache(url: str, avoid_first: int) -> None:
    """Push the prefixes the server keeps between calls out with FLUSH_CALLS unrelated
    prompts (none shares a first token with another or with the benchmark's prompt)."""
    firsts = [t for t in range(1000, 1000 + FLUSH_CALLS + 1) if t != avoid_first][:FLUSH_CALLS]
    for first in firsts:
        body = {"model": "default", "prompt": [first, *range(300, 300 + FLUSH_LEN - 1)],
                "score_ranges": [[FLUSH_LEN // 2, FLUSH_LEN]], "logprobs": 1}
        req = urllib.request.Request(url.rstrip("/") + "/score", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as answer:
            answer.read()


def _tokenizer_cached(cache: Path) -> str:
    """``warm`` when ``cache`` holds a finished tokenizer entry for the embedded model,
    ``cold`` when not, ``off`` when the cache is turned off (``SCORING_KIT_TOKENIZER_CACHE``)."""
    from scoring_kit.engine.loader import resolve_model

    if not _settings.tokenizer_cache():
        return "off"
    loc = resolve_model(None)
    if loc.gguf_file is None:  # an HF folder: read as it is, no cache
        return "off"
    with (loc.directory / loc.gguf_file).open("rb") as f:  # not tokcache's: it writes the index
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return "warm" if (cache / "tokenizers" / digest / "complete.json").is_file() else "cold"


class CliBench:
    """The CLI measurement of one run: one embedded server for all layouts (started lazily,
    after the first layout's render timings, so a fresh cache's first render is cold), or
    the running server at ``server_url`` (the tests' own)."""

    def __init__(self, *, repeats: int = 3, device: str | None = None,
                 fresh_cache: bool = False, server_url: str | None = None) -> None:
        self.repeats = repeats
        self.device = device
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-cli-")
        self.workdir = Path(self._tmp.name)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if fresh_cache:
            self.env[_settings.CACHE_ENV] = str(self.workdir / "cache")
        self.cache = Path(self.env.get(_settings.CACHE_ENV) or _settings.cache_dir())
        self.server: ServerProcess | None = None
        self.server_start_s: float | None = None
        self._given_url = server_url
        self._renders = 0

    # ── children ────────────────────────────────────────────
    def _run(self, argv: list[str]) -> tuple[float, str, str]:
        """Run ``python -m scoring_kit ARGV`` (wall clock, seconds; stdout; stderr)."""
        cmd = [sys.executable, "-m", "scoring_kit", *argv]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, check=False)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            msg = (f"`scoring-kit {' '.join(argv[:1])}` exited {done.returncode}:\n"
                   f"{done.stderr[-3000:]}")
            raise CliBenchError(msg)
        return wall, done.stdout, done.stderr

    def _server_url(self) -> str:
        if self._given_url is not None:
            return self._given_url
        if self.server is None:
            t = time.perf_counter()
            self.server = start_server_process(device=self.device, env=self.env)
            self.server_start_s = time.perf_counter() - t
            print(f"embedded server for the CLI: {self.server.url} "
                  f"(started in {self.server_start_s:.1f} s)")
        return self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._tmp.cleanup()

    def __enter__(self) -> CliBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ── one layout ──────────────────────────────────────────
    def render(self, path: Path, ctx: ContextState) -> dict[str, Any]:
        """Time ``render FILE``: the first call (cold or warm cache) and warm ones (median)."""
        cache = _tokenizer_cached(self.cache)
        first_of_run = self._renders == 0
        times = []
        for i in range(self.repeats + 1):
            wall, out, _ = self._run(["render", str(path)])
            self._renders += 1
            if i == 0:  # render prints the /score body: the CLI's own reading of the file
                body = json.loads(out)
                check_same_prompt(ctx, body["prompt"], body["score_ranges"],
                                  f"`scoring-kit render {path.name}`")
            times.append(wall)
        return {"s": statistics.median(times[1:]), "first_s": times[0],
                "first_cache": cache if first_of_run else "warm", "runs_s": times}

    def score(self, path: Path, ctx: ContextState, exact: MemoryMatrix) -> dict[str, Any]:
        """Time ``score FILE --server URL --out DIR`` (median); check its matrix."""
        url = self._server_url()
        n = max(1, len(ctx.memory_keys()))
        first = int(ctx.wire_prompt().tokens[0])
        times, diffs, warnings = [], [], set()
        for i in range(self.repeats):
            flush_prefix_cache(url, first)  # every run starts with no kept prefix, as in process
            out = self.workdir / f"{path.stem}-score-{i}"
            wall, _, err = self._run(["score", str(path), "--server", url, "--out", str(out),
                                      "--quiet", "--no-chart", "--chunk-size", str(n)])
            times.append(wall)
            warnings |= {line for line in err.splitlines() if "warning" in line.lower()}
            diff = matrix_diff(MemoryMatrix.load(out / "matrix.npz"), exact)
            worst = max(diff["baseline"], diff["without"])
            if not worst <= MATRIX_ATOL:  # NaN (a failed row) fails too
                raise CliBenchError(f"the CLI's matrix differs from the in-process exact one: "
                                    f"max |diff| {diff}")
            diffs.append(diff)
        # once more with the heatmap (Altair import + HTML/PNG render), untimed above
        flush_prefix_cache(url, first)
        charted, _, _ = self._run(["score", str(path), "--server", url, "--out",
                                   str(self.workdir / f"{path.stem}-score-chart"), "--quiet",
                                   "--chunk-size", str(n)])
        return {"s": statistics.median(times), "runs_s": times, "chunk_size": n,
                "with_heatmap_s": charted,
                "max_abs_diff": {k: max(d[k] for d in diffs) for k in diffs[0]},
                "warnings": sorted(warnings)}

    def measure(self, layout: str, ctx: ContextState, messages: list[dict[str, str]],
                exact: MemoryMatrix, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
        """The CLI figures of one layout beside its in-process ``row``; prints two rows."""
        path = write_messages(messages, self.workdir / f"{layout}.jsonl")
        check_round_trip(path, ctx, tokenizer)
        rendered = self.render(path, ctx)
        scored = self.score(path, ctx, exact)
        t_seed, t_exact, bound = row["seed"]["s"], row["exact"]["s"], row["bound"]
        t_cli = scored["s"]
        speedup = t_seed / t_cli
        fixed = t_cli - t_exact
        diff = max(scored["max_abs_diff"]["baseline"], scored["max_abs_diff"]["without"])
        figures = {"score": {**scored, "speedup": speedup, "share_of_bound": speedup / bound,
                             "fixed_cost_s": fixed},
                   "render": rendered, "server_start_s": self.server_start_s,
                   "file_bytes": path.stat().st_size, "repeats": self.repeats}
        print(f"{'cli':<8}{t_cli:>9.2f}{speedup:>9.2f}{'-':>12}{'-':>8}{'-':>9}  "
              f"{speedup / bound:.0%} of the bound; fixed cost {fixed:+.2f} s over exact "
              f"in-process; max |diff| vs exact {diff:.1e}; `score --server --no-chart` "
              f"median of {self.repeats}; with the heatmap {scored['with_heatmap_s']:.2f} s")
        first = rendered["first_cache"]
        print(f"{'render':<8}{rendered['s']:>9.2f}{'-':>9}{'-':>12}{'-':>8}{'-':>9}  "
              f"warm, median of {self.repeats}; first call {rendered['first_s']:.2f} s "
              f"({'cold: tokenizer cache empty' if first == 'cold' else first + ' cache'})")
        for w in scored["warnings"]:
            print(f"        note: the CLI said: {w}")
        return figures
