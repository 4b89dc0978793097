"""Run a coroutine from synchronous code, including inside a running event loop (Jupyter),
and build the synchronous twins of the async flows with their real signatures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

__all__ = ["run_sync", "sync_twin", "takes_params_of"]

T = TypeVar("T")
P = ParamSpec("P")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion and return its result.

    With no running loop this is ``asyncio.run``. Inside a running loop (a Jupyter cell) the
    coroutine runs on a fresh loop in a worker thread, so notebooks can call the sync API.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def sync_twin(afn: Callable[P, Coroutine[Any, Any, T]], name: str) -> Callable[P, T]:
    """The synchronous twin ``name`` of the coroutine function ``afn``.

    It takes exactly ``afn``'s parameters — :func:`inspect.signature` (and so Jupyter's
    ``?`` and ``help``) shows them with their defaults and annotations, and type checkers
    see them too — and runs ``afn`` with :func:`run_sync` (also inside Jupyter).
    """

    @functools.wraps(afn)
    def twin(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(afn(*args, **kwargs))

    twin.__name__ = name
    twin.__qualname__ = name
    twin.__doc__ = (
        f"Synchronous :func:`{afn.__name__}` (works inside Jupyter too).\n\n"
        f"{inspect.getdoc(afn) or ''}"
    )
    return twin


def takes_params_of(
    target: Callable[P, T],
) -> Callable[[Callable[..., T]], Callable[P, T]]:
    """Decorator: the decorated function takes ``target``'s parameters (it forwards its
    arguments to ``target``); its signature is shown as ``target``'s, for
    :func:`inspect.signature`, Jupyter and type checkers alike."""

    def decorate(fn: Callable[..., T]) -> Callable[P, T]:
        sig = inspect.signature(target)
        ret = target if isinstance(target, type) else sig.return_annotation
        fn.__signature__ = sig.replace(return_annotation=ret)  # type: ignore[attr-defined]
        return cast(Callable[P, T], fn)

    return decorate
