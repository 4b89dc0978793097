"""Wire records: what crosses a process boundary to a scorer, and its one validation.

The lowest layer of the package (it imports nothing of scoring_kit but the error tree and
the shared types): the context model builds :class:`ScoreRequest` objects, backends send
them, the embedded server parses them back and the engine scores them. Each process
boundary validates a request once, with :func:`validate_score_request`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._exceptions import PromptError
from ._types import Span

__all__ = [
    "DEFAULT_PRIORITY",
    "VLLM_NEG_INF",
    "CompletionRequest",
    "ScoreRequest",
    "WireImage",
    "validate_score_request",
]

#: vLLM's stand-in for ``-inf`` in prompt logprobs (``clamp_prompt_logprobs``); the embedded
#: server sends it in the vLLM-shaped answers and the vLLM backend reads it back as ``-inf``.
VLLM_NEG_INF = -9999.0

#: The reference client scores at priority 5 (lower is served first).
DEFAULT_PRIORITY = 5


@dataclass(frozen=True, slots=True)
class WireImage:
    """An image attached to a prompt, sent as a ``data:`` URI."""

    mime: str
    data: bytes

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Token ids plus the spans whose total log-probability is wanted."""

    prompt: tuple[int, ...]
    ranges: tuple[Span, ...]
    images: tuple[WireImage, ...] = ()
    priority: int | None = DEFAULT_PRIORITY

    @classmethod
    def build(
        cls,
        prompt: Sequence[int] | np.ndarray,
        ranges: Sequence[Sequence[int]],
        *,
        images: Sequence[WireImage] = (),
        priority: int | None = DEFAULT_PRIORITY,
    ) -> ScoreRequest:
        return cls(
            tuple(int(t) for t in prompt),
            tuple((int(a), int(b)) for a, b in ranges),
            tuple(images),
            priority,
        )

    def body(self, model: str) -> dict[str, object]:
        """The seed's ``/score`` JSON body for this request."""
        out: dict[str, object] = {
            "model": model,
            "prompt": list(self.prompt),
            "score_ranges": [list(r) for r in self.ranges],
            "logprobs": 1,
        }
        if self.images:
            out["multi_modal_data"] = {"image": [im.data_uri() for im in self.images]}
        if self.priority is not None:
            out["priority"] = self.priority
        return out


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A token-id prompt to continue (used for finetune *alternates*)."""

    prompt: tuple[int, ...]
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 20
    stop_token_ids: tuple[int, ...] = ()
    priority: int | None = DEFAULT_PRIORITY
    seed: int | None = None


def validate_score_request(
    prompt: Sequence[int] | np.ndarray,
    ranges: Sequence[Sequence[int]],
    *,
    vocab_size: int | None = None,
    max_len: int | None = None,
) -> None:
    """Check a prompt and its spans; raise :class:`PromptError` naming limit and value.

    Rules: non-empty prompt; ``len(prompt) <= max_len``; every id in ``[0, vocab_size)``;
    each span ``1 <= start < end <= len(prompt)``; spans sorted and not overlapping.
    """
    n = len(prompt)
    if n == 0:
        raise PromptError("prompt is empty: at least 2 tokens are needed to score a span")
    if max_len is not None and n > max_len:
        raise PromptError(
            f"prompt has {n} tokens, longer than the model's context of {max_len} tokens"
        )
    if vocab_size is not None and n:
        arr = np.asarray(prompt)
        if arr.dtype.kind not in "iu":
            raise PromptError(f"prompt must be a list of integer token ids, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            i = int(bad[0])
            raise PromptError(
                f"token id {int(arr[i])} at prompt position {i} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    prev_end = 0
    for k, r in enumerate(ranges):
        if len(r) != 2:
            raise PromptError(f"score range {k} must be [start, end], got {list(r)!r}")
        a, b = int(r[0]), int(r[1])
        if a < 1:
            raise PromptError(
                f"score range {k} [{a}, {b}) starts at {a}: position 0 has no prediction, "
                "so a span must start at 1 or later"
            )
        if b <= a:
            raise PromptError(f"score range {k} [{a}, {b}) is empty: end must be > start")
        if b > n:
            raise PromptError(
                f"score range {k} [{a}, {b}) ends past the prompt: end {b} > prompt length {n}"
            )
        if a < prev_end:
            raise PromptError(
                f"score range {k} [{a}, {b}) overlaps or precedes the previous range, "
                f"which ends at {prev_end}: ranges must be sorted and disjoint"
            )
        prev_end = b
