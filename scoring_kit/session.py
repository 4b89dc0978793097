"""One object that gives notebooks and the CLI a scorer, a tokenizer and a clean shutdown.

``open_session(None)`` loads the embedded model and serves it on 127.0.0.1 (random port)
from a background thread, then talks to it over HTTP with the same client a real server
gets; ``open_session("http://gpu-box:8000", backend="auto")`` probes a real server instead.
``embedded="inprocess"`` skips HTTP and uses the engine directly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from ._exceptions import ConfigError
from ._sync import run_sync, takes_params_of
from ._types import PathLike

if TYPE_CHECKING:
    from types import TracebackType

    from .backends.base import Scorer
    from .context.formats import AgentReading
    from .context.model import ContextState
    from .context.tokenizer import HFTokenizer
    from .engine.engine import Engine
    from .server.runner import EmbeddedServer

__all__ = ["Session", "open_session"]

log = logging.getLogger(__name__)


class Session:
    """A scorer plus what it needs; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        server: str | None = None,
        *,
        backend: str = "auto",
        model: str | None = None,
        api_key: str | None = None,
        model_path: PathLike | None = None,
        device: str | None = None,
        embedded: Literal["server", "inprocess"] = "server",
        concurrency: int = 4,
        train_dir: PathLike | None = None,
    ) -> None:
        from .backends.auto import make_scorer

        self.model_path = model_path
        self.engine: Engine | None = None
        self.server: EmbeddedServer | None = None
        self._tokenizer: HFTokenizer | None = None
        #: chat-template keywords for plain conversations (``chat_template``,
        #: ``memory_placement``, ``score_span``; see ``load_context``)
        self.render_options: dict[str, Any] = {}
        if server is None and backend in ("auto", "local", "score"):
            from .engine.engine import Engine

            self.engine = Engine.load(model_path, device=device)
            self._tokenizer = self.engine.tokenizer
            if embedded == "server" and backend != "local":
                from .server.runner import EmbeddedServer

                kwargs: dict[str, Any] = {}
                if train_dir is not None:
                    kwargs["train_dir"] = train_dir
                self.server = EmbeddedServer(self.engine, api_key=api_key, **kwargs).start()
                server = self.server.url
                log.info("embedded server at %s", server)
        elif server is None:
            msg = f"backend {backend!r} needs a server URL (--server)"
            raise ConfigError(msg)
        self.url: str | None = server
        self.scorer: Scorer = make_scorer(
            server,
            backend="local" if server is None else backend,
            model=model,
            api_key=api_key,
            concurrency=concurrency,
            engine=self.engine,
        )
        self._give_echo_tokenizer()

    def _give_echo_tokenizer(self) -> None:
        """An ``echo`` scorer may have to send text (llama-cpp-python): it decodes the ids
        with this session's tokenizer (checked against the server's before any use)."""
        from .backends.echo import EchoScorer

        if isinstance(self.scorer, EchoScorer):
            self.scorer.tokenizer = self.tokenizer

    @property
    def tokenizer(self) -> HFTokenizer:
        """The tokenizer for plain conversations (the embedded model's unless a path is set)."""
        if self._tokenizer is None:
            from .engine.loader import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def set_tokenizer(self, tokenizer: HFTokenizer) -> None:
        """Tokenize plain conversations with ``tokenizer`` (``--tokenizer``)."""
        self._tokenizer = tokenizer
        self._give_echo_tokenizer()

    def load(self, path: PathLike, *, reading: AgentReading | None = None) -> ContextState:
        """Load a conversation in any format with this session's tokenizer (``reading``:
        memories and responses of OpenAI-style and Letta files, see ``context.formats``;
        plain messages are rendered with :attr:`render_options`)."""
        from .context.io import load_context, sniff_format

        # tokenized files need no tokenizer unless one is already loaded (vocab check);
        # an unreadable file is reported by load_context before any tokenizer is loaded
        tok = self._tokenizer
        if tok is None and sniff_format(path) == "plain":
            tok = self.tokenizer
        return load_context(path, tok, reading=reading, **self.render_options)

    def close(self) -> None:
        try:
            run_sync(self.scorer.aclose())
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.url or "in-process"
        return f"Session({self.scorer.name} at {where})"


@takes_params_of(Session)
def open_session(*args: Any, **kwargs: Any) -> Session:
    """Open a :class:`Session` (its parameters, shown by :func:`inspect.signature`)."""
    return Session(*args, **kwargs)
