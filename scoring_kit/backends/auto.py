"""Pick a scorer for a URL: detect the server (:mod:`~scoring_kit.backends.detect`) and
build the matching backend.

:func:`make_scorer` / :func:`amake_scorer` take ``backend="auto"`` (probe with
:func:`detect_backend`), a backend name, or no URL at all (the embedded engine
in-process). A list of URLs gives a :class:`~scoring_kit.backends.replicas.ReplicaPool`
over them (each URL detected on its own; they must agree). ``Detection``,
``DetectionError`` and ``detect_backend`` are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx

from .._exceptions import ConfigError, DetectionError
from ._util import display_url
from .detect import Detection, detect_backend
from .registry import backend_names, check_backend, load_backend

if TYPE_CHECKING:
    from .base import Scorer

__all__ = [
    "BACKENDS",
    "Detection",
    "DetectionError",
    "amake_scorer",
    "detect_backend",
    "make_scorer",
]

logger = logging.getLogger("scoring_kit.backends.auto")

#: Names accepted by :func:`make_scorer`: ``"auto"`` and the registry's
#: (:data:`~scoring_kit.backends.registry.REGISTRY`).
BACKENDS = backend_names()


def _local(engine: Any, reason: str) -> Scorer:
    from .local import LocalScorer

    scorer = LocalScorer(engine)
    scorer.detection = Detection("local", reason)
    logger.info("scoring backend 'local': %s", reason)
    return scorer


def _build(
    base_url: str,
    detection: Detection,
    *,
    model: str | None,
    api_key: str | None,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None,
) -> Scorer:
    scorer = load_backend(detection.backend).from_detection(
        base_url,
        detection,
        model=model,
        api_key=api_key,
        concurrency=concurrency,
        transport=transport,
    )
    logger.info(
        "scoring backend %r for %s: %s", detection.backend, display_url(base_url), detection.reason
    )
    return scorer


def _local_or_none(base_url: str | None, backend: str, engine: Any) -> Scorer | None:
    """The local scorer when ``backend``/``base_url`` ask for it, else ``None``."""
    check_backend(backend)
    if backend == "local":
        return _local(engine, "requested explicitly (backend='local')")
    if base_url is None:
        if backend != "auto":
            msg = f"backend {backend!r} needs a base_url; pass one, or use backend='local'"
            raise ConfigError(msg)
        return _local(engine, "no base_url: the embedded engine in-process")
    return None


def _urls(base_url: str | Sequence[str] | None) -> str | list[str] | None:
    """One URL as itself; a list of one as that URL; a longer list as a list."""
    if base_url is None or isinstance(base_url, str):
        return base_url
    urls = [str(u) for u in base_url]
    if not urls:
        return None
    return urls[0] if len(urls) == 1 else urls


async def _detect(base_url: str, backend: str, api_key: str | None,
                  transport: httpx.AsyncBaseTransport | None) -> Detection:
    if backend == "auto":
        return await detect_backend(base_url, api_key=api_key, transport=transport)
    return Detection(backend, f"requested explicitly (backend={backend!r})")


async def amake_scorer(
    base_url: str | Sequence[str] | None,
    *,
    backend: str = "auto",
    model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    transport: httpx.AsyncBaseTransport | None = None,
    engine: Any = None,
) -> Scorer:
    """Async :func:`make_scorer` (same parameters), for use inside a running event loop."""
    url = _urls(base_url)
    local = _local_or_none(url if not isinstance(url, list) else url[0], backend, engine)
    if local is not None:
        return local
    assert url is not None
    urls = url if isinstance(url, list) else [url]
    detections = await asyncio.gather(
        *(_detect(u, backend, api_key, transport) for u in urls))
    from .replicas import ReplicaPool, check_replicas_agree

    check_replicas_agree(urls, detections)
    scorers = [
        _build(u, d, model=model, api_key=api_key, concurrency=concurrency, transport=transport)
        for u, d in zip(urls, detections, strict=True)
    ]
    return scorers[0] if len(scorers) == 1 else ReplicaPool(scorers, urls=urls)


def make_scorer(
    base_url: str | Sequence[str] | None,
    *,
    backend: str = "auto",
    model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    transport: httpx.AsyncBaseTransport | None = None,
    engine: Any = None,
) -> Scorer:
    """Build the scorer for ``base_url`` (probing the server when ``backend="auto"``).

    Parameters
    ----------
    base_url
        Server URL; ``None`` gives the embedded engine in-process (``LocalScorer``). A list
        of URLs (replicas of one model) gives a
        :class:`~scoring_kit.backends.replicas.ReplicaPool`: calls spread over them, a
        failing replica's calls retried on another; replicas that differ in backend kind,
        model or ``max_model_len`` are refused with a one-line ``ConfigError``.
    backend
        ``"auto"`` (probe, see :func:`detect_backend`), ``"score"``, ``"vllm"``,
        ``"sglang"`` or ``"local"``.
    model
        Model name; by default the one the server reports (``"default"`` for ``/score``).
    api_key
        Bearer token; ``None`` reads ``$SCORING_KIT_API_KEY``.
    concurrency
        Requests in flight in ``score_batch`` (per replica).
    transport
        httpx transport replacing the network (tests).
    engine
        A loaded :class:`~scoring_kit.engine.engine.Engine` for the local backend.

    Returns
    -------
    Scorer
        With ``.detection`` (a :class:`Detection`) saying what was chosen and why.

    Raises
    ------
    ConfigError
        A ``ValueError``: unknown ``backend`` (the message lists the valid ones), an
        HTTP backend with no ``base_url``, or replicas that disagree.
    BackendError
        As for :func:`detect_backend`.

    Notes
    -----
    This runs :func:`amake_scorer` through :func:`scoring_kit._sync.run_sync`, so it also
    works inside Jupyter; in async code prefer :func:`amake_scorer`. The scorer opens its
    connection pool lazily on the event loop that first uses it.
    """
    from .._sync import run_sync

    return run_sync(
        amake_scorer(
            base_url,
            backend=backend,
            model=model,
            api_key=api_key,
            concurrency=concurrency,
            transport=transport,
            engine=engine,
        )
    )
