"""A lexical screen for long-range memory use: which responses restate which memories.

A response that repeats a memory's content (names, places, numbers) usually leans on it —
the model copies from the context — and it may do so far after the memory, where a short
ablation window never looks. This screen is text only (no forward pass): for memory ``i``
and response ``j`` it is the share of the memory's content words that also occur in the
response, each word weighted by its inverse document frequency over the context's nodes,
so that words every node shares (``the``, ``and``, the speakers' names) count for little
and rare ones for much. The windowed approximate matrix uses it to extend a memory's window
through the responses that restate it (:func:`~scoring_kit.scoring.approx.ascore_memories_windowed`,
``restated=``).

Words are runs of Unicode word characters of at least :data:`MIN_WORD_LENGTH`, lower-cased;
no language-specific stop list is needed, the IDF weights do that work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from .._types import FloatArray
from ..context.model import ContextState, is_assistant, memory_key, visible_text

__all__ = ["MIN_WORD_LENGTH", "content_words", "restatement", "restatement_matrix"]

#: Shorter words ("a", "is", "I") are ignored.
MIN_WORD_LENGTH = 3

_WORD = re.compile(r"\w+")


def content_words(text: str, *, min_length: int = MIN_WORD_LENGTH) -> frozenset[str]:
    """The distinct lower-cased words of ``text`` of at least ``min_length`` characters."""
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) >= min_length)


def restatement(
    memories: Sequence[str], responses: Sequence[str], corpus: Iterable[str] = ()
) -> FloatArray:
    """``(N, M)`` shares in [0, 1]: how much of memory ``i``'s content response ``j`` restates.

    Cell ``(i, j)`` is ``sum(idf(w) for w in words(i) & words(j)) / sum(idf(w) for w in
    words(i))`` with ``idf(w) = ln((1 + D) / (1 + df(w)))`` over the ``D`` documents of
    ``corpus`` plus the memories and responses themselves. A memory with no weighted word
    (empty, or only words every document has) restates nowhere: its row is 0.
    """
    mem_words = [content_words(t) for t in memories]
    resp_words = [content_words(t) for t in responses]
    docs = [content_words(t) for t in corpus] + mem_words + resp_words
    vocab = sorted(set().union(*mem_words)) if mem_words else []
    out = np.zeros((len(memories), len(responses)), dtype=np.float64)
    if not vocab or not responses:
        return out
    index = {w: v for v, w in enumerate(vocab)}
    df = np.zeros(len(vocab), dtype=np.float64)
    for d in docs:
        for w in d:
            v = index.get(w)
            if v is not None:
                df[v] += 1
    idf = np.log((1.0 + len(docs)) / (1.0 + df))
    mem = _indicator(mem_words, index)
    resp = _indicator(resp_words, index)
    weighted = mem * idf
    total = weighted.sum(axis=1, keepdims=True)
    shared = weighted @ resp.T
    np.divide(shared, total, out=out, where=total > 0)
    return out


def _indicator(words: Sequence[frozenset[str]], index: dict[str, int]) -> FloatArray:
    rows = np.zeros((len(words), len(index)), dtype=np.float64)
    for r, ws in enumerate(words):
        cols = [index[w] for w in ws if w in index]
        rows[r, cols] = 1.0
    return rows


def restatement_matrix(ctx: ContextState, keys: Sequence[str]) -> tuple[FloatArray, list[int]]:
    """:func:`restatement` of memories ``keys`` against every assistant response of ``ctx``.

    Returns the ``(len(keys), M)`` shares and the conversation index of each response column.
    A memory held by several nodes is their texts joined; the IDF corpus is every node of
    the identity, journal and conversation sections.
    """
    texts: dict[str, list[str]] = {k: [] for k in keys}
    corpus: list[str] = []
    for sec in ("identity", "journal", "conversation"):
        for n in ctx.section(sec):
            k = memory_key(n)
            if k is not None and k in texts:
                texts[k].append(n.text)
            elif not (sec == "conversation" and is_assistant(n)):
                corpus.append(visible_text(n))  # memories and responses are added by restatement
    columns = [i for i, n in enumerate(ctx.conversation) if is_assistant(n)]
    responses = [visible_text(ctx.conversation[i]) for i in columns]
    return restatement(["\n".join(texts[k]) for k in keys], responses, corpus), columns
