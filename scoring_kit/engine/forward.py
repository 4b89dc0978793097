"""The engine's torch side: KV caches, chunked prefill and span log-probabilities.

:class:`Forward` carries out the plans of ``plan.py``: it runs the suffix a plan asks for
through the base transformer (``model.model``) in chunks of ``chunk_tokens``, on top of the
KV of the prefix it reuses, and applies the LM head only at the hidden rows ``t - 1`` of the
scored positions ``t`` (``logit[target] - logsumexp(logits)``, ``logit_chunk_rows`` rows at a
time): no vocabulary x positions tensor is ever built, except by :meth:`Forward.naive_logprobs`
(the seed's way, for benchmarks). Every pass is counted in :attr:`Forward.stats`.

``torch`` and ``transformers`` are imported lazily (inside the methods): importing this module
is cheap. The caller holds the engine's lock and, for :meth:`run_single` /
:meth:`run_batch`, ``torch.inference_mode`` (:meth:`Forward.inference_mode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from .._types import FloatArray, IntArray
from .plan import Cached, Plan, lcp
from .stats import EngineStats

if TYPE_CHECKING:
    import torch

__all__ = ["Forward"]

#: (key, value) tensors of one layer, shape ``(batch, kv_heads, length, head_dim)``
_LayerKV = tuple["torch.Tensor", "torch.Tensor"]


class Forward:
    """Forward passes of one model, counted in :attr:`stats`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The causal LM (its ``config`` builds the KV caches; :meth:`naive_logprobs` calls it).
    base, head
        Its base transformer and its LM head.
    device : str
        Where the model lives.
    chunk_tokens : int
        Tokens per prefill chunk (per batch row).
    logit_chunk_rows : int
        Rows of the LM head computed at once.
    softcap : float, optional
        ``final_logit_softcapping`` of the model's config (Gemma), else None.
    logit_scale : float
        ``logit_scale`` of the model's config (1.0 for most models).
    stats : EngineStats
        The counters every pass adds to; the engine replaces it on ``reset_stats``.
    """

    def __init__(
        self,
        model: Any,
        base: Any,
        head: Any,
        *,
        device: str,
        chunk_tokens: int,
        logit_chunk_rows: int,
        softcap: float | None,
        logit_scale: float,
        stats: EngineStats,
    ) -> None:
        self.model = model
        self.base = base
        self.head = head
        self.device = device
        self.chunk_tokens = chunk_tokens
        self.logit_chunk_rows = logit_chunk_rows
        self._softcap = softcap
        self._logit_scale = logit_scale
        self.stats = stats
        from .gemma import sliding_window

        #: Gemma 3's sliding-window size (its sliding layers get their own mask), else None
        self._window = sliding_window(model.config)
        import inspect

        #: the KV-cache keyword of this transformers: ``cache`` (5.2x; ``past_key_values``
        #: there is deprecated and warns), else ``past_key_values``
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _split(self) -> bool:
        """Whether the model runs split-prefix attention now (``attention.install``)."""
        from .attention import NAME

        return getattr(self.model.config, "_attn_implementation", None) == NAME

    @staticmethod
    def inference_mode() -> AbstractContextManager[Any]:
        """``torch.inference_mode()`` (imports torch)."""
        import torch

        return torch.inference_mode()

    def new_cache(self) -> Any:
        """An empty ``transformers.DynamicCache`` for this model (sliding-window layers keep
        every position, so that slicing a cached prefix stays correct: Gemma 3)."""
        from .gemma import full_cache

        return full_cache(self.model.config)

    def cache_from(self, kv: Sequence[_LayerKV] | None, length: int, rows: int = 1) -> Any:
        """A fresh DynamicCache holding ``kv[:, :, :length]`` (expanded to ``rows`` rows)."""
        cache = self.new_cache()
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
    def cache_kv(cache: Any) -> list[_LayerKV]:
        """The per-layer (key, value) tensors a cache holds (kept as a :class:`Cached` KV)."""
        return [(layer.keys, layer.values) for layer in cache.layers]

    def forward(
        self,
        ids: torch.Tensor,
        start: int | torch.Tensor,
        cache: Any,
        mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
        *,
        visible: int = 0,
        causal_rest: bool = False,
    ) -> torch.Tensor:
        """Run ``ids`` (batch, q) through the base model at positions ``start + arange(q)``.

        ``start`` is an int or a (batch,) tensor of per-row offsets; ``visible`` says that the
        first ``visible`` cached keys are seen by every query of every row (split-prefix
        attention, ``attention.py``, then needs no mask for them); ``causal_rest`` that the
        other keys are the chunk's own under a plain causal mask. Returns the final hidden
        states (batch, q, hidden).
        """
        import torch

        q = ids.shape[1]
        ar = torch.arange(q, device=ids.device)
        if isinstance(start, int):
            pos = (ar + start)[None].expand(ids.shape[0], -1)
        else:
            pos = start[:, None] + ar[None]
        out = self.base(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_kw: cache},
            **(
                {"visible_prefix": visible, "causal_rest": causal_rest}
                if visible and self._split()
                else {}
            ),
        )
        self.stats.forward_passes += 1
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's float32 logits of ``hidden`` rows (scaled / soft-capped as configured)."""
        logits = self.head(hidden).float()
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._softcap:
            import torch

            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def row_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log_softmax(lm_head(hidden))[target]`` per row, ``logit_chunk_rows`` at a time."""
        import torch

        parts = []
        for i in range(0, hidden.shape[0], self.logit_chunk_rows):
            logits = self.logits(hidden[i : i + self.logit_chunk_rows])
            tgt = targets[i : i + self.logit_chunk_rows]
            lse = torch.logsumexp(logits, dim=-1)
            parts.append(logits.gather(1, tgt[:, None])[:, 0] - lse)
        self.stats.logit_rows += int(hidden.shape[0])
        return torch.cat(parts) if parts else hidden.new_zeros(0)

    def account_plan(self, plan: Plan) -> None:
        """Count what ``plan`` reuses: its KV rows and its known log-probabilities."""
        self.stats.cache_hits_tokens += plan.reuse
        self.stats.reused_logprobs += int(plan.job.targets.size - plan.compute.size)

    def run_single(self, plan: Plan, *, keep: bool) -> Cached | None:
        """Compute one plan alone; return its KV/log-probs as a cached prefix if ``keep``."""
        import torch

        job = plan.job
        self.account_plan(plan)
        if plan.compute.size == 0:
            if not keep or plan.source is None:
                return None
            # nothing to run: the job's prefix is the source's, known log-probs and all
            p = min(lcp(job.tokens, plan.source.tokens), plan.source.kv_len)
            if p == plan.source.kv_len:  # the source itself serves whatever this would
                return plan.source
            return Cached(job.tokens, plan.source.kv, p, plan.lp)
        src_kv = plan.source.kv if plan.source is not None else None
        cache = self.cache_from(src_kv, plan.reuse)
        ids = torch.as_tensor(job.tokens, device=self.device)
        rows = plan.compute - 1  # hidden rows needed, sorted, all >= reuse
        got: list[torch.Tensor] = []
        for c0 in range(plan.reuse, plan.end, self.chunk_tokens):
            c1 = min(c0 + self.chunk_tokens, plan.end)
            hidden = self.forward(ids[None, c0:c1], c0, cache, visible=c0, causal_rest=True)[0]
            lo, hi = np.searchsorted(rows, [c0, c1])
            if hi > lo:
                sel = torch.as_tensor(rows[lo:hi] - c0, device=self.device)
                tgt = ids[torch.as_tensor(plan.compute[lo:hi], device=self.device)]
                got.append(self.row_logprobs(hidden[sel], tgt))
        self.stats.forward_tokens += plan.end - plan.reuse
        plan.lp[plan.compute] = torch.cat(got).double().cpu().numpy()
        if not keep:
            return None
        return Cached(job.tokens, self.cache_kv(cache), plan.end, plan.lp)

    def run_batch(self, plans: list[Plan]) -> None:
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
            self.account_plan(p)
        ids = torch.as_tensor(ids_np, device=dev)
        starts = torch.as_tensor(reuse, device=dev)
        cache = self.cache_from(source.kv if source is not None else None, big_r, rows=b)
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

                kv_pos = torch.cat(
                    [
                        torch.arange(big_r, device=dev)[None].expand(b, -1),
                        starts[:, None] + kj[None],
                    ],
                    dim=1,
                )
                mask = layer_masks(self.model.config, mask, starts[:, None] + qi[None], kv_pos)
            hidden = self.forward(
                ids[:, c0:c1], starts + c0, cache, mask=mask, visible=int(reuse.min())
            )
            lo, hi = np.searchsorted(pos_of, [c0, c1])
            if hi > lo:  # one LM-head call for the whole batch's rows in this chunk
                bi = torch.as_tensor(row_of[lo:hi], device=dev)
                qi_sel = torch.as_tensor(pos_of[lo:hi] - c0, device=dev)
                tgt = torch.as_tensor(tgt_of[lo:hi], device=dev)
                got.append(self.row_logprobs(hidden[bi, qi_sel], tgt))
        values = np.empty(by_pos.size, dtype=np.float64)
        values[by_pos] = torch.cat(got).double().cpu().numpy()
        offset = 0
        for p in plans:
            p.lp[p.compute] = values[offset : offset + p.compute.size]
            offset += p.compute.size
        self.stats.forward_tokens += int(lens.sum())
        self.stats.pad_tokens += int(b * s_max - lens.sum())

    def naive_logprobs(self, tokens: IntArray) -> FloatArray:
        """The seed's way: one full forward, logits at every position, ``lp[t]`` per token.

        ``lp[0]`` is 0. Memory grows with ``len(tokens) x vocab``. Runs in inference mode.
        """
        import torch

        with torch.inference_mode():
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
        return lp
