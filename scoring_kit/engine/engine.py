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

``torch`` and ``transformers`` are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .._exceptions import ModelLoadError, PromptError
from .._types import FloatArray, IntArray, PathLike, Span
from ..wire import validate_score_request

if TYPE_CHECKING:
    import torch

    from ..context.tokenizer import HFTokenizer

__all__ = ["DEVICE_ENV", "Engine", "EngineStats"]

#: Environment variable that picks the device when ``Engine.load`` is given none.
DEVICE_ENV = "SCORING_KIT_DEVICE"

_DTYPES = ("float32", "float16", "bfloat16")

#: (key, value) tensors of one layer, shape ``(batch, kv_heads, length, head_dim)``
_LayerKV = tuple["torch.Tensor", "torch.Tensor"]


@dataclass(slots=True)
class EngineStats:
    """What the engine has computed since the last :meth:`Engine.reset_stats`.

    Attributes
    ----------
    calls : int
        Requests handled (each item of ``score_many`` counts, and each ``generate``).
    forward_tokens : int
        Real tokens pushed through the transformer (padding excluded).
    logit_rows : int
        Rows of the LM head computed (one per scored token not reused from a cached prefix).
    cache_hits_tokens : int
        Prompt tokens whose KV came from a cached prefix instead of being recomputed.
    reused_logprobs : int
        Scored tokens whose log-probability was taken from a cached prefix.
    pad_tokens : int
        Padding tokens pushed through the transformer by batched suffix passes.
    forward_passes : int
        Calls of the base transformer (one per chunk per batch).
    seconds : float
        Wall time spent holding the model.
    """

    calls: int = 0
    forward_tokens: int = 0
    logit_rows: int = 0
    cache_hits_tokens: int = 0
    reused_logprobs: int = 0
    pad_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def copy(self) -> EngineStats:
        """A snapshot of these counters."""
        return EngineStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, other: EngineStats) -> EngineStats:
        """Counter-wise difference ``self - other`` (the cost of what ran in between)."""
        return EngineStats(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def add(self, other: EngineStats) -> None:
        """Add ``other``'s counters to these, in place."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class _Job:
    """One valid ``score_many`` item, prepared."""

    slot: int
    tokens: IntArray
    spans: list[Span]
    #: scored positions t (sorted); the hidden row needed for t is t - 1
    targets: IntArray
    #: tokens that must be forwarded: [0, need) gives the hidden rows 0 .. need - 1
    need: int


@dataclass(slots=True)
class _Cached:
    """A computed prefix: its tokens, its KV and the log-probabilities it knows."""

    tokens: IntArray
    kv: list[_LayerKV]
    kv_len: int
    #: lp[t] = log P(tokens[t] | tokens[:t]) where known, NaN elsewhere; len(tokens) + 1 long
    lp: FloatArray


@dataclass(slots=True)
class _Plan:
    """How one job is computed from a source: reuse ``r`` KV rows, compute rows ``rows``."""

    job: _Job
    source: _Cached | None
    reuse: int
    lp: FloatArray
    #: scored positions t whose log-probability must be computed (hidden row t - 1 >= reuse)
    compute: IntArray
    #: forward tokens [reuse, end)
    end: int


def _lcp(a: IntArray, b: IntArray) -> int:
    """Length of the longest common prefix of two id arrays (vectorised)."""
    m = min(a.shape[0], b.shape[0])
    if m == 0:
        return 0
    neq = a[:m] != b[:m]
    i = int(np.argmax(neq))
    return i if bool(neq[i]) else m


def _lcp_matrix(arrays: Sequence[IntArray]) -> IntArray:
    """Pairwise longest-common-prefix lengths, ``O(n log n · L + n²)``.

    Sorts the sequences lexicographically; then ``lcp(s_i, s_j)`` for ``i < j`` in sorted order
    is the minimum of the adjacent LCPs between them.
    """
    n = len(arrays)
    out = np.zeros((n, n), dtype=np.int64)
    if n == 0:
        return out
    keys = [np.ascontiguousarray(a, dtype=">u4").tobytes() for a in arrays]
    order = sorted(range(n), key=keys.__getitem__)
    adj = np.array(
        [_lcp(arrays[order[k]], arrays[order[k + 1]]) for k in range(n - 1)], dtype=np.int64
    )
    srt = np.zeros((n, n), dtype=np.int64)
    for k in range(n):
        srt[k, k] = arrays[order[k]].shape[0]
        if k < n - 1:
            srt[k, k + 1 :] = np.minimum.accumulate(adj[k:])
    srt = np.triu(srt) + np.triu(srt, 1).T
    idx = np.asarray(order)
    out[np.ix_(idx, idx)] = srt
    return out


def _span_positions(spans: Sequence[Span]) -> IntArray:
    if not spans:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans])


def _totals(lp: FloatArray, spans: Sequence[Span]) -> FloatArray:
    return np.array([float(np.sum(lp[a:b])) for a, b in spans], dtype=np.float64)


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
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if logit_chunk_rows < 1:
            raise ValueError(f"logit_chunk_rows must be >= 1, got {logit_chunk_rows}")
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
        from .gemma import sliding_window

        self._window = sliding_window(model.config)
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
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._persisted: list[_Cached] = []
        base = getattr(model, "model", None)
        if base is None and hasattr(model, "get_decoder"):
            base = model.get_decoder()
        if base is None:
            raise ModelLoadError(
                f"model {self.name!r} ({type(model).__name__}) has no base transformer "
                "(model.model / get_decoder())",
                backend="local",
            )
        head = model.get_output_embeddings()
        if head is None:
            raise ModelLoadError(
                f"model {self.name!r} ({type(model).__name__}) has no LM head "
                "(get_output_embeddings() is None)",
                backend="local",
            )
        self._base = base
        self._head = head

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
            device = os.environ.get(DEVICE_ENV) or None
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
        return self._score_many_counted(items)[0]

    def _score_many_counted(
        self, items: Sequence[tuple[Sequence[int] | IntArray, Sequence[Span]]]
    ) -> tuple[list[FloatArray | PromptError], EngineStats]:
        """:meth:`score_many`, plus the cost of this call alone."""
        results: list[FloatArray | PromptError | None] = [None] * len(items)
        jobs: list[_Job] = []
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
            targets = _span_positions(spans)
            jobs.append(_Job(slot, tokens, spans, targets, int(targets[-1])))
        with self._lock:
            before = self.stats.copy()
            t0 = time.perf_counter()
            try:
                if jobs:
                    self._run_jobs(jobs, results)
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
        import torch

        tokens = np.asarray(prompt, dtype=np.int64).reshape(-1)
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            try:
                ids = torch.as_tensor(tokens, device=self.device)[None]
                logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
                # log_softmax over the whole (len × vocab) tensor; written as x - logsumexp(x)
                # because CPU float32 log_softmax drifts by ~1e-5 per token (biased)
                logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
                tok_lp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
                lp = np.zeros(tokens.shape[0], dtype=np.float64)
                lp[1:] = tok_lp.double().cpu().numpy()
                self.stats.forward_tokens += int(tokens.shape[0])
                self.stats.logit_rows += int(tokens.shape[0])
                self.stats.forward_passes += 1
            finally:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - t0
        return _totals(lp, [(int(a), int(b)) for a, b in ranges])

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
        if n >= self.max_len and max_tokens > 0:
            raise PromptError(
                f"prompt has {n} tokens: no room to generate within the model's context of "
                f"{self.max_len} tokens"
            )
        if not 0.0 < top_p <= 1.0:
            raise PromptError(f"top_p must be in (0, 1], got {top_p}")
        if temperature != temperature:  # NaN
            raise PromptError("temperature is NaN")
        import torch

        tokens = np.asarray(prompt, dtype=np.int64).reshape(-1)
        stops = {int(s) for s in stop_token_ids}
        budget = min(int(max_tokens), self.max_len - n)
        out: list[int] = []
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            try:
                if budget > 0:
                    out = self._generate_locked(
                        tokens, budget, float(temperature), float(top_p), int(top_k), stops, seed
                    )
            finally:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - t0
        return out, self.tokenizer.decode(out, skip_special_tokens=False)

    def _generate_locked(
        self,
        tokens: IntArray,
        budget: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stops: set[int],
        seed: int | None,
    ) -> list[int]:
        import torch

        gen: torch.Generator | None = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed))
        cache = self._new_cache()
        ids = torch.as_tensor(tokens, device=self.device)
        hidden: torch.Tensor | None = None
        for c0 in range(0, tokens.shape[0], self.chunk_tokens):
            c1 = min(c0 + self.chunk_tokens, tokens.shape[0])
            hidden = self._forward(ids[None, c0:c1], c0, cache)[0, -1]
        assert hidden is not None
        pos = int(tokens.shape[0])
        out: list[int] = []
        while True:
            logits = self._logits(hidden[None])[0]
            tok = self._sample(logits, temperature, top_p, top_k, gen)
            if tok in stops:
                break
            out.append(tok)
            if len(out) >= budget:
                break
            step = torch.tensor([[tok]], dtype=torch.long, device=self.device)
            hidden = self._forward(step, pos, cache)[0, -1]
            pos += 1
        return out

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        temperature: float,
        top_p: float,
        top_k: int,
        gen: torch.Generator | None,
    ) -> int:
        import torch

        if temperature <= 0.0:
            return int(torch.argmax(logits).item())
        scores = logits / temperature
        if 0 < top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs
            drop = before > top_p
            drop[0] = False
            scores = scores.clone()
            scores[order[drop]] = float("-inf")
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen).item())

    # ------------------------------------------------------------------ internals: model

    def _new_cache(self) -> Any:
        from .gemma import full_cache  # sliding-window layers keep every position (Gemma 3)

        return full_cache(self.model.config)

    def _cache_from(self, kv: Sequence[_LayerKV] | None, length: int, rows: int = 1) -> Any:
        """A fresh DynamicCache holding ``kv[:, :, :length]`` (expanded to ``rows`` rows)."""
        cache = self._new_cache()
        if kv is None or length == 0:
            return cache
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            ks, vs = k[:, :, :length], v[:, :, :length]
            if rows != ks.shape[0]:
                ks = ks.expand(rows, -1, -1, -1)
                vs = vs.expand(rows, -1, -1, -1)
            if rows == 1 and hasattr(layer, "lazy_initialization") and hasattr(layer, "keys"):
                # a view, not a copy: DynamicLayer.update concatenates into a new tensor, so
                # the source is never written; this saves one copy of the prefix per item
                layer.lazy_initialization(ks, vs)
                layer.keys, layer.values = ks, vs
            else:
                layer.update(ks, vs)
        return cache

    @staticmethod
    def _cache_kv(cache: Any) -> list[_LayerKV]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _forward(
        self,
        ids: torch.Tensor,
        start: int | torch.Tensor,
        cache: Any,
        mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run ``ids`` (batch, q) through the base model at positions ``start + arange(q)``.

        ``start`` is an int or a (batch,) tensor of per-row offsets. Returns the final hidden
        states (batch, q, hidden).
        """
        import torch

        q = ids.shape[1]
        ar = torch.arange(q, device=ids.device)
        if isinstance(start, int):
            pos = (ar + start)[None].expand(ids.shape[0], -1)
        else:
            pos = start[:, None] + ar[None]
        out = self._base(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )
        self.stats.forward_passes += 1
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden).float()
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._softcap:
            import torch

            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _row_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log_softmax(lm_head(hidden))[target]`` per row, ``logit_chunk_rows`` at a time."""
        import torch

        parts = []
        for i in range(0, hidden.shape[0], self.logit_chunk_rows):
            logits = self._logits(hidden[i : i + self.logit_chunk_rows])
            tgt = targets[i : i + self.logit_chunk_rows]
            lse = torch.logsumexp(logits, dim=-1)
            parts.append(logits.gather(1, tgt[:, None])[:, 0] - lse)
        self.stats.logit_rows += int(hidden.shape[0])
        return torch.cat(parts) if parts else hidden.new_zeros(0)

    # ------------------------------------------------------------------ internals: planning

    def _plan(self, job: _Job, source: _Cached | None) -> _Plan:
        """Decide how much of ``source`` ``job`` reuses and which rows it computes."""
        lp = np.full(job.tokens.shape[0] + 1, np.nan, dtype=np.float64)
        t = job.targets
        if source is None:
            return _Plan(job, None, 0, lp, t, job.need)
        p = _lcp(job.tokens, source.tokens)
        # log-probs known in the shared prefix are valid for this job too
        known_len = min(p, source.lp.shape[0])
        lp[:known_len] = source.lp[:known_len]
        reusable = (t < p) & ~np.isnan(lp[t])
        compute = t[~reusable]
        if compute.size == 0:
            return _Plan(job, source, 0, lp, compute, 0)
        reuse = int(min(p, source.kv_len, int(compute[0]) - 1))
        return _Plan(
            job, source if reuse > 0 else None, max(reuse, 0), lp, compute, int(compute[-1])
        )

    def _gain(self, job: _Job, source: _Cached) -> int:
        p = _lcp(job.tokens, source.tokens)
        return min(p, source.kv_len, job.need)

    def _run_jobs(self, jobs: list[_Job], results: list[FloatArray | PromptError | None]) -> None:
        """Order, plan, compute and fill ``results`` for the valid jobs."""
        import torch

        persisted = list(self._persisted)
        n = len(jobs)
        arrays = [j.tokens for j in jobs] + [c.tokens for c in persisted]
        needs = np.array([j.need for j in jobs] + [c.kv_len for c in persisted], dtype=np.int64)
        m = _lcp_matrix(arrays)
        usable = np.minimum(np.minimum(m, needs[:, None]), needs[None, :])
        np.fill_diagonal(usable, 0)
        # hubness: how much the others would reuse from an item
        hub = usable.sum(axis=0)
        order = sorted(range(n), key=lambda i: (-int(hub[i]), -int(needs[i]), i))
        # parents: the earlier item (or kept prefix) that each item extends the most
        seen: list[int] = list(range(n, n + len(persisted)))
        children = np.zeros(n + len(persisted), dtype=np.int64)
        for i in order:
            if seen:
                cand = np.asarray(seen)
                gains = usable[i, cand]
                best = int(np.argmax(gains))
                if gains[best] > 0:
                    children[cand[best]] += 1
            seen.append(i)
        top = order[0]
        keep_persist = self.prefix_cache_tokens > 0
        is_parent = [bool(children[i] > 0) for i in range(n)]
        if keep_persist and jobs[top].need <= self.prefix_cache_tokens:
            is_parent[top] = True

        retained: list[_Cached] = list(persisted)
        retained_tokens = sum(c.kv_len for c in retained)
        used: list[_Cached] = []  # sources that served this call, in order of first use
        top_cached: _Cached | None = None

        def best_source(job: _Job) -> _Cached | None:
            best: _Cached | None = None
            best_gain = 0
            for c in retained:
                g = self._gain(job, c)
                if g > best_gain:
                    best, best_gain = c, g
            if best is not None and all(u is not best for u in used):
                used.append(best)
            return best

        with torch.inference_mode():
            # phase 1: items that others extend, one at a time, keeping their KV
            for i in order:
                if not is_parent[i]:
                    continue
                job = jobs[i]
                plan = self._plan(job, best_source(job))
                keep = retained_tokens + plan.end <= self.cache_tokens
                cached = self._run_single(plan, keep=keep)
                results[job.slot] = _totals(plan.lp, job.spans)
                if cached is not None:
                    retained.append(cached)
                    retained_tokens += cached.kv_len
                    if i == top:
                        top_cached = cached
            # phase 2: the rest, grouped by the prefix they extend, batched where it pays
            groups: dict[int, list[_Plan]] = {}
            for i in order:
                if is_parent[i]:
                    continue
                plan = self._plan(jobs[i], best_source(jobs[i]))
                if plan.compute.size == 0 or plan.source is None:
                    key = -1 if plan.compute.size else -2
                else:
                    key = id(plan.source)
                groups.setdefault(key, []).append(plan)
            for key, plans in groups.items():
                if key == -2:  # fully reused
                    for plan in plans:
                        self._account_plan(plan)
                        results[plan.job.slot] = _totals(plan.lp, plan.job.spans)
                    continue
                for batch in self._batches(plans):
                    if len(batch) == 1:
                        self._run_single(batch[0], keep=False)
                    else:
                        self._run_batch(batch)
                    for plan in batch:
                        results[plan.job.slot] = _totals(plan.lp, plan.job.spans)
        if not keep_persist:
            self._persisted = []
            return
        # keep, most recent first: this call's hub, the kept prefixes it used, the others
        keep_list: list[_Cached] = []
        for c in [*([top_cached] if top_cached else []), *used, *persisted]:
            if any(k is c for k in keep_list):
                continue
            if sum(k.kv_len for k in keep_list) + c.kv_len > self.prefix_cache_tokens:
                continue
            if len(keep_list) < self.prefix_cache_entries:
                keep_list.append(c)
        self._persisted = keep_list

    def _batches(self, plans: list[_Plan]) -> list[list[_Plan]]:
        """Pack plans extending the same prefix into passes within the token budgets."""
        if self.batch_tokens <= 1 or self.max_batch <= 1 or len(plans) == 1:
            return [[p] for p in plans]
        plans = sorted(plans, key=lambda p: -(p.end - p.reuse))
        out: list[list[_Plan]] = []
        cur: list[_Plan] = []
        for p in plans:
            trial = [*cur, p]
            longest = max(q.end - q.reuse for q in trial)
            prefix = max(q.reuse for q in trial)
            fits = (
                len(trial) <= self.max_batch
                and len(trial) * longest <= self.batch_tokens
                and len(trial) * (prefix + longest) <= self.batch_kv_tokens
            )
            if cur and not fits:
                out.append(cur)
                cur = [p]
            else:
                cur = trial
        if cur:
            out.append(cur)
        return out

    # ------------------------------------------------------------------ internals: compute

    def _account_plan(self, plan: _Plan) -> None:
        self.stats.cache_hits_tokens += plan.reuse
        self.stats.reused_logprobs += int(plan.job.targets.size - plan.compute.size)

    def _run_single(self, plan: _Plan, *, keep: bool) -> _Cached | None:
        """Compute one plan alone; return its KV/log-probs as a cached prefix if ``keep``."""
        import torch

        job = plan.job
        self._account_plan(plan)
        if plan.compute.size == 0:
            if not keep or plan.source is None:
                return None
            # nothing to run: the job's prefix is the source's, known log-probs and all
            p = min(_lcp(job.tokens, plan.source.tokens), plan.source.kv_len)
            if p == plan.source.kv_len:  # the source itself serves whatever this would
                return plan.source
            return _Cached(job.tokens, plan.source.kv, p, plan.lp)
        src_kv = plan.source.kv if plan.source is not None else None
        cache = self._cache_from(src_kv, plan.reuse)
        ids = torch.as_tensor(job.tokens, device=self.device)
        rows = plan.compute - 1  # hidden rows needed, sorted, all >= reuse
        got: list[torch.Tensor] = []
        for c0 in range(plan.reuse, plan.end, self.chunk_tokens):
            c1 = min(c0 + self.chunk_tokens, plan.end)
            hidden = self._forward(ids[None, c0:c1], c0, cache)[0]
            lo, hi = np.searchsorted(rows, [c0, c1])
            if hi > lo:
                sel = torch.as_tensor(rows[lo:hi] - c0, device=self.device)
                tgt = ids[torch.as_tensor(plan.compute[lo:hi], device=self.device)]
                got.append(self._row_logprobs(hidden[sel], tgt))
        self.stats.forward_tokens += plan.end - plan.reuse
        plan.lp[plan.compute] = torch.cat(got).double().cpu().numpy()
        if not keep:
            return None
        return _Cached(job.tokens, self._cache_kv(cache), plan.end, plan.lp)

    def _run_batch(self, plans: list[_Plan]) -> None:
        """Compute plans that extend one cached prefix in right-padded batched passes."""
        import torch

        source = plans[0].source
        b = len(plans)
        dev = self.device
        reuse = np.array([p.reuse for p in plans], dtype=np.int64)
        lens = np.array([p.end - p.reuse for p in plans], dtype=np.int64)
        big_r = int(reuse.max())
        s_max = int(lens.max())
        ids_np = np.zeros((b, s_max), dtype=np.int64)
        for k, p in enumerate(plans):
            ids_np[k, : lens[k]] = p.job.tokens[p.reuse : p.end]
            self._account_plan(p)
        ids = torch.as_tensor(ids_np, device=dev)
        starts = torch.as_tensor(reuse, device=dev)
        cache = self._cache_from(source.kv if source is not None else None, big_r, rows=b)
        prefix_vis = torch.arange(big_r, device=dev)[None, :] < starts[:, None]  # (b, R)
        # every (row, suffix-local hidden position, target) to score, in suffix order
        row_of = np.concatenate([np.full(p.compute.size, k) for k, p in enumerate(plans)])
        pos_of = np.concatenate([p.compute - 1 - p.reuse for p in plans])
        tgt_of = np.concatenate([p.job.tokens[p.compute] for p in plans])
        by_pos = np.argsort(pos_of, kind="stable")
        row_of, pos_of, tgt_of = row_of[by_pos], pos_of[by_pos], tgt_of[by_pos]
        got: list[torch.Tensor] = []
        for c0 in range(0, s_max, self.chunk_tokens):
            c1 = min(c0 + self.chunk_tokens, s_max)
            q = c1 - c0
            qi = torch.arange(c0, c1, device=dev)
            kj = torch.arange(c1, device=dev)
            causal = kj[None, :] <= qi[:, None]  # (q, c1)
            mask = torch.cat(
                [
                    prefix_vis[:, None, :].expand(b, q, big_r),
                    causal[None].expand(b, q, c1),
                ],
                dim=2,
            )[:, None]
            if self._window is not None:  # Gemma 3: sliding layers get their own mask
                from .gemma import layer_masks

                kv_pos = torch.cat([torch.arange(big_r, device=dev)[None].expand(b, -1),
                                    starts[:, None] + kj[None]], dim=1)
                mask = layer_masks(self.model.config, mask, starts[:, None] + qi[None], kv_pos)
            hidden = self._forward(ids[:, c0:c1], starts + c0, cache, mask=mask)
            lo, hi = np.searchsorted(pos_of, [c0, c1])
            if hi > lo:  # one LM-head call for the whole batch's rows in this chunk
                bi = torch.as_tensor(row_of[lo:hi], device=dev)
                qi_sel = torch.as_tensor(pos_of[lo:hi] - c0, device=dev)
                tgt = torch.as_tensor(tgt_of[lo:hi], device=dev)
                got.append(self._row_logprobs(hidden[bi, qi_sel], tgt))
        values = np.empty(by_pos.size, dtype=np.float64)
        values[by_pos] = torch.cat(got).double().cpu().numpy()
        offset = 0
        for p in plans:
            p.lp[p.compute] = values[offset : offset + p.compute.size]
            offset += p.compute.size
        self.stats.forward_tokens += int(lens.sum())
        self.stats.pad_tokens += int(b * s_max - lens.sum())
