"""Request bodies parsed into small frozen records, one per endpoint.

Each ``*.parse(body, limits)`` checks the JSON *types and shapes* of one endpoint's body (and
the limits the model fixes without running it: vocabulary, context length) and returns a
frozen record, or raises :class:`~scoring_kit.server._http.RequestError` (``400``) whose
message names the field (``requests[2].score_ranges[0]``), what it must be, and what came.
Nothing here touches an engine or a tokenizer, so every parser is testable without a model.

Whether a score request's spans are valid is *not* checked here: the engine checks every
request it scores with :func:`~scoring_kit.wire.validate_score_request`, once per request in
the server process, and the server answers its :class:`~scoring_kit.PromptError` with ``400``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._types import Span
from ._fields import (
    MISSING,
    RequestError,
    bool_field,
    check_vocab,
    field,
    float_field,
    int_field,
    object_field,
    ranges_field,
    show,
    token_list,
    tokens_field,
    type_name,
    wrong_type,
)

__all__ = [
    "GENERATE_SAMPLING_KEYS",
    "MAX_PROMPT_LOGPROBS",
    "BadItem",
    "BatchParams",
    "CompletionParams",
    "DetokenizeParams",
    "GenerateParams",
    "ModelLimits",
    "ScoreParams",
    "TokenizeParams",
    "TrainParams",
    "check_prompt_ids",
]

#: Largest top-k for ``prompt_logprobs`` / ``top_logprobs_num`` (like vLLM ``--max-logprobs``).
MAX_PROMPT_LOGPROBS = 0

#: The ``sampling_params`` keys ``/generate`` accepts.
GENERATE_SAMPLING_KEYS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_token_ids",
    "skip_special_tokens",
    "sampling_seed",
)


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What the parsers need to know about the served model (no model needed)."""

    name: str
    vocab_size: int
    max_len: int


def _model(body: Mapping[str, Any]) -> None:
    # Any model name is accepted (clients are configured with their own names), but it must
    # be a string when given.
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise wrong_type("model", "a string", model)


def _priority(body: Mapping[str, Any]) -> int:
    value: int = int_field(body, "priority", default=0, nullable=True) or 0
    return value


def _no_images(body: Mapping[str, Any], where: str, limits: ModelLimits) -> None:
    mm = body.get("multi_modal_data")
    if mm is None:
        return
    if not isinstance(mm, dict):
        raise wrong_type(where + "multi_modal_data", "an object", mm)
    count = 0
    for value in mm.values():
        if isinstance(value, list):
            count += len(value)
        elif value is not None:
            count += 1
    if count:
        kinds = ", ".join(sorted(str(k) for k in mm))
        raise RequestError(
            400,
            f"model {limits.name} is text-only and cannot use images: `{where}multi_modal_data`"
            f" carries {count} item(s) ({kinds}); the limit is 0 — send the prompt "
            "without multi_modal_data",
        )


def check_prompt_ids(
    ids: Sequence[int], field: str, extra: int, extra_name: str, limits: ModelLimits
) -> None:
    """A generation prompt: not empty, in the vocabulary, and room for ``extra`` tokens."""
    if not ids:
        raise RequestError(400, f"`{field}` is empty: at least 1 token is needed")
    check_vocab(ids, field, limits.vocab_size)
    if len(ids) + extra > limits.max_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {limits.max_len} tokens. However, you "
            f"requested {len(ids) + extra} tokens ({len(ids)} in the prompt, {extra} in "
            f"{extra_name}). Please reduce the length of the prompt or {extra_name}.",
        )


def _no_stream(body: Mapping[str, Any]) -> None:
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported (`stream` must be false)")


# --------------------------------------------------------------------------- /score


@dataclass(frozen=True, slots=True)
class ScoreParams:
    """``POST /score``: a prompt's token ids and the spans to score."""

    prompt: tuple[int, ...]
    ranges: tuple[Span, ...]
    priority: int = 0

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> ScoreParams:
        _model(body)
        priority = _priority(body)
        prompt, ranges = _score_fields(body, "", limits)
        return cls(prompt, ranges, priority)


def _score_fields(
    body: Mapping[str, Any], where: str, limits: ModelLimits
) -> tuple[tuple[int, ...], tuple[Span, ...]]:
    prompt = tokens_field(body, "prompt", where=where)
    ranges = ranges_field(body, where)
    lp = body.get("logprobs")
    if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool)):
        raise wrong_type(where + "logprobs", "an integer", lp)
    _no_images(body, where, limits)
    return prompt, ranges


