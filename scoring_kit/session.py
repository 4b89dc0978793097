"""One object that gives notebooks and the CLI a scorer, a tokenizer and a clean shutdown.

``open_session(None)`` loads the embedded model and serves it on 127.0.0.1 (random port)
from a background thread, then talks to it over HTTP with the same client a real server
gets; ``open_session("http://gpu-box:8000", backend="auto")`` probes a real server instead,
and ``open_session(["http://gpu-a:8000", "http://gpu-b:8000"])`` spreads the calls over
several replicas of one model (:class:`~scoring_kit.backends.replicas.ReplicaPool`).
``embedded="inprocess"`` skips HTTP and uses the engine directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ._exceptions import ConfigError
from ._sync import run_sync, takes_params_of
from ._types import PathLike

if TYPE_CHECKING:
    from types import TracebackType

    from .backends.agreement import TokenizerCheck
    from .backends.base import Scorer
    from .context.formats import AgentReading
    from .context.model import ContextState
    from .context.tokenizer import Tokenizer
    from .engine.engine import Engine
    from .server.runner import EmbeddedServer

__all__ = ["Session", "open_session"]

log = logging.getLogger(__name__)


class Session:
    """A scorer plus what it needs; use as a context manager or call :meth:`close`.

    ``server``: a URL, a list of URLs (replicas of one model: calls are spread over them and
    a failing replica's calls retried on another), or ``None`` for the embedded model.
    """

    def __init__(
        self,
        server: str | Sequence[str] | None = None,
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
        self._tokenizer: Tokenizer | None = None
        #: chat-template keywords for plain conversations (``chat_template``,
        #: ``memory_placement``, ``score_span``; see ``load_context``)
        self.render_options: dict[str, Any] = {}
        if server is not None and not isinstance(server, str):
            server = list(server) or None  # [] is no server; [url] is that url
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
        #: every server URL (several for replicas); :attr:`url` is the first
        self.urls: tuple[str, ...] = (
            () if server is None else (server,) if isinstance(server, str) else tuple(server))
        self.url: str | None = self.urls[0] if self.urls else None
        self._api_key = api_key
        #: the last tokenizer agreement check (see :meth:`check_tokenizer`)
        self.tokenizer_check: TokenizerCheck | None = None
        self._checked: list[tuple[Tokenizer, TokenizerCheck]] = []
        self._closers: list[Callable[[], None]] = []
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
    def tokenizer(self) -> Tokenizer:
        """The tokenizer for plain conversations (the embedded model's unless a path is set)."""
        if self._tokenizer is None:
            from .engine.loader import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Tokenize plain conversations with ``tokenizer`` (``--tokenizer``)."""
        self._tokenizer = tokenizer
        self._give_echo_tokenizer()

    def use_server_tokenizer(self) -> Tokenizer:
        """Tokenize through the (first) server's own ``/tokenize`` (``--tokenizer server``;
        see :class:`~scoring_kit.backends.server_tokenizer.ServerTokenizer`)."""
        from .backends.server_tokenizer import ServerTokenizer

        if self.url is None:
            raise ConfigError("--tokenizer server needs a server URL (--server)")
        tok = ServerTokenizer(self.url, api_key=self._api_key)
        self._closers.append(tok.close)
        self.set_tokenizer(tok)
        return tok

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
        ctx = load_context(path, tok, reading=reading, **self.render_options)
        if tok is not None:
            self.check_tokenizer(tok)
        else:
            log.warning("tokenizer agreement not checked: %s is pre-tokenized (tokenizer %r) "
                        "and no tokenizer is loaded; its ids must be the served model's",
                        path, ctx.tokenizer_name)
        return ctx

    def check_tokenizer(self, tokenizer: Tokenizer | None = None) -> TokenizerCheck:
        """Check (once per tokenizer) that ``tokenizer`` (default: :attr:`tokenizer`) reads
        a probe text as the scorer's model does: one ``POST /tokenize`` to the server, or a
        comparison with the in-process engine's tokenizer. :meth:`load` calls it before any
        scoring call.

        Raises
        ------
        TokenizerMismatch
            The served model tokenizes differently; the message names the option to pass.
        """
        from .backends.agreement import check_tokenizer, check_tokenizer_local

        tok = tokenizer if tokenizer is not None else self.tokenizer
        done = next((c for t, c in self._checked if t is tok), None)
        if done is None:
            if self.url is None:
                if self.engine is None:  # pragma: no cover - a server URL or an engine
                    raise ConfigError("no server and no engine to check the tokenizer against")
                done = check_tokenizer_local(tok, self.engine.tokenizer)
            else:
                det = getattr(self.scorer, "detection", None)
                served = getattr(det, "model", None) or getattr(self.scorer, "model", None)
                checks = [  # every replica answers for itself (one request each)
                    run_sync(check_tokenizer(url, tok, api_key=self._api_key, served_model=served,
                                             max_model_len=getattr(det, "max_model_len", None)))
                    for url in self.urls]
                done = next((c for c in checks if c.status != "agree"), checks[0])
            if done.status != "agree":
                log.warning("%s", done.describe())
            self._checked.append((tok, done))
        self.tokenizer_check = done
        return done

    def close(self) -> None:
        for closer in self._closers:
            closer()
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
        where = ", ".join(self.urls) or "in-process"
        return f"Session({self.scorer.name} at {where})"


@takes_params_of(Session)
def open_session(*args: Any, **kwargs: Any) -> Session:
    """Open a :class:`Session` (its parameters, shown by :func:`inspect.signature`)."""
    return Session(*args, **kwargs)
