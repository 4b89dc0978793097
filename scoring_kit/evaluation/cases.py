"""Memory-attribution cases built from LoCoMo (real conversations with gold evidence).

LoCoMo (Maharana et al., ACL 2024; CC BY-NC 4.0) holds ten long conversations. Each session
comes with *observations*: short facts about a speaker, each tied to the dialogue turn
(``dia_id``, ``"D<session>:<turn>"``) it came from. Its QA pairs name their *evidence*
turns. That gives a ground truth for memory attribution:

* every observation becomes a **memory** keyed by its ``dia_id`` (several facts from the
  same turn are joined into one memory; a fact tied to several turns joins each of them),
  prefixed with the date of its session, ``"(8 May 2023) Caroline attended ..."``, because
  the temporal questions (category 2) are answered relative to that date;
* a QA pair of an accepted category whose evidence is **exactly one** turn that has an
  observation becomes a **case**: a system prompt, ``K`` memories (the gold one plus
  ``K - 1`` distractors drawn from the same conversation, shuffled), the question as the user
  message and the gold answer (``str(answer)``) as the assistant response.

A good attribution method ranks the gold memory first for the response.

Eligible QA pairs in ``locomo10.json`` (categories 1-3): category 1 (multi-hop) 3,
category 2 (temporal) 249, category 3 (open-domain / commonsense) 30. Selection is
stratified: a seeded shuffle per category, then round-robin across categories, so small
categories are represented instead of drowned out by the temporal questions. The first ``n``
cases of a seed are a prefix of the first ``n + 1``, and each case's distractors and order
depend only on ``(seed, case)``, so a smaller run is a subset of a larger one.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .. import _settings
from .._exceptions import ContextError
from .._settings import LOCOMO_ENV
from .._types import PathLike

if TYPE_CHECKING:
    from ..context.model import ContextState
    from ..context.tokenizer import Tokenizer

__all__ = [
    "CATEGORY_NAMES",
    "DEFAULT_SYSTEM_PROMPT",
    "LOCOMO_ENV",
    "Case",
    "build_cases",
    "default_locomo_path",
    "load_locomo",
    "locomo_memories",
]

#: LoCoMo's QA categories (as used by its evaluation code).
CATEGORY_NAMES: Mapping[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}

#: System prompt of every case; ``{a}`` and ``{b}`` are the two speakers.
DEFAULT_SYSTEM_PROMPT = (
    "You are an assistant with a long-term memory of the conversations between {a} and {b}. "
    "The memories below are facts from past sessions, each with the date it was recorded. "
    "Answer the user's question briefly, using the memories."
)

_DIA_ID = re.compile(r"D\d+:\d+")
_SESSION_DATE = re.compile(r"(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})")


def default_locomo_path() -> Path:
    """Where LoCoMo data is looked for when no path is given.

    ``$SCORING_KIT_LOCOMO`` if set; else the derived copy committed with the repository,
    ``<repo>/data/locomo/locomo10_memories.json`` (memory fields of all 10 conversations: the
    same cases as the full file); else ``<repo>/../shared/data/locomo/locomo10.json``. The
    repository root is the folder holding the ``scoring_kit`` package. When none exists the
    committed path is returned, so the error names it.
    """
    env = _settings.locomo_path()
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    bundled = repo_root / "data" / "locomo" / "locomo10_memories.json"
    shared = repo_root.parent / "shared" / "data" / "locomo" / "locomo10.json"
    return next((p for p in (bundled, shared) if p.is_file()), bundled)


def load_locomo(path: PathLike | None = None) -> list[dict[str, Any]]:
    """Read the LoCoMo JSON (a list of conversations).

    Raises
    ------
    ContextError
        The file is missing (the message says where it was looked for and how to point
        elsewhere), unreadable, not JSON, or not a list of conversations.
    """
    p = Path(path) if path is not None else default_locomo_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        msg = (
            "LoCoMo data not found; pass path=..., set "
            f"${LOCOMO_ENV}, or put locomo10.json (snap-research/LoCoMo, data/locomo10.json) "
            "there"
        )
        raise ContextError(msg, path=str(p)) from None
    except OSError as exc:
        raise ContextError(f"cannot read LoCoMo data: {exc}", path=str(p)) from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContextError(f"not valid JSON: {exc}", path=str(p)) from None
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        msg = f"expected a JSON list of conversations, got {type(data).__name__}"
        raise ContextError(msg, path=str(p))
    for i, conv in enumerate(data):
        for fld in ("conversation", "observation", "qa"):
            if fld not in conv:
                msg = f"conversation {i} has no {fld!r}: not a LoCoMo file"
                raise ContextError(msg, path=str(p), field=fld)
    return data


@dataclass(frozen=True, slots=True)
class Case:
    """One attribution case: K memories, one question, one gold answer, one gold memory.

    Attributes
    ----------
    id
        ``"<sample_id>/q<index>"``: the conversation and the QA pair's index in it.
    category
        LoCoMo QA category (see :data:`CATEGORY_NAMES`).
    question, answer
        The user question and the gold answer (the assistant response that is scored).
    memories
        ``(key, text)`` pairs in prompt order; keys are LoCoMo ``dia_id`` s.
    gold_key
        The key of the memory the answer depends on (the QA pair's evidence).
    messages
        Plain messages for :func:`scoring_kit.context.io.context_from_messages`.
    """

    id: str
    category: int
    question: str
    answer: str
    memories: tuple[tuple[str, str], ...]
    gold_key: str
    messages: tuple[Mapping[str, str], ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """Memory keys in prompt order."""
        return tuple(k for k, _ in self.memories)

    @property
    def gold_index(self) -> int:
        """Position of the gold memory among :attr:`memories`."""
        return self.keys.index(self.gold_key)

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES.get(self.category, str(self.category))

    def context(self, tokenizer: Tokenizer, **render: Any) -> ContextState:
        """The case as a tokenized :class:`~scoring_kit.context.model.ContextState`.

        ``render``: ``chat_template``, ``memory_placement``, ``score_span`` (see
        :func:`~scoring_kit.context.io.context_from_messages`).
        """
        from ..context.io import context_from_messages

        return context_from_messages(self.messages, tokenizer, **render)


def _dia_ids(value: object) -> list[str]:
    """Turn ids in a LoCoMo id field (a string, a list, or a ``"D1:2, D1:4"`` string)."""
    if isinstance(value, str):
        return _DIA_ID.findall(value)
    if isinstance(value, list):
        return [d for v in value for d in _dia_ids(v)]
    return []


def _session_date(conversation: Mapping[str, Any], session: int) -> str | None:
    raw = conversation.get(f"session_{session}_date_time")
    if not isinstance(raw, str):
        return None
    m = _SESSION_DATE.search(raw)
    return f"{m.group(1)} {m.group(2)} {m.group(3)}" if m else raw.strip() or None


def locomo_memories(
    conv: Mapping[str, Any], *, with_dates: bool = True
) -> dict[str, tuple[str, frozenset[str]]]:
    """The memories of one LoCoMo conversation: ``{dia_id: (text, facts)}``.

    ``facts`` is the set of observation sentences the memory holds (used to keep distractors
    that share a fact with the gold memory out of a case). Order: first-seen.
    """
    facts: dict[str, list[str]] = {}
    observation = conv.get("observation") or {}
    for sess_key in observation:
        per_speaker = observation[sess_key]
        if not isinstance(per_speaker, dict):
            continue
        for items in per_speaker.values():
            for item in items if isinstance(items, list) else ():
                if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                    continue
                fact = item[0].strip()
                if not fact:
                    continue
                for dia in _dia_ids(item[1]):
                    lst = facts.setdefault(dia, [])
                    if fact not in lst:
                        lst.append(fact)
    conversation = conv.get("conversation") or {}
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for dia, fs in facts.items():
        text = " ".join(fs)
        if with_dates:
            session = int(dia[1:].split(":", 1)[0])
            date = _session_date(conversation, session)
            if date:
                text = f"({date}) {text}"
        out[dia] = (text, frozenset(fs))
    return out


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def _stratified(
    pools: Mapping[int, list[int]], order: Sequence[int], n: int
) -> list[tuple[int, int]]:
    """Round-robin over categories (in ``order``), each pool already shuffled."""
    picked: list[tuple[int, int]] = []
    pos = dict.fromkeys(order, 0)
    while len(picked) < n:
        progressed = False
        for cat in order:
            if len(picked) >= n:
                break
            if pos[cat] < len(pools[cat]):
                picked.append((cat, pools[cat][pos[cat]]))
                pos[cat] += 1
                progressed = True
        if not progressed:
            break
    return picked


def build_cases(
    path: PathLike | None = None,
    *,
    n_cases: int | None = 20,
    memories_per_case: int = 6,
    seed: int = 0,
    categories: Iterable[int] = (1, 2, 3),
    with_dates: bool = True,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[Case]:
    """Build memory-attribution cases from LoCoMo.

    Parameters
    ----------
    path
        ``locomo10.json``; default :func:`default_locomo_path`.
    n_cases
        How many cases (``None``: every eligible QA pair).
    memories_per_case
        ``K``: the gold memory plus ``K - 1`` distractors from the same conversation.
    seed
        Seeds the selection, the distractors and the memory order (fully reproducible).
    categories
        LoCoMo QA categories to draw from (see :data:`CATEGORY_NAMES`).
    with_dates
        Prefix each memory with the date of its session (needed to answer the temporal
        questions from the memory).
    system_prompt
        The system message; ``{a}`` / ``{b}`` become the two speakers' names.

    Returns
    -------
    list[Case]
        Stratified by category (round-robin over seeded per-category shuffles).

    Raises
    ------
    ContextError
        The file is missing or malformed, ``memories_per_case < 1`` or ``n_cases`` is larger
        than the number of eligible QA pairs (the message gives the count).
    """
    if memories_per_case < 1:
        msg = f"memories_per_case must be at least 1 (the gold memory), got {memories_per_case}"
        raise ContextError(msg, field="memories_per_case")
    if n_cases is not None and n_cases < 0:
        raise ContextError(f"n_cases must be >= 0, got {n_cases}", field="n_cases")
    cats = tuple(dict.fromkeys(int(c) for c in categories))
    data = load_locomo(path)
    where = str(Path(path) if path is not None else default_locomo_path())

    # (conversation index, qa index) of every eligible QA pair, per category
    eligible: dict[int, list[tuple[int, int]]] = {c: [] for c in cats}
    memories: list[dict[str, tuple[str, frozenset[str]]]] = []
    for ci, conv in enumerate(data):
        mems = locomo_memories(conv, with_dates=with_dates)
        memories.append(mems)
        for qi, qa in enumerate(conv.get("qa") or ()):
            cat = qa.get("category")
            if cat not in eligible or "answer" not in qa:
                continue
            ev = list(dict.fromkeys(_dia_ids(qa.get("evidence") or [])))
            if len(ev) != 1 or ev[0] not in mems:
                continue
            answer = str(qa["answer"]).strip()
            question = str(qa.get("question", "")).strip()
            if not answer or not question:
                continue
            # enough distractors that share no fact with the gold memory
            gold_facts = mems[ev[0]][1]
            n_free = sum(1 for k, (_, f) in mems.items() if k != ev[0] and not f & gold_facts)
            if n_free < memories_per_case - 1:
                continue
            eligible[cat].append((ci, qi))

    total = sum(len(v) for v in eligible.values())
    n = total if n_cases is None else n_cases
    if n > total:
        counts = ", ".join(f"category {c}: {len(v)}" for c, v in eligible.items())
        msg = (
            f"asked for {n} cases but only {total} QA pairs are eligible ({counts}; "
            f"{memories_per_case} memories per case)"
        )
        raise ContextError(msg, path=where, field="n_cases")

    rng = np.random.default_rng(seed)
    pools: dict[int, list[int]] = {}
    for c in cats:
        pools[c] = rng.permutation(len(eligible[c])).tolist()
    picked = _stratified(pools, cats, n)

    cases: list[Case] = []
    for cat, j in picked:
        ci, qi = eligible[cat][j]
        conv = data[ci]
        qa = conv["qa"][qi]
        sample_id = str(conv.get("sample_id", f"conv-{ci}"))
        case_id = f"{sample_id}/q{qi}"
        mems = memories[ci]
        gold = _dia_ids(qa["evidence"])[0]
        gold_facts = mems[gold][1]
        pool = [k for k, (_, f) in mems.items() if k != gold and not f & gold_facts]
        crng = _case_rng(seed, case_id)
        distractors = [pool[i] for i in crng.choice(len(pool), memories_per_case - 1,
                                                    replace=False)]
        keys = [gold, *distractors]
        keys = [keys[i] for i in crng.permutation(len(keys))]
        chosen = tuple((k, mems[k][0]) for k in keys)
        speakers = conv.get("conversation") or {}
        system = system_prompt.format(
            a=speakers.get("speaker_a", "speaker A"), b=speakers.get("speaker_b", "speaker B")
        )
        question = str(qa["question"]).strip()
        answer = str(qa["answer"]).strip()
        messages: list[Mapping[str, str]] = [{"role": "system", "content": system}]
        messages += [{"role": "memory", "key": k, "content": t} for k, t in chosen]
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        cases.append(
            Case(
                id=case_id,
                category=int(cat),
                question=question,
                answer=answer,
                memories=chosen,
                gold_key=gold,
                messages=tuple(messages),
            )
        )
    return cases
