"""argparse value types of the CLI: each parses one option's text or says, in one line,
what it must be (``argparse.ArgumentTypeError``; the CLI prints it and exits 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["float_where", "int_at_least", "positive_float", "share", "span_range",
           "tool_names"]


def span_range(text: str) -> range:
    try:
        a, b = text.split(":")
        start, stop = (int(a) if a else 0), int(b)
    except ValueError:
        msg = f"--range must be A:B (conversation entries, half-open), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if start < 0 or stop <= start:
        msg = f"--range A:B needs 0 <= A < B (conversation entries, half-open), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return range(start, stop)


def float_where(ok: Callable[[float], bool], must: str) -> Any:
    """An argparse type: a number that ``ok`` accepts (NaN never is), else "must be {must}"."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
        return v

    parse.__name__ = f"number ({must})"
    return parse


positive_float = float_where(lambda v: v >= 0, "a number >= 0")
share = float_where(lambda v: 0.0 < v <= 1.0, "a share in (0, 1]")


def int_at_least(lowest: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {v}")
        return v

    parse.__name__ = f"integer >= {lowest}"
    return parse


def tool_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {text!r}")
    return names
