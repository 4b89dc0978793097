"""The scoring_kit error tree.

::

    ScoringKitError
    ├── ContextError(ValueError)        bad or unsupported conversation input (.path, .line, .field)
    ├── PromptError(ValueError)         span / token mismatch in a wire prompt or a score request
    ├── BackendError                    anything that went wrong talking to a scorer (.backend)
    │   ├── BackendUnavailable          connect error, timeout, no such server
    │   ├── BackendPromptError(PromptError)  a prompt this backend cannot score (.limit, .actual)
    │   ├── DetectionError              no usable scoring backend at a URL (.probes)
    │   ├── ScoringAPIError             the server answered with an error (.status_code, .message)
    │   ├── ProtocolError               the server answered 2xx with a body we cannot use
    │   └── ModelLoadError              the embedded model could not be loaded
    ├── ScoringError                    a flow could not produce a result (NaN, length mismatch)
    ├── ConfigError(ValueError)         a bad argument or setting (names it, its limit, the value)
    ├── ServerBusy                      the embedded server's queue is full (.waiting, .max_queue)
    ├── StoreError(OSError)             a file we own (store, trained set, checkpoint) is unusable
    ├── ExportError(OSError)            exists / bad suffix / bad re-import
    └── MissingDependencyError(ImportError)  names the extra to install

Warnings: ``ScoringKitWarning(UserWarning)`` → ``CostWarning`` (a backend far costlier
than ``/score``).

Every error builds a message that names *what* and *where* (file and line, node index,
token span, limit and actual value).
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendPromptError",
    "BackendUnavailable",
    "ConfigError",
    "ContextError",
    "CostWarning",
    "DetectionError",
    "ExportError",
    "MissingDependencyError",
    "ModelLoadError",
    "PromptError",
    "ProtocolError",
    "ScoringAPIError",
    "ScoringError",
    "ScoringKitError",
    "ScoringKitWarning",
    "ServerBusy",
    "StoreError",
    "TokenizerMismatch",
]


class ScoringKitError(Exception):
    """Base class of every error scoring_kit raises on purpose."""


class ContextError(ScoringKitError, ValueError):
    """Malformed or unsupported conversation input.

    Attributes carry the location: ``path`` (file), ``line`` (1-based), ``field``.
    """

    def __init__(
        self,
        msg: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(str(path) if line is None else f"{path}:{line}")
        elif line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        full = f"{', '.join(where)}: {msg}" if where else msg
        super().__init__(full)
        self.path = path
        self.line = line
        self.field = field


class PromptError(ScoringKitError, ValueError):
    """A wire prompt or score request is inconsistent (bad span, bad token id)."""


class BackendError(ScoringKitError):
    """Talking to a scoring backend failed."""

    def __init__(self, msg: str, *, backend: str | None = None) -> None:
        super().__init__(msg)
        self.backend = backend


class BackendUnavailable(BackendError):
    """The server could not be reached, or did not answer in time."""


class ScoringAPIError(BackendError):
    """The server answered with an error status or an ``error`` field.

    ``str(err)`` follows the reference client: ``score API HTTP <status>: <message>``
    or ``score API error: <message>``.
    """

    def __init__(
        self,
        msg: str,
        *,
        status_code: int | None,
        message: str,
        backend: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(msg, backend=backend)
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


class ProtocolError(BackendError):
    """A 2xx answer whose body does not have the documented shape."""


class ModelLoadError(BackendError):
    """The embedded model or tokenizer could not be loaded."""


class ScoringError(ScoringKitError):
    """A scoring flow could not produce a valid result."""


class StoreError(ScoringKitError, OSError):
    """A file scoring_kit owns (memory store, trained set, checkpoint, queue) is unusable."""


class ExportError(ScoringKitError, OSError):
    """An export could not be written or re-imported."""


class MissingDependencyError(ScoringKitError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class BackendPromptError(BackendError, PromptError):
    """A prompt this backend cannot score: a bad span, or longer than the model's context.

    It is a :class:`~scoring_kit.PromptError` (the request itself is at fault, so retrying
    does not help) and also a :class:`~scoring_kit.BackendError`, so that ``score_batch``
    records it in the request's slot instead of losing the whole batch.

    Attributes
    ----------
    limit, actual
        The limit that was exceeded and the value found, when the error is about a length.
    """

    def __init__(
        self,
        msg: str,
        *,
        backend: str | None = None,
        limit: int | None = None,
        actual: int | None = None,
    ) -> None:
        super().__init__(msg, backend=backend)
        self.limit = limit
        self.actual = actual


class DetectionError(BackendError):
    """No usable scoring backend at a URL; ``.probes`` lists each probe and its answer."""

    def __init__(self, msg: str, *, probes: tuple[str, ...] = ()) -> None:
        super().__init__(msg, backend=None)
        self.probes = probes


class ConfigError(ScoringKitError, ValueError):
    """A bad argument or setting; the message names it, the allowed range and the value."""


class TokenizerMismatch(ConfigError):
    """The kit's tokenizer reads text differently from the served model's (one line: both
    tokenizers, the first differing token, and the option that fixes it)."""

    def __init__(self, msg: str, *, tokenizer: str, served_model: str | None) -> None:
        super().__init__(msg)
        self.tokenizer = tokenizer
        self.served_model = served_model


class ServerBusy(ScoringKitError):
    """More requests are waiting for the engine than the server allows."""

    def __init__(self, waiting: int, max_queue: int) -> None:
        super().__init__(
            f"server busy: {waiting} requests are already waiting for the engine "
            f"(max_queue={max_queue}); retry later"
        )
        self.waiting = waiting
        self.max_queue = max_queue


class ScoringKitWarning(UserWarning):
    """Base class of the warnings scoring_kit issues on purpose."""


class CostWarning(ScoringKitWarning):
    """Scoring through this backend is much more expensive than through ``/score``."""
