"""The backends by name: ``name -> "module:Class"``, read by ``auto`` and by the CLI.

One line per backend in :data:`REGISTRY`; the class is imported only when chosen, so
listing the names (``scoring-kit --help``) imports no backend. A registered class
provides the classmethod :meth:`BackendClass.from_detection` (every
:class:`~scoring_kit.backends._common.HTTPBackend` inherits one); ``"local"`` is built by
:func:`~scoring_kit.backends.auto.make_scorer` from its engine instead.

Registering a backend::

    "echo": "scoring_kit.backends.echo:EchoScorer",
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol, cast

from .._exceptions import ConfigError

if TYPE_CHECKING:
    import httpx

    from .base import Scorer
    from .detect import Detection

__all__ = ["AUTO", "REGISTRY", "BackendClass", "backend_names", "check_backend", "load_backend"]

#: The name that probes the server instead of naming a backend.
AUTO: Final = "auto"

#: ``name -> "module:Class"``, in the order the CLI lists them.
REGISTRY: Final[Mapping[str, str]] = MappingProxyType(
    {
        "score": "scoring_kit.backends.http:ScoreClient",
        "vllm": "scoring_kit.backends.vllm:VLLMScorer",
        "sglang": "scoring_kit.backends.sglang:SGLangScorer",
        "echo": "scoring_kit.backends.echo:EchoScorer",
        "local": "scoring_kit.backends.local:LocalScorer",
    }
)


class BackendClass(Protocol):
    """What ``auto`` needs from a registered HTTP backend class."""

    def from_detection(
        self,
        base_url: str,
        detection: Detection,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Scorer:
        """The scorer for ``base_url`` once ``detection`` has chosen this backend."""
        ...


def backend_names() -> tuple[str, ...]:
    """``"auto"`` and every registered name: the ``backend=`` / ``--backend`` choices."""
    return (AUTO, *REGISTRY)


def check_backend(name: str) -> None:
    """Raise :class:`~scoring_kit.ConfigError` unless ``name`` is ``"auto"`` or registered."""
    if name not in backend_names():
        msg = f"unknown backend {name!r}; valid backends: {', '.join(backend_names())}"
        raise ConfigError(msg)


def load_backend(name: str) -> BackendClass:
    """The class registered as ``name`` (imported now).

    Raises
    ------
    ConfigError
        ``name`` is not registered.
    """
    if name not in REGISTRY:
        check_backend(name)
        msg = f"backend {name!r} is chosen by the probes, not built from the registry"
        raise ConfigError(msg)
    module, _, attr = REGISTRY[name].partition(":")
    return cast("BackendClass", getattr(importlib.import_module(module), attr))
