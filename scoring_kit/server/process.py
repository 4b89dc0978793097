"""Run ``python -m scoring_kit serve`` in a child process, waited for by its ready line.

The ready line is exactly ``scoring_kit serving <model> at http://HOST:PORT`` (see
:data:`READY_PREFIX` and :data:`READY_LINE`); :func:`~scoring_kit.server.runner.serve`
prints it once the server accepts connections.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Any

from .._exceptions import BackendUnavailable
from .._settings import API_KEY_ENV
from .._types import PathLike

__all__ = ["READY_LINE", "READY_PREFIX", "ServerProcess", "start_server_process"]

#: Start of the line :func:`~scoring_kit.server.runner.serve` prints once it accepts connections.
READY_PREFIX = "scoring_kit serving "
#: Parses that line: groups ``model`` and ``url``.
READY_LINE = re.compile(r"^scoring_kit serving (?P<model>.+) at (?P<url>https?://\S+)$")


class ServerProcess:
    """A ``scoring_kit serve`` child process (see :func:`start_server_process`)."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        *,
        url: str,
        model: str,
        stderr_tail: collections.deque[str],
    ) -> None:
        self.process = process
        self.url = url
        self.model = model
        self._stderr_tail = stderr_tail

    def __repr__(self) -> str:
        return f"ServerProcess(pid={self.process.pid}, url={self.url!r})"

    @property
    def running(self) -> bool:
        """Whether the child is still alive."""
        return self.process.poll() is None

    def stderr_tail(self) -> str:
        """The last lines the child wrote on stderr."""
        return "".join(self._stderr_tail)

    def stop(self, *, timeout: float = 15.0) -> int:
        """Terminate the child (SIGTERM: uvicorn shuts down gracefully), kill it if it lingers.

        Returns
        -------
        int
            Its exit code.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _drain(stream: Any, sink: Any) -> None:
    """Read ``stream`` line by line into ``sink`` (a callable) until EOF."""
    with contextlib.suppress(ValueError, OSError):
        for line in iter(stream.readline, ""):
            sink(line)
    sink(None)


def start_server_process(
    *,
    port: int = 0,
    model_path: PathLike | None = None,
    api_key: str | None = None,
    timeout: float = 180.0,
    device: str | None = None,
    train_dir: PathLike | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``python -m scoring_kit serve`` on 127.0.0.1 and wait for its ready line.

    Parameters
    ----------
    port
        ``0`` (default) lets the child pick a free port; the URL comes from its ready line.
    model_path, device, train_dir
        Passed as ``--model-path``, ``--device``, ``--train-dir``.
    api_key
        Passed through the environment (``SCORING_KIT_API_KEY``), never on the command line,
        where other users could read it.
    timeout
        Seconds to wait for the ready line (model loading included).
    extra_args
        More ``serve`` arguments.
    env
        Extra environment variables for the child.

    Returns
    -------
    ServerProcess
        With ``.url``, ``.process``, ``.stop()``; usable as a context manager.

    Raises
    ------
    BackendUnavailable
        The child exited before it was ready (the message carries its exit code and the tail
        of its stderr) or did not get ready within ``timeout`` seconds (it is then killed).
    """
    cmd = _serve_command(port, model_path, device, train_dir, extra_args)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONUNBUFFERED"] = "1"
    if api_key:
        child_env[API_KEY_ENV] = api_key
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=child_env,
        )
    except OSError as exc:
        msg = f"could not start the server process {cmd[:4]}: {exc}"
        raise BackendUnavailable(msg, backend="score") from exc
    return _wait_ready(proc, cmd, timeout)


def _serve_command(
    port: int,
    model_path: PathLike | None,
    device: str | None,
    train_dir: PathLike | None,
    extra_args: list[str] | None,
) -> list[str]:
    """The child's command line (never the API key: that travels in the environment)."""
    cmd = [sys.executable, "-m", "scoring_kit", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(int(port))]
    if model_path is not None:
        cmd += ["--model-path", str(model_path)]
    if device is not None:
        cmd += ["--device", device]
    if train_dir is not None:
        cmd += ["--train-dir", str(train_dir)]
    cmd += list(extra_args or [])
    return cmd


def _wait_ready(proc: subprocess.Popen[str], cmd: list[str], timeout: float) -> ServerProcess:
    """Read the child's stdout until its ready line; keep the tail of its stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    ready = threading.Event()

    def on_stdout(line: str | None) -> None:
        if not ready.is_set():
            lines.put(line)

    def on_stderr(line: str | None) -> None:
        if line is not None:
            tail.append(line)

    threading.Thread(
        target=_drain, args=(proc.stdout, on_stdout), name="scoring_kit-server-stdout", daemon=True
    ).start()
    err_thread = threading.Thread(
        target=_drain, args=(proc.stderr, on_stderr), name="scoring_kit-server-stderr", daemon=True
    )
    err_thread.start()

    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            proc.wait(10)
            err_thread.join(5)
            msg = (
                f"the server process did not print its ready line within {timeout:g} s; "
                f"stderr tail:\n{''.join(tail)}"
            )
            raise BackendUnavailable(msg, backend="score")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:  # stdout closed: the child is exiting
            code = proc.wait(30)
            err_thread.join(5)
            msg = (
                f"the server process exited with code {code} before it was ready "
                f"({' '.join(cmd[1:4])}); stderr tail:\n{''.join(tail)}"
            )
            raise BackendUnavailable(msg, backend="score")
        m = READY_LINE.match(line.rstrip("\r\n"))
        if m:
            ready.set()
            return ServerProcess(proc, url=m["url"], model=m["model"], stderr_tail=tail)