@dataclass(frozen=True, slots=True)
class BadItem:
    """A ``/score/batch`` item that could not be parsed; ``message`` names the field."""

    message: str


@dataclass(frozen=True, slots=True)
class BatchParams:
    """``POST /score/batch``: one :class:`ScoreParams` (or :class:`BadItem`) per request."""

    requests: tuple[ScoreParams | BadItem, ...]
    priority: int = 0

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> BatchParams:
        _model(body)
        priority = _priority(body)
        reqs = field(body, "requests", "", MISSING)
        if not isinstance(reqs, list):
            raise wrong_type("requests", "an array of score requests", reqs)
        items: list[ScoreParams | BadItem] = []
        for i, item in enumerate(reqs):
            try:
                if not isinstance(item, dict):
                    raise wrong_type(f"requests[{i}]", "an object", item)
                prompt, ranges = _score_fields(item, f"requests[{i}].", limits)
            except RequestError as exc:
                items.append(BadItem(exc.message))
                continue
            items.append(ScoreParams(prompt, ranges, priority))
        return cls(tuple(items), priority)


# --------------------------------------------------------------------------- /completions


@dataclass(frozen=True, slots=True)
class CompletionParams:
    """``POST /completions``: a prompt (token ids, or a string to encode) and sampling."""

    prompt: tuple[int, ...] | str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_token_ids: tuple[int, ...]
    skip_special_tokens: bool
    seed: int | None
    #: ``None``: no ``prompt_logprobs`` in the answer; ``0``: each prompt token's own logprob.
    prompt_logprobs: int | None
    priority: int = 0

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> CompletionParams:
        _model(body)
        priority = _priority(body)
        prompt = _completion_prompt(field(body, "prompt", "", MISSING))
        max_tokens: int | None = int_field(body, "max_tokens", default=16, nullable=True)
        if max_tokens is None:
            max_tokens = 16
        if max_tokens < 1:
            raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}")
        temperature = float_field(body, "temperature", default=1.0, lo=0.0)
        top_p = float_field(body, "top_p", default=1.0, lo=0.0, hi=1.0, lo_open=True)
        top_k: int = int_field(body, "top_k", default=-1, minimum=-1)
        stop_ids: tuple[int, ...] = tokens_field(body, "stop_token_ids", default=None) or ()
        check_vocab(stop_ids, "stop_token_ids", limits.vocab_size)
        skip_special = bool_field(body, "skip_special_tokens", default=True)
        seed: int | None = int_field(body, "seed", default=None)
        k = _prompt_logprobs(body, limits)
        _unsupported_completion_fields(body)
        params = cls(
            prompt, max_tokens, temperature, top_p, top_k, stop_ids, skip_special, seed, k,
            priority,
        )  # fmt: skip
        if not isinstance(prompt, str):
            params.check_prompt(prompt, limits)
        return params

    def check_prompt(self, ids: Sequence[int], limits: ModelLimits) -> None:
        """The token-id prompt (given, or encoded from the string) fits with the completion."""
        check_prompt_ids(ids, "prompt", self.max_tokens, "the completion", limits)


def _completion_prompt(raw: Any) -> tuple[int, ...] | str:
    if isinstance(raw, str):
        if not raw:
            raise RequestError(400, "`prompt` is empty: at least 1 token is needed")
        return raw
    if isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
        if len(raw) != 1:
            raise RequestError(
                400, f"only 1 prompt per request is supported, got {len(raw)} prompts"
            )
        return token_list(raw[0], "prompt[0]")
    if isinstance(raw, list):
        return token_list(raw, "prompt")
    raise wrong_type("prompt", "an array of token ids or a string", raw)


def _prompt_logprobs(body: Mapping[str, Any], limits: ModelLimits) -> int | None:
    k: int | None = int_field(body, "prompt_logprobs", default=None)
    if k is None:
        return None
    if k < -1:
        raise RequestError(400, f"`prompt_logprobs` must be a positive value or -1, got {k}.")
    wanted = limits.vocab_size if k == -1 else k
    if wanted > MAX_PROMPT_LOGPROBS:
        asked = f"-1 (the whole vocabulary, {wanted})" if k == -1 else str(k)
        raise RequestError(
            400,
            f"Requested prompt logprobs of {asked}, which is greater than max allowed: "
            f"{MAX_PROMPT_LOGPROBS} (this server returns the prompt token's own logprob "
            "only; send prompt_logprobs: 0)",
        )
    return k


