"""The embedded scoring engine: teacher-forced span log-probabilities from a causal LM.

:class:`Engine` wraps a Hugging Face causal LM (by default the embedded SmolLM2-135M-Instruct)
and answers the scorer contract: for a prompt and half-open spans ``[start, end)`` it returns
``sum(log P(prompt[t] | prompt[:t]) for t in span)`` per span.

What makes it fast (see ``docs/ARCHITECTURE.md``):

* **Logits only at scored rows.** The base transformer (``model.model``) gives hidden states;
  the LM head is applied only to rows ``t - 1`` for the scored ``t``, in bounded chunks, and
  the log-softmax is reduced to ``logit[target] - logsumexp(logits)`` per row. No
  vocabulary × positions tensor is ever built.
* **Chunked prefill.** Tokens go through a :class:`~transformers.DynamicCache` in chunks of
  ``chunk_tokens`` so that an 8192-token prompt needs bounded memory.
* **Prefix KV reuse.** :meth:`Engine.score_many` computes the longest common prefix of every
  item with every other (sorted-adjacency trick, numpy), orders the items so that the one
  sharing the most with the rest (the leave-one-out baseline) runs first, keeps the KV cache of
  items that others extend, and for every other item runs only the suffix after the shared
  prefix. Per-position log-probabilities of the shared prefix are reused too, so a response
  before the removed memory costs nothing.
* **Batched suffixes.** Items that extend the same cached prefix can run as one right-padded
  batch (prefix visible, causal within each row's own suffix). This pays on a GPU, where many
  small passes are launch-bound; on CPU the default is one item per pass (measured faster).
* **A small persistent prefix cache.** The KV of the hub of each call (and of the kept
  prefixes a call used) is kept between calls, least recently useful dropped first, within
  ``prefix_cache_tokens`` / ``prefix_cache_entries``: a baseline sent alone and its ablations
  sent one by one (the seed's ``/score`` traffic) still share the work. Call
  :meth:`Engine.clear_cache` after changing the model's weights.

The package is split by job: ``plan.py`` decides (LCPs, order, sources, batches; numpy
only), ``execute.py`` carries a call's plan out, ``forward.py`` does the torch work (KV
caches, chunked prefill, span log-probabilities), ``sampling.py`` generates, ``stats.py``
counts. This module keeps :class:`Engine`, the public contract.

``torch`` and ``transformers`` are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _settings
from .._exceptions import ConfigError, ModelLoadError, PromptError
from .._types import FloatArray, IntArray, PathLike, Span
from ..wire import validate_score_request
from .execute import Limits, run_jobs
from .forward import Forward
from .plan import (
    Cached,
    Job,
    make_job,
    totals,
)
from .sampling import check_sampling, sample_tokens
from .stats import EngineStats

if TYPE_CHECKING:
    from ..context.tokenizer import HFTokenizer

__all__ = ["DEVICE_ENV", "Engine", "EngineStats"]

#: Environment variable that picks the device when ``Engine.load`` is given none (re-exported
#: from :mod:`scoring_kit._settings`, which reads it).
DEVICE_ENV = _settings.DEVICE_ENV

_DTYPES = ("float32", "float16", "bfloat16")


class Engine:
    """Teacher-forced span scoring (and sampling) with a causal LM, in-process.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM with a base model (``model.model`` or ``get_decoder()``) and an LM head
        (``get_output_embeddings()``), already on ``device`` and in eval mode.
    tokenizer : HFTokenizer
        Its tokenizer.
    name : str, optional
        Model name reported to clients (default: the tokenizer's name).
    device : str, optional
        Where the model lives (default: the device of its parameters).
    chunk_tokens : int
        Tokens per prefill chunk (per batch row); bounds activation memory on long prompts.
    logit_chunk_rows : int
        Rows of the LM head computed at once (``rows × vocab`` floats live at a time).
    batch_tokens : int, optional
        Budget of padded suffix tokens (rows × longest suffix) per batched suffix pass. ``0``
        or ``1`` runs each suffix alone. Default: 32768 on CUDA, 0 on CPU.
    max_batch : int
        Most rows in one batched suffix pass.
    batch_kv_tokens : int, optional
        Budget of KV rows (rows × (shared prefix + longest suffix)) of one batched pass; bounds
        the memory of the per-row copies of the shared prefix. Default: 262144 on CUDA
        (about 12 GB for SmolLM2 in float32), 65536 on CPU.
    cache_tokens : int, optional
        Most KV tokens kept at once for prefixes that later items extend (default ``4 ×
        max_len``).
    prefix_cache_tokens : int, optional
        Most KV tokens kept between calls; ``0`` disables the persistent prefix cache.
        Default ``2 × max_len``.
    prefix_cache_entries : int
        Most prefixes kept between calls (least recently useful dropped first).
    max_len : int, optional
        Longest prompt accepted (default: the model's ``max_position_embeddings``).
    split_attention : bool
        Switch the model to split-prefix attention (``engine/attention.py``: a chunk attends
        to its cached prefix without a mask or repeated key/value heads; equal to ``sdpa``
        within float rounding) where it applies: CPU, ``sdpa`` models without sliding-window
        layers. Default True; False leaves the model's attention as it is.

    Raises
    ------
    ConfigError
        ``chunk_tokens`` or ``logit_chunk_rows`` is below 1.
    ModelLoadError
        The model has no base transformer or no LM head.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: HFTokenizer,
        *,
        name: str | None = None,
        device: str | None = None,
        chunk_tokens: int = 1024,
        logit_chunk_rows: int = 512,
        batch_tokens: int | None = None,
        max_batch: int = 64,
        batch_kv_tokens: int | None = None,
        cache_tokens: int | None = None,
        prefix_cache_tokens: int | None = None,
        prefix_cache_entries: int = 4,
        max_len: int | None = None,
        split_attention: bool = True,
    ) -> None:
        if chunk_tokens < 1:
            raise ConfigError(f"Engine: chunk_tokens must be >= 1, got {chunk_tokens}")
        if logit_chunk_rows < 1:
            raise ConfigError(f"Engine: logit_chunk_rows must be >= 1, got {logit_chunk_rows}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or tokenizer.name
        if device is None:
            device = str(next(model.parameters()).device)
        self.device = device
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(getattr(text_config, "vocab_size", tokenizer.vocab_size))
        self.max_len = int(max_len if max_len is not None else text_config.max_position_embeddings)
        self._softcap: float | None = getattr(text_config, "final_logit_softcapping", None)
        self._logit_scale = float(getattr(text_config, "logit_scale", 1.0) or 1.0)
        self.chunk_tokens = int(chunk_tokens)
        self.logit_chunk_rows = int(logit_chunk_rows)
        on_cuda = self.device.startswith("cuda")
        self.batch_tokens = int(
            batch_tokens if batch_tokens is not None else (32768 if on_cuda else 0)
        )
        self.max_batch = max(1, int(max_batch))
        self.batch_kv_tokens = int(
            batch_kv_tokens if batch_kv_tokens is not None else (262144 if on_cuda else 65536)
        )
        self.cache_tokens = int(cache_tokens if cache_tokens is not None else 4 * self.max_len)
        self.prefix_cache_tokens = int(
            prefix_cache_tokens if prefix_cache_tokens is not None else 2 * self.max_len
        )
        self.prefix_cache_entries = max(1, int(prefix_cache_entries))
        self._lock = threading.Lock()
        self._persisted: list[Cached] = []
        base = getattr(model, "model", None)
        if base is None and hasattr(model, "get_decoder"):
            base = model.get_decoder()
        if base is None:
            raise ModelLoadError(
                f"model {self.name!r} ({type(model).__name__}) has no base transformer "
                "(model.model / get_decoder())",
                backend="local",
            )
        if split_attention:
            from .attention import install

            install(model, self.device)
        head = model.get_output_embeddings()
        if head is None:
            raise ModelLoadError(
                f"model {self.name!r} ({type(model).__name__}) has no LM head "
                "(get_output_embeddings() is None)",
                backend="local",
            )
        self._fwd = Forward(
            model,
            base,
            head,
            device=self.device,
            chunk_tokens=self.chunk_tokens,
            logit_chunk_rows=self.logit_chunk_rows,
            softcap=self._softcap,
            logit_scale=self._logit_scale,
            stats=EngineStats(),
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model_path: PathLike | None = None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        **options: Any,
    ) -> Engine:
        """Load a model and its tokenizer and wrap them.

        Parameters
        ----------
        model_path : path-like, optional
            A GGUF file or HF model folder; default: ``SCORING_KIT_MODEL_PATH`` or the embedded
            SmolLM2-135M-Instruct.
        device : str, optional
            ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …; default: ``SCORING_KIT_DEVICE`` if set, else
            ``"cuda"`` when available, else ``"cpu"``.
        dtype : {"float32", "float16", "bfloat16"}
            Weight dtype.
        threads : int, optional
            ``torch.set_num_threads`` (default: leave torch's default).
        **options
            Passed to the constructor (``chunk_tokens``, ``batch_tokens`` …).

        Returns
        -------
        Engine

        Raises
        ------
        ModelLoadError
            The model, tokenizer, device or dtype is unusable.
        """
        from .loader import load_hf_model, load_tokenizer

        if dtype not in _DTYPES:
            raise ModelLoadError(
                f"dtype {dtype!r} is not supported: choose one of {', '.join(_DTYPES)}",
                backend="local",
            )
        import torch

        if threads is not None:
            if threads < 1:
                raise ModelLoadError(f"threads must be >= 1, got {threads}", backend="local")
            torch.set_num_threads(int(threads))
        if device is None:
            device = _settings.device()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__})",
                backend="local",
            )
        tokenizer = load_tokenizer(model_path)
        model = load_hf_model(model_path, device=device, dtype=dtype)
        return cls(model, tokenizer, name=tokenizer.name, device=device, **options)

    def __repr__(self) -> str:
        return (
            f"Engine({self.name!r}, device={self.device!r}, vocab_size={self.vocab_size}, "
            f"max_len={self.max_len})"
        )

    # ------------------------------------------------------------------ stats / cache

    @property
    def stats(self) -> EngineStats:
        """What the engine has computed since the last :meth:`reset_stats`."""
        return self._fwd.stats

    @stats.setter
    def stats(self, value: EngineStats) -> None:
        self._fwd.stats = value

    def reset_stats(self) -> None:
        """Zero :attr:`stats`."""
        with self._lock:
            self.stats = EngineStats()

    def clear_cache(self) -> None:
        """Drop the prefix KV kept between calls (needed after the weights change)."""
        with self._lock:
            self._persisted = []

    # ------------------------------------------------------------------ scoring API

    def score(self, prompt: Sequence[int] | IntArray, ranges: Sequence[Span]) -> FloatArray:
        """Total log-probability of each span of ``prompt``.

        Parameters
        ----------
        prompt : sequence of int
            Token ids.
        ranges : sequence of (start, end)
            Sorted, disjoint half-open spans with ``1 <= start < end <= len(prompt)``.

        Returns
        -------
        numpy.ndarray
            float64, shape ``(len(ranges),)``: ``sum(log P(prompt[t] | prompt[:t]))`` per span.

        Raises
        ------
        PromptError
            The request is invalid (the message names the limit and the actual value).
        """
        out = self.score_many([(prompt, ranges)])[0]
        if isinstance(out, PromptError):
            raise out
        return out

    def score_many(
        self, items: Sequence[tuple[Sequence[int] | IntArray, Sequence[Span]]]
    ) -> list[FloatArray | PromptError]:
        """Score many prompts, reusing the KV (and log-probs) of their shared prefixes.

        Parameters
        ----------
        items : sequence of (prompt, ranges)
            Typically a baseline followed by ablations of it (the same prompt with token runs
            removed); any order and any mix works.

        Returns
        -------
        list
            Aligned with ``items``: the float64 totals, or the :class:`PromptError` of an
            invalid item (the other items are still scored).
        """
        return self.score_many_counted(items)[0]

    def score_many_counted(
        self, items: Sequence[tuple[Sequence[int] | IntArray, Sequence[Span]]]
    ) -> tuple[list[FloatArray | PromptError], EngineStats]:
        """:meth:`score_many`, plus what this call alone computed.

        The counters are taken under the engine's lock, so the cost is this call's even when
        other threads use the engine at the same time (``stats.minus`` around a call is not).

        Parameters
        ----------
        items : sequence of (prompt, ranges)
            As for :meth:`score_many`.

        Returns
        -------
        (list, EngineStats)
            The :meth:`score_many` results, and the counters this call added to
            :attr:`stats` (``calls`` counts every item, valid or not).
        """
        results: list[FloatArray | PromptError | None] = [None] * len(items)
        jobs: list[Job] = []
        for slot, item in enumerate(items):
            try:
                prompt, ranges = item
                validate_score_request(
                    prompt, ranges, vocab_size=self.vocab_size, max_len=self.max_len
                )
            except PromptError as exc:
                results[slot] = exc
                continue
            except (TypeError, ValueError) as exc:
                results[slot] = PromptError(f"item {slot} is not a (prompt, ranges) pair: {exc}")
                continue
            spans = [(int(a), int(b)) for a, b in ranges]
            tokens = np.array(prompt, dtype=np.int64).reshape(-1)  # a copy: it may be kept
            if not spans:
                results[slot] = np.zeros(0, dtype=np.float64)
                continue
            jobs.append(make_job(slot, tokens, spans))
        with self._lock:
            before = self.stats.copy()
            t0 = time.perf_counter()
            try:
                if jobs:
                    self._persisted = run_jobs(
                        self._fwd, jobs, results, list(self._persisted), self._limits()
                    )
            finally:
                self.stats.calls += len(items)
                self.stats.seconds += time.perf_counter() - t0
            delta = self.stats.minus(before)
        out: list[FloatArray | PromptError] = []
        for r in results:
            assert r is not None
            out.append(r)
        return out, delta

    def score_naive(self, prompt: Sequence[int] | IntArray, ranges: Sequence[Span]) -> FloatArray:
        """The seed's way, for benchmarks: one full prefill, logits at every position.

        One forward of the whole prompt through the full model, a ``log_softmax`` over all
        ``len(prompt) × vocab`` logits, then a gather and a sum per span. Memory grows with
        ``len(prompt) × vocab``; use :meth:`score` for real work.

        Raises
        ------
        PromptError
            The request is invalid.
        """
        validate_score_request(prompt, ranges, vocab_size=self.vocab_size, max_len=self.max_len)
        tokens = np.asarray(prompt, dtype=np.int64).reshape(-1)
        with self._lock:
            t0 = time.perf_counter()
            try:
                lp = self._fwd.naive_logprobs(tokens)
            finally:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - t0
        return totals(lp, [(int(a), int(b)) for a, b in ranges])

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: Sequence[int] | IntArray,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> tuple[list[int], str]:
        """Sample a continuation of ``prompt`` with the KV cache.

        Parameters
        ----------
        prompt : sequence of int
            Token ids (non-empty, shorter than ``max_len``).
        max_tokens : int
            Most tokens to generate (also capped by ``max_len - len(prompt)``).
        temperature : float
            ``<= 0`` means greedy.
        top_p : float
            Nucleus filter in ``(0, 1]`` (``1`` disables it).
        top_k : int
            Keep the ``top_k`` most likely tokens (``<= 0`` disables it).
        stop_token_ids : sequence of int
            Generation stops at any of these; the stop token is not returned.
        seed : int, optional
            Seeds a private ``torch.Generator`` (default: torch's global RNG).

        Returns
        -------
        (list of int, str)
            The generated ids (without the stop token) and their text
            (``skip_special_tokens=False``).

        Raises
        ------
        PromptError
            Invalid prompt or sampling parameter.
        """
        validate_score_request(prompt, (), vocab_size=self.vocab_size, max_len=self.max_len)
        n = len(prompt)
        check_sampling(
            n, max_len=self.max_len, max_tokens=max_tokens, temperature=temperature, top_p=top_p
        )
        tokens = np.asarray(prompt, dtype=np.int64).reshape(-1)
        stops = {int(s) for s in stop_token_ids}
        budget = min(int(max_tokens), self.max_len - n)
        out: list[int] = []
        with self._lock, self._fwd.inference_mode():
            t0 = time.perf_counter()
            try:
                if budget > 0:
                    out = sample_tokens(
                        self._fwd,
                        tokens,
                        budget=budget,
                        temperature=float(temperature),
                        top_p=float(top_p),
                        top_k=int(top_k),
                        stops=stops,
                        seed=seed,
                    )
            finally:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - t0
        return out, self.tokenizer.decode(out, skip_special_tokens=False)

    def _limits(self) -> Limits:
        return Limits(
            cache_tokens=self.cache_tokens,
            prefix_cache_tokens=self.prefix_cache_tokens,
            prefix_cache_entries=self.prefix_cache_entries,
            batch_tokens=self.batch_tokens,
            max_batch=self.max_batch,
            batch_kv_tokens=self.batch_kv_tokens,
        )
