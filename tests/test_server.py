"""The embedded server over real HTTP (httpx → uvicorn on 127.0.0.1, random port).

Numbers are checked against the real engine (session fixtures). Fake engines are used only
for what the real one cannot be made to do on demand: block the worker (503 when the queue
is full) and raise (500, then keep serving).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from scoring_kit._exceptions import BackendUnavailable, PromptError, ServerBusy
from scoring_kit._files import read_jsonl
from scoring_kit.server.app import EngineWorker, prompt_token_logprobs
from scoring_kit.server.runner import READY_LINE, EmbeddedServer, start_server_process

TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ids(tokenizer: Any) -> list[int]:
    out = [int(t) for t in tokenizer.encode(TEXT)]
    assert len(out) >= 12
    return out


def _error(resp: httpx.Response, status: int, *needles: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    msg = body["error"]
    assert isinstance(msg, str)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# --------------------------------------------------------------------------- fakes


class _FakeTokenizer:
    name = "fake"
    vocab_size = 100
    im_start_id = 1
    im_end_id = 2

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 90) for c in text]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


class _FakeEngine:
    """Scores every token at -1.0; ``gate`` (if set) blocks ``score`` until released."""

    name = "fake-model"
    vocab_size = 100
    max_len = 64
    device = "cpu"

    def __init__(self, *, gate: threading.Event | None = None, fail_first: int = 0) -> None:
        self.tokenizer = _FakeTokenizer()
        self.gate = gate
        self.entered = threading.Event()
        self.fail_first = fail_first
        self.calls = 0

    def score(self, prompt: Sequence[int], ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.calls <= self.fail_first:
            raise RuntimeError("boom in the engine")
        return np.array([-(b - a) for a, b in ranges], dtype=np.float64)

    def score_many(self, items: Sequence[Any]) -> list[np.ndarray | PromptError]:
        return [self.score(p, r) for p, r in items]

    def generate(self, prompt: Sequence[int], **kwargs: Any) -> tuple[list[int], str]:
        return [5, 6], "ab"


# --------------------------------------------------------------------------- basics


def test_health_and_models(client: httpx.Client, engine: Any) -> None:
    h = client.get("/health")
    assert h.status_code == 200
    assert h.json() == {
        "status": "ok",
        "model": engine.name,
        "max_model_len": engine.max_len,
        "vocab_size": engine.vocab_size,
        "capabilities": [
            "score",
            "score_batch",
            "completions",
            "prompt_logprobs",
            "generate",
            "train",
        ],
        "server": "scoring_kit",
    }
    m = client.get("/v1/models").json()
    assert m["object"] == "list"
    (card,) = m["data"]
    assert card["id"] == engine.name
    assert card["object"] == "model"
    assert card["owned_by"] == "scoring_kit"
    assert card["max_model_len"] == engine.max_len


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_equals_engine(client: httpx.Client, engine: Any, ids: list[int], path: str) -> None:
    n = len(ids)
    ranges = [[1, 4], [4, 9], [9, n]]
    body = {"model": engine.name, "prompt": ids, "score_ranges": ranges, "logprobs": 1}
    resp = client.post(path, json={**body, "priority": 5})
    assert resp.status_code == 200, resp.text
    scores = resp.json()["scores"]
    assert [s["range_index"] for s in scores] == [0, 1, 2]
    got = np.array([s["total_logprob"] for s in scores])
    want = engine.score(ids, [tuple(r) for r in ranges])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.all(got < 0)


def test_score_empty_ranges(client: httpx.Client, ids: list[int]) -> None:
    resp = client.post("/score", json={"model": "m", "prompt": ids, "score_ranges": []})
    assert resp.status_code == 200
    assert resp.json() == {"scores": []}


def _long(n: int) -> list[int]:
    return [100 + (i % 1000) for i in range(n)]


_IMG = {"image": ["data:image/png;base64,AAAA"]}

# case id -> (ids, engine) -> (JSON body or raw bytes, what the message must contain: the
# limit and the actual value)
_BAD_SCORE: dict[str, Any] = {
    "empty prompt": lambda ids, e: (
        {"prompt": [], "score_ranges": [[1, 2]]}, ["prompt is empty", "at least 2 tokens"]),
    "range past end": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[1, len(ids) + 5]]},
        [f"end {len(ids) + 5} > prompt length {len(ids)}"]),
    "start below 1": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[0, 2]]}, ["starts at 0", "start at 1 or later"]),
    "end not after start": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[3, 3]]}, ["[3, 3)", "end must be > start"]),
    "overlapping": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[1, 4], [3, 5]]}, ["[3, 5) overlaps", "ends at 4"]),
    "unsorted": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[4, 6], [1, 2]]}, ["[1, 2)", "ends at 6", "sorted"]),
    "too long": lambda ids, e: (
        {"prompt": _long(e.max_len + 1), "score_ranges": [[1, 2]]},
        [f"{e.max_len + 1} tokens", f"context of {e.max_len} tokens"]),
    "outside vocab": lambda ids, e: (
        {"prompt": [*ids[:3], e.vocab_size], "score_ranges": [[1, 2]]},
        [f"token id {e.vocab_size} at prompt position 3", f"[0, {e.vocab_size})"]),
    "malformed json": lambda ids, e: (
        b'{"prompt": [1, 2', ["malformed JSON", "16 bytes", "column 17"]),
    "not an object": lambda ids, e: (b"[1, 2]", ["JSON object", "got an array"]),
    "missing field": lambda ids, e: (
        {"prompt": ids}, ["missing required field", "`score_ranges`"]),
    "wrong type": lambda ids, e: (
        {"prompt": "hello", "score_ranges": []},
        ["`prompt`", "an array of integer token ids", 'a string ("hello")']),
    "wrong item type": lambda ids, e: (
        {"prompt": [1, 2.5], "score_ranges": []},
        ["`prompt[1]`", "an integer token id", "a number (2.5)"]),
    "bad range shape": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[1, 2, 3]]},
        ["`score_ranges[0]`", "[start, end] pair", "[1,2,3]"]),
    "images": lambda ids, e: (
        {"prompt": ids, "score_ranges": [[1, 2]], "multi_modal_data": _IMG},
        ["text-only", "cannot use images", "1 item(s)", "limit is 0"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD_SCORE))
def test_score_bad_input(client: httpx.Client, engine: Any, ids: list[int], case: str) -> None:
    body, needles = _BAD_SCORE[case](ids, engine)
    if isinstance(body, bytes):
        resp = client.post("/score", content=body, headers={"content-type": "application/json"})
    else:
        resp = client.post("/score", json={"model": "m", **body})
    _error(resp, 400, *needles)
    assert client.get("/health").status_code == 200  # still serving


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    _error(client.get("/nope"), 404, "GET /nope", "/score")
    resp = client.get("/score")
    _error(resp, 405, "GET", "/score", "POST")
    assert resp.headers["allow"] == "POST"


# --------------------------------------------------------------------------- batch


def test_score_batch_equals_individual(client: httpx.Client, engine: Any, ids: list[int]) -> None:
    n = len(ids)
    ablated = ids[:2] + ids[5:]
    reqs = [
        {"prompt": ids, "score_ranges": [[6, n]]},
        {"prompt": ablated, "score_ranges": [[3, len(ablated)]]},
        {"prompt": ids, "score_ranges": [[0, 2]]},  # invalid
        {"prompt": ids, "score_ranges": []},
        {"prompt": "text", "score_ranges": []},  # ill-typed
        {"prompt": ids[:8], "score_ranges": [[1, 8]]},
    ]
    resp = client.post("/score/batch", json={"model": engine.name, "requests": reqs})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == len(reqs)
    for k in (0, 1, 5):
        single = client.post("/score", json=reqs[k]).json()["scores"]
        assert [s["range_index"] for s in results[k]["scores"]] == [0]
        np.testing.assert_allclose(
            results[k]["scores"][0]["total_logprob"], single[0]["total_logprob"], atol=1e-4
        )
    assert "requests[2]" in results[2]["error"] and "starts at 0" in results[2]["error"]
    assert results[3] == {"scores": []}
    assert "requests[4].prompt" in results[4]["error"]
    assert client.post("/score/batch", json={"requests": []}).json() == {"results": []}
    _error(client.post("/score/batch", json={"requests": {}}), 400, "`requests`", "an object")


# --------------------------------------------------------------------------- vLLM shape


def test_completions_prompt_logprobs(client: httpx.Client, engine: Any, ids: list[int]) -> None:
    body = {
        "model": engine.name,
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
        "stream": False,
    }
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "text_completion"
    assert data["model"] == engine.name
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["text"], str)
    assert data["usage"]["prompt_tokens"] == len(ids)
    assert data["usage"]["total_tokens"] == len(ids) + data["usage"]["completion_tokens"]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids)
    assert plp[0] is None
    for t in range(1, len(ids)):
        entry = plp[t]
        assert list(entry) == [str(ids[t])]  # keys are token ids as strings
        info = entry[str(ids[t])]
        assert set(info) == {"logprob", "rank", "decoded_token"}
        assert info["decoded_token"] == engine.tokenizer.decode([ids[t]])
    n = len(ids)
    ranges = [(1, 4), (4, 9), (9, n)]
    want = client.post("/score", json={"prompt": ids, "score_ranges": ranges}).json()["scores"]
    for (a, b), s in zip(ranges, want, strict=True):
        total = sum(plp[t][str(ids[t])]["logprob"] for t in range(a, b))
        assert abs(total - s["total_logprob"]) < 1e-4


def test_completions_generation_and_limits(
    client: httpx.Client, engine: Any, ids: list[int]
) -> None:
    im_end = engine.tokenizer.im_end_id
    body = {
        "prompt": TEXT,
        "max_tokens": 3,
        "temperature": 0,
        "top_k": 20,
        "top_p": 0.95,
        "stop_token_ids": [im_end],
        "skip_special_tokens": False,
        "seed": 1,
        "priority": 5,
    }
    data = client.post("/completions", json=body).json()
    assert data["usage"]["prompt_tokens"] == len(ids)
    assert data["usage"]["completion_tokens"] <= 3
    assert data["choices"][0]["prompt_logprobs"] is None
    _error(client.post("/completions", json={**body, "max_tokens": 0}), 400, "at least 1", "0")
    long_prompt = _long(engine.max_len - 2)
    resp = client.post("/completions", json={"prompt": long_prompt, "max_tokens": 5})
    _error(
        resp,
        400,
        f"maximum context length is {engine.max_len} tokens",
        f"requested {engine.max_len + 3} tokens",
    )
    resp = client.post("/completions", json={"prompt": ids, "prompt_logprobs": 5})
    _error(resp, 400, "prompt logprobs of 5", "max allowed: 0")
    resp = client.post("/completions", json={"prompt": ids, "prompt_logprobs": -2})
    _error(resp, 400, "positive value or -1", "-2")
    resp = client.post("/completions", json={"prompt": ids, "temperature": "hot"})
    _error(resp, 400, "`temperature`", "a string")


# --------------------------------------------------------------------------- SGLang shape


def test_generate_input_token_logprobs(client: httpx.Client, engine: Any, ids: list[int]) -> None:
    n = len(ids)
    lps = prompt_token_logprobs(engine, ids)  # lps[t - 1] = log P(ids[t] | ids[:t])
    for s in (0, 3):
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": s,
        }
        resp = client.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["text"] == "" and data["output_ids"] == []
        meta = data["meta_info"]
        assert meta["prompt_tokens"] == n
        assert meta["completion_tokens"] == 0
        assert meta["cached_tokens"] == 0
        assert meta["finish_reason"] == {"type": "length", "length": 0}
        itl = meta["input_token_logprobs"]
        assert len(itl) == n - s
        assert itl[0] == [None, ids[s], None]
        for j in range(1, n - s):
            lp, tid, text = itl[j]
            assert tid == ids[s + j] and text is None
            assert abs(lp - lps[s + j - 1]) < 1e-4
    # s == len: nothing listed; s > len: SGLang's message
    body["logprob_start_len"] = n
    assert client.post("/generate", json=body).json()["meta_info"]["input_token_logprobs"] == []
    body["logprob_start_len"] = n + 1
    _error(
        client.post("/generate", json=body),
        400,
        f"logprob_start_len={n + 1} is higher than the number of input tokens",
        f"={n}",
    )


def test_generate_tokens_and_validation(client: httpx.Client, ids: list[int]) -> None:
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0, "top_k": -1},
        "return_logprob": True,
        "logprob_start_len": len(ids) - 1,
        "return_text_in_logprobs": True,
    }
    data = client.post("/generate", json=body).json()
    out = data["output_ids"]
    assert 1 <= len(out) <= 2
    meta = data["meta_info"]
    assert meta["completion_tokens"] == len(out)
    assert [e[1] for e in meta["output_token_logprobs"]] == out
    assert all(e[0] <= 0 for e in meta["output_token_logprobs"])
    assert meta["input_token_logprobs"][0][0] is None
    assert isinstance(meta["input_token_logprobs"][0][2], str)
    bad = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0, "foo": 1}}
    _error(
        client.post("/generate", json=bad),
        400,
        "unknown field `foo`, expected one of `max_new_tokens`",
    )
    bad = {"input_ids": ids, "sampling_params": {"max_new_tokens": -1}}
    _error(client.post("/generate", json=bad), 400, "max_new_tokens", "at least 0", "-1")
    _error(client.post("/generate", json={"sampling_params": {}}), 400, "`input_ids`")


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_detokenize(client: httpx.Client, engine: Any, ids: list[int]) -> None:
    data = client.post("/tokenize", json={"prompt": TEXT}).json()
    assert data["tokens"] == ids
    assert data["count"] == len(ids)
    assert data["max_model_len"] == engine.max_len
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": TEXT}
    resp = client.post("/detokenize", json={"tokens": [engine.vocab_size + 1]})
    _error(resp, 400, f"token id {engine.vocab_size + 1}", f"[0, {engine.vocab_size})")


def test_tokenize_messages_applies_the_served_template(client: httpx.Client, engine: Any) -> None:
    """vLLM's chat shape: the served tokenizer's own template, a generation prompt by default."""
    msgs = [{"role": "user", "content": "Which instrument do I play?"}]
    text = engine.tokenizer.hf.apply_chat_template(msgs, tokenize=False,
                                                   add_generation_prompt=True)
    data = client.post("/tokenize", json={"messages": msgs}).json()
    assert data["tokens"] == engine.tokenizer.encode(text)
    assert data["count"] == len(data["tokens"]) and data["max_model_len"] == engine.max_len
    plain = client.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False})
    assert plain.json()["count"] < data["count"]
    _error(client.post("/tokenize", json={"messages": [{"role": "user"}]}), 400,
           "messages[0]", "`role` and `content` must be strings")
    _error(client.post("/tokenize", json={"messages": []}), 400, "messages")


# --------------------------------------------------------------------------- train


def test_train_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    monkeypatch.setenv("SCORING_KIT_TRAIN_DIR", str(folder))
    with EmbeddedServer(_FakeEngine()) as srv, httpx.Client(base_url=srv.url) as c:
        assert not folder.exists()  # nothing is created before the first job
        body = {"training_data": {"samples": [{"context_ids": [1], "continuation_ids": [2]}]}}
        job_id = c.post("/train", json=body).json()["job_id"]
        assert (folder / f"{job_id}.jsonl").is_file()


def test_train_jobs_are_durable(engine: Any, tmp_path: Path) -> None:
    samples = [
        {"context_ids": [1, 2, 3], "continuation_ids": [4, 5]},
        {"context_ids": [], "continuation_ids": [6]},
    ]
    with (
        EmbeddedServer(engine, train_dir=tmp_path) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        assert "train" in c.get("/health").json()["capabilities"]
        resp = c.post("/train", json={"training_data": {"samples": samples}})
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["job_id"]
        assert read_jsonl(tmp_path / f"{job_id}.jsonl") == samples
        status = c.get("/train/status", params={"job_id": job_id}).json()
        assert status["job_id"] == job_id
        assert status["status"] == "queued"
        assert status["samples"] == 2
        assert isinstance(status["created"], int)
        listing = c.get("/train/status").json()["jobs"]
        assert [j["job_id"] for j in listing] == [job_id]
        _error(c.get("/train/status", params={"job_id": "0" * 32}), 404, "0" * 32)
        bad = [samples[0], {"context_ids": [1], "continuation_ids": [engine.vocab_size]}]
        _error(
            c.post("/train", json={"training_data": {"samples": bad}}),
            400,
            "training_data.samples[1].continuation_ids[0]",
            f"token id {engine.vocab_size}",
            f"[0, {engine.vocab_size})",
        )
        bad = [{"context_ids": [1], "continuation_ids": "x"}]
        _error(
            c.post("/train", json={"training_data": {"samples": bad}}),
            400,
            "training_data.samples[0].continuation_ids",
            "a string",
        )
        _error(
            c.post("/train", json={"training_data": {"samples": []}}),
            400,
            "samples",
            "empty",
        )
    # durable: a new server over the same folder still knows the job
    with EmbeddedServer(engine, train_dir=tmp_path) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/train/status", params={"job_id": job_id}).json()["samples"] == 2


# --------------------------------------------------------------------------- auth


def test_api_key(engine: Any) -> None:
    key = "s3cret-key"
    with EmbeddedServer(engine, api_key=key) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/health").status_code == 200  # open
        body = {"prompt": [1, 2, 3], "score_ranges": [[1, 3]]}
        msg = _error(c.post("/score", json=body), 401, "missing API key", "Bearer")
        assert key not in msg
        wrong = {"authorization": "Bearer nope"}
        _error(c.post("/score", json=body, headers=wrong), 401, "invalid API key")
        _error(c.get("/v1/models"), 401)
        _error(c.get("/nope"), 401)
        ok = {"authorization": f"Bearer {key}"}
        assert c.post("/score", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200


# --------------------------------------------------------------------------- limits, faults


def test_body_too_large() -> None:
    with (
        EmbeddedServer(_FakeEngine(), max_body_bytes=1000) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        big = orjson.dumps({"prompt": [5] * 600, "score_ranges": [[1, 2]]})
        assert len(big) > 1000
        _error(c.post("/score", content=big), 413, f"{len(big)} bytes", "limit of 1000 bytes")

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
            yield big[:600]
            yield big[600:]

        _error(c.post("/score", content=chunks()), 413, "limit of 1000 bytes", f"{len(big)} bytes")
        small = {"prompt": [5, 6, 7], "score_ranges": [[1, 3]]}
        assert c.post("/score", json=small).json() == {
            "scores": [{"range_index": 0, "total_logprob": -2.0}]
        }


def test_queue_full_gives_503() -> None:
    gate = threading.Event()
    fake = _FakeEngine(gate=gate)
    body = {"prompt": [5, 6, 7], "score_ranges": [[1, 3]]}
    with EmbeddedServer(fake, max_queue=1) as srv, httpx.Client(base_url=srv.url) as c:
        worker: EngineWorker = srv.app.state.worker
        results: dict[str, int] = {}

        def post(name: str) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as own:
                results[name] = own.post("/score", json=body).status_code

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert fake.entered.wait(30)  # the worker is busy with the first request
        second = threading.Thread(target=post, args=("second",))
        second.start()
        assert worker.wait_for(lambda w: w.waiting == 1, 30)  # the second one waits
        try:
            resp = c.post("/score", json=body)
            _error(resp, 503, "server busy", "1 requests", "max_queue=1")
            assert resp.headers["retry-after"] == "1"
        finally:
            gate.set()
            first.join(30)
            second.join(30)
        assert results == {"first": 200, "second": 200}
        assert c.post("/score", json=body).status_code == 200


def test_internal_error_then_keeps_serving() -> None:
    fake = _FakeEngine(fail_first=1)
    body = {"prompt": [5, 6, 7], "score_ranges": [[1, 3]]}
    with EmbeddedServer(fake) as srv, httpx.Client(base_url=srv.url) as c:
        _error(c.post("/score", json=body), 500, "internal error", "RuntimeError", "boom")
        assert c.get("/health").status_code == 200
        assert c.post("/score", json=body).status_code == 200


def test_worker_priority_and_close() -> None:
    worker = EngineWorker(max_queue=10)
    gate = threading.Event()
    order: list[str] = []
    blocker = worker.submit(lambda: gate.wait(30))
    assert worker.wait_for(lambda w: w.busy, 30)
    futs = [
        worker.submit(lambda name=name: order.append(name), priority=p)
        for name, p in (("low", 9), ("high", 0), ("mid", 5))
    ]
    gate.set()
    for f in [blocker, *futs]:
        f.result(30)
    assert order == ["high", "mid", "low"]
    small = EngineWorker(max_queue=1)
    gate2 = threading.Event()
    small.submit(lambda: gate2.wait(30))
    assert small.wait_for(lambda w: w.busy, 30)
    waiting = small.submit(lambda: None)
    with pytest.raises(ServerBusy, match="max_queue=1"):
        small.submit(lambda: None)
    small.close()
    assert waiting.cancelled()
    gate2.set()
    assert small.submit(lambda: 42).result(30) == 42  # a fresh thread after close
    small.close()
    worker.close()


# --------------------------------------------------------------------------- process


# A child interpreter that imports this first (PYTHONPATH) serves a fake engine: the process
# plumbing (CLI -> serve() -> ready line -> start_server_process) is tested without loading
# the model a second time.
_FAKE_SITECUSTOMIZE = """
import numpy as np
from scoring_kit.engine import engine as _engine_mod

