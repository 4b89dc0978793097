"""Run the scoring server: in a thread of this process, as the CLI, or as a child process.

* :class:`EmbeddedServer` — uvicorn in a daemon thread of the current process (notebooks,
  tests). It binds its own socket first, so ``port=0`` gives a free port, and it returns only
  once uvicorn has started.
* :func:`serve` — the ``scoring-kit serve`` command: load the engine, bind, serve in the
  foreground until interrupted, and print one ready line on stdout.
* :func:`start_server_process` — ``python -m scoring_kit serve`` in a child process, waited
  for by its ready line (:mod:`~scoring_kit.server.process`, re-exported here).

The ready line is exactly ``scoring_kit serving <model> at http://HOST:PORT`` (see
:data:`READY_PREFIX` and :data:`READY_LINE`).
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import _settings
from .._exceptions import BackendUnavailable, MissingDependencyError
from .._settings import API_KEY_ENV
from .._types import PathLike
from .process import READY_LINE, READY_PREFIX, ServerProcess, start_server_process

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .app import ServedEngine

__all__ = [
    "API_KEY_ENV",
    "READY_LINE",
    "READY_PREFIX",
    "EmbeddedServer",
    "ServerProcess",
    "serve",
    "start_server_process",
]


_STARTUP_POLL = 0.05


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "the scoring_kit server needs uvicorn: pip install 'scoring_kit[engine]'"
        raise MissingDependencyError(msg) from exc
    return uvicorn


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        msg = f"could not listen on {host}:{port}: {exc}"
        raise BackendUnavailable(msg, backend="score") from exc
    sock.setblocking(False)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _server_class() -> Any:
    """A ``uvicorn.Server`` that sets ``ready`` (an Event) once startup has finished."""
    _uvicorn()
    import uvicorn

    class _ReadyServer(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.ready = threading.Event()
            self.on_ready: list[Any] = []

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                for fn in self.on_ready:
                    fn()
            self.ready.set()

    return _ReadyServer


class EmbeddedServer:
    """Serve ``engine`` over HTTP from a daemon thread of this process.

    Parameters
    ----------
    engine
        The engine to serve (see :class:`~scoring_kit.server.app.ServedEngine`).
    host
        Interface to bind (default loopback only).
    port
        TCP port; ``0`` picks a free one (read it back from :attr:`url` / :attr:`port`).
    api_key
        Require ``authorization: Bearer <api_key>`` (all endpoints but ``GET /health``).
    startup_timeout
        Seconds to wait for uvicorn to start.
    log_level
        uvicorn's log level (its loggers only; the logging set-up of the host process, say
        Jupyter, is left alone).
    **app_kwargs
        Passed to :func:`~scoring_kit.server.app.create_app` (``max_body_bytes``,
        ``max_queue``, ``train_dir``).

    Examples
    --------
    >>> with EmbeddedServer(engine) as srv:  # doctest: +SKIP
    ...     httpx.get(srv.url + "/health").json()["status"]
    'ok'
    """

    def __init__(
        self,
        engine: ServedEngine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        startup_timeout: float = 60.0,
        log_level: str = "warning",
        **app_kwargs: Any,
    ) -> None:
        from .app import create_app

        self.engine = engine
        self.host = host
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.app: Starlette = create_app(engine, api_key=api_key, **app_kwargs)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self._url: str | None = None

    def __repr__(self) -> str:
        state = self._url if self._url else "stopped"
        return f"EmbeddedServer({self.engine.name!r}, {state})"

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._url is None:
            msg = "the embedded server is not running (use it as a context manager or start())"
            raise BackendUnavailable(msg, backend="score")
        return self._url

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EmbeddedServer:
        """Bind, start uvicorn in a daemon thread and wait until it serves.

        Raises
        ------
        BackendUnavailable
            The port could not be bound, or uvicorn failed or did not start within
            ``startup_timeout`` seconds.
        """
        if self.running:
            return self
        uv = _uvicorn()
        sock = _bind(self.host, self.requested_port)
        config = uv.Config(
            self.app,
            log_config=None,
            log_level=self.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = _server_class()(config)
        self._server, self._sock, self._error = server, sock, None

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # surfaced by start()
                self._error = exc
            finally:
                server.ready.set()

        self._thread = threading.Thread(target=run, name="scoring_kit-uvicorn", daemon=True)
        self._thread.start()
        finished = server.ready.wait(self.startup_timeout)
        if not finished or not server.started:
            self._shutdown(timeout=5.0)
            reason = (
                f"it did not start within {self.startup_timeout:g} s"
                if not finished
                else f"it failed: {self._error!r}"
                if self._error
                else "uvicorn stopped during startup (see its log)"
            )
            msg = f"the embedded server on {self.host}:{self.requested_port} is not up: {reason}"
            raise BackendUnavailable(msg, backend="score") from self._error
        self._url = _url(self.host, sock)
        return self

    def _shutdown(self, *, timeout: float) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._thread = None
        self._sock = None
        self._url = None

    def stop(self, *, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait for its thread (at most ``timeout`` s), close the socket."""
        self._shutdown(timeout=timeout)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, with every handler on stderr (stdout carries the ready line)."""
    import copy

    uv = _uvicorn()
    cfg: dict[str, Any] = copy.deepcopy(uv.config.LOGGING_CONFIG)
    for handler in cfg.get("handlers", {}).values():
        if "stream" in handler:
            handler["stream"] = "ext://sys.stderr"
    return cfg


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_path: PathLike | None = None,
    api_key: str | None = None,
    device: str | None = None,
    train_dir: PathLike | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    max_queue: int | None = None,
    max_body_bytes: int | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Load the engine and serve it in the foreground until interrupted (``scoring-kit serve``).

    Once the server accepts connections, exactly one line is printed on stdout (flushed):
    ``scoring_kit serving <model> at http://HOST:PORT``. Logs go to stderr.

    Parameters
    ----------
    host, port
        Where to listen (default ``127.0.0.1:8000``; ``port=0`` picks a free port, shown in
        the ready line).
    model_path
        GGUF file or HF folder (default: ``SCORING_KIT_MODEL_PATH`` or the embedded SmolLM2).
    api_key
        Bearer key for every endpoint but ``GET /health``; default ``SCORING_KIT_API_KEY``.
    device, dtype, threads
        Passed to :meth:`Engine.load <scoring_kit.engine.engine.Engine.load>`.
    train_dir
        Folder of the ``/train`` job queue (default: ``SCORING_KIT_TRAIN_DIR`` if set, else
        ``~/.local/share/scoring_kit/train``; created on the first job).
    max_queue, max_body_bytes
        Server limits (see :func:`~scoring_kit.server.app.create_app`).
    log_level, access_log
        uvicorn logging.

    Raises
    ------
    ModelLoadError
        The model could not be loaded.
    BackendUnavailable
        ``host:port`` could not be bound.
    """
    from ..engine.engine import Engine
    from .app import MAX_BODY_BYTES, MAX_QUEUE, create_app

    uv = _uvicorn()
    key = api_key or _settings.api_key()
    engine = Engine.load(model_path, device=device, dtype=dtype, threads=threads)
    app = create_app(
        engine,
        api_key=key,
        max_body_bytes=max_body_bytes or MAX_BODY_BYTES,
        max_queue=max_queue or MAX_QUEUE,
        train_dir=Path(train_dir) if train_dir is not None else None,
    )
    sock = _bind(host, port)
    url = _url(host, sock)
    config = uv.Config(
        app,
        log_config=_log_config(log_level),
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _server_class()(config)

    def announce() -> None:
        sys.stdout.write(f"{READY_PREFIX}{engine.name} at {url}\n")
        sys.stdout.flush()

    server.on_ready.append(announce)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
