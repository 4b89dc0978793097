"""What llama-cpp-python's OpenAI server (0.3.x) does to an ``echo`` + ``logprobs`` answer,
and how the ``echo`` backend undoes it (pure functions; the requests are in ``echo.py``).

Read from ``llama_cpp/llama.py`` (``Llama._create_completion``, 0.3.36) and checked against
the server (``tests/fixtures/llama_*.json``, ``scripts/refresh_fixtures.py --llama-url``):

* ``prompt`` is text only. A list of ids fails FastAPI's schema and llama-cpp-python's error
  handler answers **500** (not 422) ``{"error": {"message": "N validation errors: ...
  'loc': ('body', 'prompt', 'str'), 'msg': 'Input should be a valid string' ...",
  "type": "internal_server_error"}}``: :func:`refuses_id_prompt`.
* Text is tokenized with ``special=True`` (``<|im_start|>`` is one token) and without an
  added BOS when the GGUF says ``add_bos_token: false``; its tokenizer is
  ``POST /extras/tokenize {"input": text} -> {"tokens": [...]}`` (``/tokenize`` is 404).
* The echoed ``token_logprobs`` do not follow the OpenAI layout. The first prompt token is
  dropped when it is the model's BOS, so entry ``j`` stands for position ``j + 1``; every
  later token equal to BOS is left out; entry 0 is then set to ``null`` (its value is lost).
  A prompt that does not start with BOS is paired off by one (each token read from the row
  that predicts the next one): unusable. For SmolLM2 BOS is ``<|im_start|>``, so the
  position opening every ChatML turn is left out: :func:`echo_positions`.
* The log-probability of a left-out BOS at position ``t`` is found with two plain
  (non-echo) requests on the prompt's first ``t`` tokens, ``max_tokens: 1, temperature: 0,
  logprobs: 1``: without bias the server must generate BOS (``completion_tokens: 1`` and no
  logprob entry: BOS is the most likely token there); with every special token biased by
  -100 it generates a plain token and reports the unbiased top-1, BOS, under the key ``""``
  of ``top_logprobs[0]`` (special tokens are detokenized to ``""``): :func:`bos_logprob`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._util import logprob_value

__all__ = ["bos_logprob", "echo_positions", "is_bos_argmax", "refuses_id_prompt"]


def refuses_id_prompt(status: int | None, message: str) -> bool:
    """Whether an error answer to an id prompt says "send text": any 422, or
    llama-cpp-python's 500 that is its schema refusing a non-string ``prompt``.

    Any other 500 (a real server failure) is not a refusal and is raised as it is.
    """
    if status == 422:
        return True
    return (
        status == 500
        and "validation error" in message
        and "'prompt'" in message
        and "Input should be a valid string" in message
    )


def echo_positions(prompt: Sequence[int]) -> list[int]:
    """The prompt positions llama-cpp-python's echoed ``token_logprobs`` stand for, in order
    (the prompt must start with BOS, ``prompt[0]``): every ``t >= 1`` whose token is not BOS.

    Entry 0 of the answer (position ``echo_positions(p)[0]``) is ``null``.

    >>> echo_positions([1, 5, 6, 1, 7])
    [1, 2, 4]
    """
    bos = prompt[0]
    return [t for t in range(1, len(prompt)) if prompt[t] != bos]


def _logprobs(data: Any) -> tuple[Mapping[str, Any] | None, Mapping[str, Any]]:
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None, {}
    lp = choice.get("logprobs") if isinstance(choice, Mapping) else None
    usage = data.get("usage") if isinstance(data, Mapping) else None
    return (lp if isinstance(lp, Mapping) else None), (
        usage if isinstance(usage, Mapping) else {}
    )


def is_bos_argmax(data: Any, n_prompt: int) -> bool:
    """The unbiased answer: one token generated (BOS) and, BOS being left out, no entry."""
    lp, usage = _logprobs(data)
    return (
        lp is not None
        and lp.get("token_logprobs") == []
        and usage.get("completion_tokens") == 1
        and usage.get("prompt_tokens") == n_prompt
    )


def bos_logprob(data: Any, n_prompt: int) -> float | None:
    """``top_logprobs[0][""]`` of the biased answer (a plain token generated, so the key
    ``""`` is the unbiased top-1, BOS), or ``None`` when the answer is not that shape."""
    lp, usage = _logprobs(data)
    if lp is None or usage.get("prompt_tokens") != n_prompt:
        return None
    tokens, top = lp.get("tokens"), lp.get("top_logprobs")
    if not (isinstance(tokens, list) and len(tokens) == 1 and tokens[0] != ""):
        return None
    if not (isinstance(top, list) and len(top) == 1 and isinstance(top[0], Mapping)):
        return None
    return logprob_value(top[0].get("")) if "" in top[0] else None