class _Tok:
    name = "fake-model"
    vocab_size = 100
    im_start_id = 1
    im_end_id = 2
    def encode(self, text):
        return [3 + ord(c) % 90 for c in text]
    def decode(self, ids, *, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)

class _Fake:
    name = "fake-model"
    vocab_size = 100
    max_len = 64
    device = "cpu"
    tokenizer = _Tok()
    def score(self, prompt, ranges):
        return np.array([-(b - a) for a, b in ranges], dtype=np.float64)
    def score_many(self, items):
        return [self.score(p, r) for p, r in items]
    def generate(self, prompt, **kwargs):
        return [5], "x"

_engine_mod.Engine.load = classmethod(lambda cls, *a, **k: _Fake())
"""


def _child_env(folder: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(folder) + (os.pathsep + path if path else "")}


def test_start_server_process(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(_FAKE_SITECUSTOMIZE)
    with start_server_process(api_key="sekrit-42", env=_child_env(tmp_path), timeout=120) as proc:
        assert proc.model == "fake-model"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proc.url)
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            assert c.get("/health").json()["model"] == "fake-model"
            body = {"prompt": [5, 6, 7], "score_ranges": [[1, 3]]}
            _error(c.post("/score", json=body), 401)
            ok = c.post("/score", json=body, headers={"authorization": "Bearer sekrit-42"})
            assert ok.json() == {"scores": [{"range_index": 0, "total_logprob": -2.0}]}
        assert "sekrit-42" not in " ".join(proc.process.args)  # the key travels in the environment
    assert proc.process.returncode is not None


def test_start_server_process_reports_failure(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(BackendUnavailable) as info:
        start_server_process(model_path=missing, timeout=120)
    msg = str(info.value)
    assert "exited with code" in msg
    assert "no-such-model.gguf" in msg  # from the child's stderr tail


def test_ready_line_format() -> None:
    m = READY_LINE.match("scoring_kit serving SmolLM2-135M-Instruct at http://127.0.0.1:41234")
    assert m is not None
    assert m["model"] == "SmolLM2-135M-Instruct"
    assert m["url"] == "http://127.0.0.1:41234"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SCORING_KIT_SLOW_TESTS"),
    reason="loads the model in a second process; set SCORING_KIT_SLOW_TESTS=1",
)
def test_start_server_process_real_model(engine: Any, ids: list[int]) -> None:
    with start_server_process(timeout=300) as proc:
        assert proc.model == engine.name
        with httpx.Client(base_url=proc.url, timeout=120) as c:
            body = {"prompt": ids, "score_ranges": [[1, 4]]}
            got = c.post("/score", json=body).json()["scores"][0]["total_logprob"]
            assert abs(got - float(engine.score(ids, [(1, 4)])[0])) < 1e-4
