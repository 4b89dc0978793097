"""The engine worker: one thread that runs every engine and tokenizer call, in priority order.

The server never calls the engine on the event loop: each handler wraps its engine work in a
function and awaits :meth:`EngineWorker.run`. Lower ``priority`` runs first, FIFO within a
priority; at most ``max_queue`` jobs wait, one more raises :class:`~scoring_kit.ServerBusy`
(the app answers ``503`` with ``Retry-After``).

Imports nothing of the server but the error tree, so it is usable (and tested) on its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .._exceptions import ConfigError, ServerBusy

__all__ = ["MAX_QUEUE", "EngineWorker", "QueueFull"]

T = TypeVar("T")

#: Default number of requests that may wait for the engine before 503.
MAX_QUEUE = 64

#: The old name of :class:`~scoring_kit.ServerBusy` (kept for ``scoring_kit.server.QueueFull``).
QueueFull = ServerBusy


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[], T]
    future: concurrent.futures.Future[T]


_QueueItem = tuple[int, int, "_Job[Any] | None"]


class EngineWorker:
    """One daemon thread that runs every engine call, lowest ``priority`` first.

    Parameters
    ----------
    max_queue
        How many submitted jobs may wait (not yet started) before :meth:`submit` raises
        :class:`~scoring_kit.ServerBusy`. The running job does not count.
    name
        Thread name.

    Notes
    -----
    The thread starts on the first :meth:`submit` and stops on :meth:`close`, which also
    cancels waiting jobs; a later :meth:`submit` starts a fresh thread.
    """

    def __init__(self, *, max_queue: int = MAX_QUEUE, name: str = "scoring_kit-engine") -> None:
        if max_queue < 1:
            msg = f"max_queue must be at least 1, got {max_queue}"
            raise ConfigError(msg)
        self.max_queue = max_queue
        self.name = name
        self._cond = threading.Condition()
        self._queue: queue.PriorityQueue[_QueueItem] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._waiting = 0
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet started."""
        with self._cond:
            return self._waiting

    @property
    def busy(self) -> bool:
        """Whether a job is running now."""
        with self._cond:
            return self._running

    def submit(self, fn: Callable[[], T], *, priority: int = 0) -> concurrent.futures.Future[T]:
        """Queue ``fn``; its result (or exception) lands in the returned future.

        Raises
        ------
        ServerBusy
            ``max_queue`` jobs are already waiting.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._waiting >= self.max_queue:
                raise ServerBusy(self._waiting, self.max_queue)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, args=(self._queue,), name=self.name, daemon=True
                )
                self._thread.start()
            self._waiting += 1
            self._queue.put((int(priority), next(self._seq), _Job(fn, future)))
            self._cond.notify_all()
        return future

    async def run(self, fn: Callable[[], T], *, priority: int = 0) -> T:
        """Run ``fn`` on the worker thread and await its result."""
        return await asyncio.wrap_future(self.submit(fn, priority=priority))

    def wait_for(self, predicate: Callable[[EngineWorker], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every queue change).

        Returns ``False`` if it still does not hold after ``timeout`` seconds. Meant for
        tests and monitoring (for example ``lambda w: w.waiting == 1``).
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def _loop(self, q: queue.PriorityQueue[_QueueItem]) -> None:
        while True:
            _, _, job = q.get()
            if job is None:
                return
            with self._cond:
                if q is self._queue:
                    self._waiting -= 1
                self._running = True
                self._cond.notify_all()
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        result = job.fn()
                    except BaseException as exc:
                        job.future.set_exception(exc)
                    else:
                        job.future.set_result(result)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def close(self) -> None:
        """Cancel waiting jobs and let the thread end after its current job."""
        with self._cond:
            old, self._queue = self._queue, queue.PriorityQueue()
            thread, self._thread = self._thread, None
            self._waiting = 0
            while True:
                try:
                    _, _, job = old.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.future.cancel()
            self._cond.notify_all()
        if thread is not None:
            old.put((-(2**63), next(self._seq), None))