def _unsupported_completion_fields(body: Mapping[str, Any]) -> None:
    for key, ok in (("n", 1), ("best_of", 1)):
        v = body.get(key)
        if v is not None and v != ok:
            raise RequestError(400, f"`{key}` must be 1 on this server, got {show(v)}")
    _no_stream(body)
    if body.get("echo"):
        raise RequestError(400, "`echo` is not supported; use prompt_logprobs instead")
    if body.get("logprobs") is not None:
        raise RequestError(
            400,
            "`logprobs` (sampled-token logprobs) is not supported, got "
            f"{show(body.get('logprobs'))}; use prompt_logprobs for prompt tokens",
        )
    if body.get("stop"):
        raise RequestError(400, "stop strings (`stop`) are not supported; use stop_token_ids")


# --------------------------------------------------------------------------- /generate


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """``POST /generate`` (SGLang): ``input_ids`` or ``text``, sampling and logprob options."""

    prompt: tuple[int, ...] | str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_token_ids: tuple[int, ...]
    skip_special_tokens: bool
    seed: int | None
    return_logprob: bool
    #: First input position listed in ``input_token_logprobs``; ``-1``: none (only outputs).
    logprob_start_len: int
    return_text_in_logprobs: bool
    priority: int = 0

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> GenerateParams:
        priority = _priority(body)
        prompt = _generate_prompt(body)
        sp = object_field(body, "sampling_params", default=None) or {}
        for key in sp:
            if key not in GENERATE_SAMPLING_KEYS:
                expected = ", ".join(f"`{k}`" for k in GENERATE_SAMPLING_KEYS)
                raise RequestError(400, f"unknown field `{key}`, expected one of {expected}")
        where = "sampling_params."
        max_new: int = int_field(sp, "max_new_tokens", where=where, default=128, minimum=0)
        temperature = float_field(sp, "temperature", where=where, default=1.0, lo=0.0)
        top_p = float_field(sp, "top_p", where=where, default=1.0, lo=0.0, hi=1.0, lo_open=True)
        top_k: int = int_field(sp, "top_k", where=where, default=-1, minimum=-1)
        stop_ids: tuple[int, ...] = (
            tokens_field(sp, "stop_token_ids", where=where, default=None) or ()
        )
        check_vocab(stop_ids, where + "stop_token_ids", limits.vocab_size)
        skip_special = bool_field(sp, "skip_special_tokens", where=where, default=True)
        seed: int | None = int_field(sp, "sampling_seed", where=where, default=None)
        return_logprob = bool_field(body, "return_logprob", default=False)
        start: int = int_field(body, "logprob_start_len", default=-1, minimum=-1)
        top_n: int = int_field(body, "top_logprobs_num", default=0, minimum=0)
        with_text = bool_field(body, "return_text_in_logprobs", default=False)
        if top_n > MAX_PROMPT_LOGPROBS:
            raise RequestError(
                400,
                f"top_logprobs_num={top_n} is not supported: the limit is "
                f"{MAX_PROMPT_LOGPROBS} (this server returns each input token's own logprob "
                "in input_token_logprobs)",
            )
        _no_stream(body)
        params = cls(
            prompt, max_new, temperature, top_p, top_k, stop_ids, skip_special, seed,
            return_logprob, start, with_text, priority,
        )  # fmt: skip
        if not isinstance(prompt, str):
            params.check_prompt(prompt, limits)
        return params

    def check_prompt(self, ids: Sequence[int], limits: ModelLimits) -> None:
        """The token-id prompt (given, or encoded from ``text``) fits, and so does the start."""
        check_prompt_ids(ids, "input_ids", self.max_new_tokens, "max_new_tokens", limits)
        start = self.logprob_start_len
        if self.return_logprob and start > len(ids):
            raise RequestError(
                400,
                f"req.logprob_start_len={start} is higher than the number of input tokens "
                f"len(req.origin_input_ids)={len(ids)}. Please use a smaller "
                "logprob_start_len.",
            )


