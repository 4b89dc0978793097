"""The scoring_kit error tree.

::

    ScoringKitError
    ├── ContextError(ValueError)        bad or unsupported conversation input (.path, .line, .field)
    ├── PromptError(ValueError)         span / token mismatch in a wire prompt or a score request
    ├── BackendError                    anything that went wrong talking to a scorer (.backend)
    │   ├── BackendUnavailable          connect error, timeout, no such server
    │   ├── ScoringAPIError             the server answered with an error (.status_code, .message)
    │   ├── ProtocolError               the server answered 2xx with a body we cannot use
    │   └── ModelLoadError              the embedded model could not be loaded
    ├── ScoringError                    a flow could not produce a result (NaN, length mismatch)
    ├── StoreError(OSError)             a file we own (store, trained set, checkpoint) is unusable
    ├── ExportError(OSError)            exists / bad suffix / bad re-import
    └── MissingDependencyError(ImportError)  names the extra to install

Every error builds a message that names *what* and *where* (file and line, node index,
token span, limit and actual value).
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ContextError",
    "ExportError",
    "MissingDependencyError",
    "ModelLoadError",
    "PromptError",
    "ProtocolError",
    "ScoringAPIError",
    "ScoringError",
    "ScoringKitError",
    "StoreError",
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
