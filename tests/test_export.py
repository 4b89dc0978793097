"""Exports: candidates JSONL + chat JSONL round trips and validation, matrix parquet/csv."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pytest

from scoring_kit._exceptions import ExportError, ScoringError
from scoring_kit.analysis import (
    CANDIDATE_SCHEMA,
    chat_messages,
    export_candidates,
    export_matrix,
    parse_prior_context,
    read_candidates,
    read_chat,
    read_matrix_frame,
    validate_chat_record,
)
from scoring_kit.context.model import Node, render_prior_context
from scoring_kit.scoring import MATRIX_COLUMNS, FinetuneCandidate, MemoryMatrix


def _prior(*turns: tuple[str, str]) -> str:
    """A prior_context exactly as the finetune flow renders it."""
    nodes = []
    for role, text in turns:
        if role == "user":
            nodes.append(Node("user", (1,), text=text))
        else:
            nodes.append(Node("assistant", (1,), children=(Node("text", (1,), text=text),)))
    return render_prior_context(nodes, len(nodes), 2)


@pytest.fixture
def candidates() -> list[FinetuneCandidate]:
    return [
        FinetuneCandidate(
            entry_idx=7,
            divergence=0.123456789012345,
            response_text="Mia and Leo — «two» cats 🐈.\n\nBoth black.",
            prior_context=_prior(
                ("assistant", "Earlier reply."),
                ("user", "Hi!\n\nTwo paragraphs here."),
                ("assistant", "Hello."),
                ("user", "What are the cats called?"),
            ),
            context_ids=tuple(range(40)),
            continuation_ids=(5, 6, 7),
            timestamp_ns=1_718_000_000_123_456_789,
            alternate_text="I don't know.",
            alternate_error=None,
        ),
        FinetuneCandidate(
            entry_idx=12,
            divergence=1.5e-7,
            response_text="Oslo.",
            prior_context=_prior(("user", "Where does Carol live?")),
            context_ids=(),
            continuation_ids=(9,),
            timestamp_ns=(1 << 63) - 1,
            alternate_text=None,
            alternate_error="score API HTTP 503: overloaded",
        ),
        FinetuneCandidate(  # no user turn at all before it
            entry_idx=1,
            divergence=2.0,
            response_text="Good morning.",
            prior_context="",
            context_ids=(3,),
            continuation_ids=(4,),
            timestamp_ns=0,
        ),
    ]


# ── candidates JSONL ─────────────────────────────────────────────


def test_candidates_round_trip_and_schema(
    candidates: list[FinetuneCandidate], tmp_path: Path
) -> None:
    path = tmp_path / "cands.jsonl"
    chat = export_candidates(candidates, path)
    assert chat == tmp_path / "cands.chat.jsonl" and chat.exists()
    assert read_candidates(path) == candidates
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    first = orjson.loads(lines[0])
    assert list(first) == [
        "schema", "entry_idx", "divergence", "timestamp_ns", "response_text",
        "prior_context", "alternate_text", "alternate_error", "context_ids",
        "continuation_ids",
    ]
    assert first["schema"] == CANDIDATE_SCHEMA == "scoring_kit.candidate/1"
    assert first["context_ids"] == list(range(40))
    # an empty export is two empty files that read back as nothing
    c2 = export_candidates([], tmp_path / "none.jsonl")
    assert read_candidates(tmp_path / "none.jsonl") == [] and read_chat(c2) == []


def test_chat_records_validate_and_match(
    candidates: list[FinetuneCandidate], tmp_path: Path
) -> None:
    chat = export_candidates(
        candidates, tmp_path / "c.jsonl", chat_path=tmp_path / "sft" / "train.jsonl",
        system_prompt="You are Kit.",
    )
    assert chat == tmp_path / "sft" / "train.jsonl"
    records = read_chat(chat)
    assert len(records) == len(candidates)
    for rec, cand in zip(records, candidates, strict=True):
        validate_chat_record(rec)
        msgs = rec["messages"]
        assert msgs[0] == {"role": "system", "content": "You are Kit."}
        assert msgs[-1] == {"role": "assistant", "content": cand.response_text}
        roles = [m["role"] for m in msgs[1:]]
        assert all(a != b for a, b in itertools.pairwise(roles)), roles
        if len(roles) > 1:
            assert roles[0] == "user"
    # leading assistant turn dropped; a turn's own blank lines survive
    assert records[0]["messages"][1:] == [
        {"role": "user", "content": "Hi!\n\nTwo paragraphs here."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What are the cats called?"},
        {"role": "assistant", "content": candidates[0].response_text},
    ]
    assert [m["role"] for m in records[2]["messages"]] == ["system", "assistant"]
    # without a system prompt there is no system message
    plain = chat_messages(candidates[1])
    assert plain == [
        {"role": "user", "content": "Where does Carol live?"},
        {"role": "assistant", "content": "Oslo."},
    ]


def test_parse_prior_context_edge_cases() -> None:
    assert parse_prior_context("") == []
    text = "assistant: \n\nuser: a\n\nuser: b\n\nassistant: c\n\nd"
    assert parse_prior_context(text) == [
        ("assistant", ""), ("user", "a"), ("user", "b"), ("assistant", "c\n\nd")
    ]
    cand = FinetuneCandidate(3, 1.0, "x", text + "\n\nassistant: tail", (), (1,), 1)
    # empty turns dropped, same-role turns merged, roles alternate into the response
    assert chat_messages(cand) == [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "x"},
    ]
    with pytest.raises(ExportError, match="empty response_text"):
        chat_messages(FinetuneCandidate(3, 1.0, "  ", "", (), (1,), 1))


def _good() -> dict[str, Any]:
    return {
        "schema": CANDIDATE_SCHEMA, "entry_idx": 4, "divergence": 0.5, "timestamp_ns": 9,
        "response_text": "r", "prior_context": "user: q", "alternate_text": None,
        "alternate_error": None, "context_ids": [1, 2, 3], "continuation_ids": [4],
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema": "scoring_kit.candidate/2"}, "schema"),
        ({"entry_idx": "4"}, "entry_idx"),
        ({"entry_idx": -1}, "entry_idx"),
        ({"divergence": None}, "divergence"),
        ({"divergence": True}, "divergence"),
        ({"timestamp_ns": 1.5}, "timestamp_ns"),
        ({"response_text": 3}, "response_text"),
        ({"alternate_text": ["x"]}, "alternate_text"),
        ({"context_ids": [1, "2", 3]}, "context_ids[1]"),
        ({"continuation_ids": "4"}, "continuation_ids"),
        ({"extra": 1}, "extra"),
        ({"prior_context": ...}, "prior_context"),  # missing
    ],
)
def test_bad_candidate_lines_name_file_line_and_field(
    change: dict[str, Any], field: str, tmp_path: Path
) -> None:
    bad = {**_good(), **change}
    bad = {k: v for k, v in bad.items() if v is not ...}
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        orjson.dumps(_good()) + b"\n\n" + orjson.dumps(bad) + b"\n"  # bad record on line 3
    )
    with pytest.raises(ExportError) as info:
        read_candidates(path)
    assert f"{path}:3" in str(info.value)
    assert f"field {field!r}" in str(info.value)


def test_bad_json_and_bad_chat_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(orjson.dumps(_good()) + b"\n{not json\n")
    with pytest.raises(ExportError, match=rf"{path}:2: not valid JSON"):
        read_candidates(path)
    with pytest.raises(ExportError, match="cannot read"):
        read_candidates(tmp_path / "missing.jsonl")

    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    validate_chat_record(ok)
    cases: list[tuple[Any, str]] = [
        ([], "<record>"),
        ({"messages": [], }, "messages"),
        ({**ok, "id": 3}, "id"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": " "}]}, "messages[1].content"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "messages[1].role"),
        ({"messages": [{"role": "assistant", "content": "a"},
                       {"role": "user", "content": "q"}]}, "messages[1].role"),
        ({"messages": [{"role": "assistant", "content": "a", "name": "x"}]},
         "messages[0].name"),
        ({"messages": ["hi"]}, "messages[0]"),
    ]
    lines = [orjson.dumps(ok)]
    for rec, field in cases:
        with pytest.raises(ExportError, match=rf"line 7: field '{re.escape(field)}'"):
            validate_chat_record(rec, line=7)
        lines.append(orjson.dumps(rec))
    chat = tmp_path / "x.chat.jsonl"
    chat.write_bytes(b"\n".join(lines[:2]))
    with pytest.raises(ExportError, match=rf"{chat}:2: field '<record>'"):
        read_chat(chat)


def test_export_candidates_refuses_to_overwrite_and_bad_values(
    candidates: list[FinetuneCandidate], tmp_path: Path
) -> None:
    path = tmp_path / "c.jsonl"
    export_candidates(candidates, path)
    before = path.read_bytes()
    with pytest.raises(ExportError, match="exists"):
        export_candidates(candidates[:1], path, overwrite=False)
    assert path.read_bytes() == before
    (tmp_path / "d.chat.jsonl").write_text("keep")
    with pytest.raises(ExportError, match=r"d\.chat\.jsonl exists"):
        export_candidates(candidates, tmp_path / "d.jsonl", overwrite=False)
    assert not (tmp_path / "d.jsonl").exists()  # nothing written when either file exists
    nan = FinetuneCandidate(1, float("nan"), "r", "", (), (1,), 1)
    with pytest.raises(ExportError, match=r"candidate 1 .*not finite"):
        export_candidates([candidates[0], nan], tmp_path / "e.jsonl")
    with pytest.raises(ExportError, match="same path"):
        export_candidates(candidates, path, chat_path=path)


# ── matrices ─────────────────────────────────────────────────────


@pytest.fixture
def matrix() -> MemoryMatrix:
    rng = np.random.default_rng(3)
    without = -rng.random((4, 5)) * 3
    without[2] = np.nan
    return MemoryMatrix(
        keys=["self", "cats, \"quoted\"", "age", "oslo\nnewline"],
        entries=np.array([2, 4, 7, 9, 12]),
        baseline=-rng.random(5) * 2,
        without=without,
        errors=[None, None, "timeout, after 30 s", None],
        meta={"model": "test"},
    )


def _expected(matrix: MemoryMatrix) -> pl.DataFrame:
    return matrix.to_frame(texts=True).with_columns(
        pl.col(c).fill_nan(None) for c in ("baseline", "without", "delta", "divergence")
    )


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_matrix_round_trip(matrix: MemoryMatrix, suffix: str, tmp_path: Path) -> None:
    path = export_matrix(matrix, tmp_path / f"m{suffix}")
    frame = read_matrix_frame(path)
    assert frame.columns == [*MATRIX_COLUMNS, "memory_text", "response_text"]
    assert frame.equals(_expected(matrix), null_equal=True)
    failed = frame.filter(pl.col("error").is_not_null())
    assert failed.height == 5 and failed["divergence"].is_null().all()
    with pytest.raises(ExportError, match="exists"):
        export_matrix(matrix, path, overwrite=False)


def test_matrix_csv_and_parquet_details(matrix: MemoryMatrix, tmp_path: Path) -> None:
    csv = export_matrix(matrix, tmp_path / "m.csv")
    text = csv.read_text()
    assert "NaN" not in text
    row = next(line for line in text.splitlines() if line.startswith("age,2,"))
    assert row.endswith(',,,,"timeout, after 30 s","",""')  # empty without/delta/divergence
    pq = export_matrix(matrix, tmp_path / "m.parquet")
    back = MemoryMatrix.load(pq)  # lossless: the matrix's own parquet format
    np.testing.assert_array_equal(back.without, matrix.without)
    assert back.errors == matrix.errors and back.keys == matrix.keys
    upper = export_matrix(matrix, tmp_path / "M.PARQUET")
    assert read_matrix_frame(upper).equals(_expected(matrix), null_equal=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.PARQUET", "m.csv", "m.parquet"]
    with pytest.raises(ExportError, match=r"\.csv, \.npz, \.parquet"):
        export_matrix(matrix, tmp_path / "m.xlsx")
    bad = tmp_path / "bad.csv"
    bad.write_text("memory_key,entry_index\na,1\n")
    with pytest.raises(ExportError, match=r"bad\.csv.*missing column\(s\) baseline"):
        read_matrix_frame(bad)
    worse = tmp_path / "worse.csv"
    worse.write_text(",".join(MATRIX_COLUMNS) + "\na,x,1,1,1,1,\n")
    with pytest.raises(ExportError, match=r"worse\.csv"):
        read_matrix_frame(worse)


def test_matrix_texts_round_trip_every_format(tmp_path: Path) -> None:
    m = MemoryMatrix(
        ["pet", "city"], np.array([1, 3]), np.array([-1.0, -2.0]),
        np.array([[-1.5, -2.5], [np.nan, np.nan]]), [None, "boom (status 500)"],
        method="windowed", approximate=True, meta={"window": 2},
        memory_texts=["Mia has two cats, \"quoted\"", "lives in\nOslo"],
        response_texts=["Two cats.", "Oslo — «yes» 🐈"],
    )
    assert isinstance(m.keys, tuple) and isinstance(m.memory_texts, tuple)
    for suffix in (".npz", ".parquet", ".csv"):
        back = MemoryMatrix.load(m.save(tmp_path / f"m{suffix}"))
        assert back.keys == m.keys and back.errors == m.errors
        assert back.memory_texts == m.memory_texts
        assert back.response_texts == m.response_texts
        np.testing.assert_array_equal(back.without, m.without)
        np.testing.assert_array_equal(back.baseline, m.baseline)
        np.testing.assert_array_equal(back.entries, m.entries)
        lossless = suffix != ".csv"  # a csv holds the frame, not method/meta
        assert (back.method, back.approximate, dict(back.meta)) == (
            ("windowed", True, {"window": 2}) if lossless else ("loo", False, {}))
        frame = read_matrix_frame(tmp_path / f"m{suffix}")
        assert frame["memory_text"].to_list() == [m.memory_texts[0]] * 2 + [
            m.memory_texts[1]] * 2
        assert frame["response_text"].to_list() == list(m.response_texts) * 2
    pq = pl.read_parquet(tmp_path / "m.parquet")
    assert pq.columns[-2:] == ["memory_text", "response_text"]
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        m.save(tmp_path / "m.npz")  # every writer refuses to replace by default
    with pytest.raises(ScoringError, match="memory_texts has 1 entries for 2 memories"):
        MemoryMatrix(m.keys, m.entries, m.baseline, m.without, m.errors, memory_texts=["x"])


def test_matrix_written_before_the_text_fields_loads_with_empty_texts(
    matrix: MemoryMatrix, tmp_path: Path
) -> None:
    header = {"keys": list(matrix.keys), "errors": list(matrix.errors), "method": "loo",
              "approximate": False, "meta": {}, "baseline": matrix.baseline.tolist(),
              "entries": matrix.entries.tolist()}
    old = tmp_path / "old.parquet"
    matrix.to_frame().write_parquet(old, metadata={"scoring_kit.matrix": orjson.dumps(
        header).decode()})
    back = MemoryMatrix.load(old)
    assert back.memory_texts == ("",) * 4 and back.response_texts == ("",) * 5
    np.testing.assert_array_equal(back.without, matrix.without)
    assert read_matrix_frame(old)["memory_text"].to_list() == [""] * 20
    old_csv = tmp_path / "old.csv"
    matrix.to_frame().write_csv(old_csv)
    assert MemoryMatrix.load(old_csv).memory_texts == ("",) * 4


def test_matrix_is_frozen(matrix: MemoryMatrix) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        matrix.keys = ("x",)  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        matrix.without[0, 0] = 1.0
    source = np.zeros((1, 1))
    MemoryMatrix(["a"], np.array([0]), np.zeros(1), source, [None])
    source[0, 0] = 2.0  # the matrix copied it; the caller's array stays writable