def _generate_prompt(body: Mapping[str, Any]) -> tuple[int, ...] | str:
    ids: tuple[int, ...] | None = tokens_field(body, "input_ids", default=None)
    if ids is not None:
        return ids  # `text` is ignored when `input_ids` is given
    text = body.get("text")
    if text is None:
        raise RequestError(400, "missing required field `input_ids` (or `text`)")
    if not isinstance(text, str):
        raise wrong_type("text", "a string", text)
    if not text:
        raise RequestError(400, "`text` is empty: at least 1 token is needed")
    return text


# --------------------------------------------------------------------------- /tokenize


@dataclass(frozen=True, slots=True)
class TokenizeParams:
    """``POST /tokenize``: a string ``prompt``, or chat ``messages`` (vLLM's two shapes).

    ``messages`` are rendered through the served model's chat template
    (``add_generation_prompt`` defaults to true, as in vLLM).
    """

    prompt: str | None
    return_token_strs: bool = False
    messages: tuple[dict[str, str], ...] | None = None
    add_generation_prompt: bool = True
    #: the tokenizer's own special tokens (a BOS): vLLM's default, true for a prompt and
    #: false for messages (the template writes them)
    add_special_tokens: bool = True

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> TokenizeParams:
        _model(body)
        want_strs = bool_field(body, "return_token_strs", default=False)
        if "messages" in body and "prompt" not in body:
            return cls(None, want_strs, _chat_messages(body["messages"]),
                       bool_field(body, "add_generation_prompt", default=True),
                       bool_field(body, "add_special_tokens", default=False))
        text = field(body, "prompt", "", MISSING)
        if not isinstance(text, str):
            raise wrong_type("prompt", "a string", text)
        return cls(text, want_strs, add_special_tokens=bool_field(
            body, "add_special_tokens", default=True))


def _chat_messages(raw: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise wrong_type("messages", "a non-empty list of {role, content}", raw)
    out: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise wrong_type(f"messages[{i}]", "an object {role, content}", m)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise RequestError(400, f"messages[{i}]: `role` and `content` must be strings "
                                    f"(got {type_name(role)}, {type_name(content)})")
        out.append({"role": role, "content": content})
    return tuple(out)


@dataclass(frozen=True, slots=True)
class DetokenizeParams:
    """``POST /detokenize``: token ids in the vocabulary."""

    tokens: tuple[int, ...]

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> DetokenizeParams:
        _model(body)
        ids: tuple[int, ...] = tokens_field(body, "tokens")
        check_vocab(ids, "tokens", limits.vocab_size)
        return cls(ids)


# --------------------------------------------------------------------------- /train


@dataclass(frozen=True, slots=True)
class TrainParams:
    """``POST /train``: the samples, exactly as sent (they are recorded as they came)."""

    samples: tuple[dict[str, Any], ...]

    @classmethod
    def parse(cls, body: Mapping[str, Any], limits: ModelLimits) -> TrainParams:
        data = object_field(body, "training_data")
        samples = field(data, "samples", "training_data.", MISSING)
        if not isinstance(samples, list):
            raise wrong_type("training_data.samples", "an array of samples", samples)
        if not samples:
            raise RequestError(400, "`training_data.samples` is empty: at least 1 sample is needed")
        for i, sample in enumerate(samples):
            _check_sample(sample, i, limits)
        return cls(tuple(samples))


def _check_sample(sample: Any, i: int, limits: ModelLimits) -> None:
    where = f"training_data.samples[{i}]."
    if not isinstance(sample, dict):
        raise wrong_type(f"training_data.samples[{i}]", "an object", sample)
    ctx: tuple[int, ...] = tokens_field(sample, "context_ids", where=where)
    cont: tuple[int, ...] = tokens_field(sample, "continuation_ids", where=where)
    if not cont:
        raise RequestError(400, f"`{where}continuation_ids` is empty: at least 1 token is needed")
    check_vocab(ctx, where + "context_ids", limits.vocab_size)
    check_vocab(cont, where + "continuation_ids", limits.vocab_size)
    total = len(ctx) + len(cont)
    if total > limits.max_len:
        raise RequestError(
            400,
            f"`training_data.samples[{i}]` has {total} tokens ({len(ctx)} context + "
            f"{len(cont)} continuation), longer than the model's context of "
            f"{limits.max_len} tokens",
        )
