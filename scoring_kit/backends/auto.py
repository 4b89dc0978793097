"""Pick a scorer for a URL: detect the server (:mod:`~scoring_kit.backends.detect`) and
build the matching backend.

:func:`make_scorer` / :func:`amake_scorer` take ``backend="auto"`` (probe with
:func:`detect_backend`), a backend name, or no URL at all (the embedded engine
in-process). ``Detection``, ``DetectionError`` and ``detect_backend`` are re-exported here.
"""

from __future__ import annotations

import logging
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


async def amake_scorer(
    base_url: str | None,
    *,
    backend: str = "auto",
    model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    transport: httpx.AsyncBaseTransport | None = None,
    engine: Any = None,
) -> Scorer:
    """Async :func:`make_scorer` (same parameters), for use inside a running event loop."""
    local = _local_or_none(base_url, backend, engine)
    if local is not None:
        return local
    assert base_url is not None
    if backend == "auto":
        detection = await detect_backend(base_url, api_key=api_key, transport=transport)
    else:
        detection = Detection(backend, f"requested explicitly (backend={backend!r})")
    return _build(
        base_url,
        detection,
        model=model,
        api_key=api_key,
        concurrency=concurrency,
        transport=transport,
    )


def make_scorer(
    base_url: str | None,
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
        Server URL; ``None`` gives the embedded engine in-process (``LocalScorer``).
    backend
        ``"auto"`` (probe, see :func:`detect_backend`), ``"score"``, ``"vllm"``,
        ``"sglang"`` or ``"local"``.
    model
        Model name; by default the one the server reports (``"default"`` for ``/score``).
    api_key
        Bearer token; ``None`` reads ``$SCORING_KIT_API_KEY``.
    concurrency
        Requests in flight in ``score_batch``.
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
        A ``ValueError``: unknown ``backend`` (the message lists the valid ones), or an
        HTTP backend with no ``base_url``.
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
