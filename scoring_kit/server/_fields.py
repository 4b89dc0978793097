"""Typed reads of JSON body fields, each raising a ``400`` :class:`RequestError` naming the field.

``where`` is the path of the enclosing object (``"requests[2]."``, ``"sampling_params."``),
so a message names ``requests[2].score_ranges[0]``, what it must be, and what came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .._exceptions import ScoringKitError
from .._types import Span

__all__ = [
    "MISSING",
    "RequestError",
    "bool_field",
    "check_vocab",
    "field",
    "float_field",
    "int_field",
    "object_field",
    "ranges_field",
    "show",
    "token_list",
    "tokens_field",
    "type_name",
    "wrong_type",
]


class RequestError(ScoringKitError):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``.

    Raised by the request parsers (:mod:`~scoring_kit.server.params`) and the protocol
    handlers; it never leaves the server (the app turns it into the response).
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


#: ``default=MISSING``: the field is required.
MISSING: Any = object()


def type_name(value: Any) -> str:
    """How a JSON value's type is named in messages (``"a string"``, ``"an array"``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON has no other types


def show(value: Any) -> str:
    """A value as JSON, cut to 40 characters."""
    text = orjson.dumps(value, default=repr).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def wrong_type(field: str, expected: str, value: Any) -> RequestError:
    """The ``400`` for a field of the wrong type."""
    return RequestError(
        400, f"field `{field}` must be {expected}, got {type_name(value)} ({show(value)})"
    )


def field(body: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    if key in body:
        return body[key]
    if default is MISSING:
        raise RequestError(400, f"missing required field `{where}{key}`")
    return default


def int_field(
    body: Mapping[str, Any],
    key: str,
    *,
    where: str = "",
    default: Any = MISSING,
    minimum: int | None = None,
    nullable: bool = False,
) -> Any:
    value = field(body, key, where, default)
    if value is None and (nullable or default is None):
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise wrong_type(where + key, "an integer", value)
    if minimum is not None and value < minimum:
        raise RequestError(400, f"field `{where}{key}` must be at least {minimum}, got {value}")
    return value


def float_field(
    body: Mapping[str, Any],
    key: str,
    *,
    where: str = "",
    default: Any = MISSING,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    value = field(body, key, where, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise wrong_type(where + key, "a finite number", value)
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        op = ">" if lo_open else ">="
        raise RequestError(400, f"field `{where}{key}` must be {op} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise RequestError(400, f"field `{where}{key}` must be <= {hi:g}, got {v:g}")
    return v


def bool_field(
    body: Mapping[str, Any], key: str, *, where: str = "", default: Any = MISSING
) -> bool:
    value = field(body, key, where, default)
    if not isinstance(value, bool):
        raise wrong_type(where + key, "a boolean", value)
    return value


def object_field(
    body: Mapping[str, Any], key: str, *, where: str = "", default: Any = MISSING
) -> Any:
    value = field(body, key, where, default)
    if value is None and default is None:
        return None
    if not isinstance(value, dict):
        raise wrong_type(where + key, "an object", value)
    return value


def token_list(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise wrong_type(field, "an array of integer token ids", value)
    for i, x in enumerate(value):
        if not isinstance(x, int) or isinstance(x, bool):
            raise wrong_type(f"{field}[{i}]", "an integer token id", x)
    return tuple(value)


def tokens_field(
    body: Mapping[str, Any], key: str, *, where: str = "", default: Any = MISSING
) -> Any:
    value = field(body, key, where, default)
    if value is None and default is None:
        return None
    return token_list(value, where + key)


def check_vocab(ids: Sequence[int], field: str, vocab_size: int) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise RequestError(
                400,
                f"token id {t} at `{field}[{i}]` is outside the vocabulary [0, {vocab_size})",
            )


def ranges_field(body: Mapping[str, Any], where: str) -> tuple[Span, ...]:
    key = "score_ranges"
    value = field(body, key, where, MISSING)
    if not isinstance(value, list):
        raise wrong_type(where + key, "an array of [start, end] pairs", value)
    out: list[Span] = []
    for i, r in enumerate(value):
        ok = isinstance(r, list) and len(r) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        if not ok:
            raise wrong_type(f"{where}{key}[{i}]", "a [start, end] pair of integers", r)
        out.append((r[0], r[1]))
    return tuple(out)
