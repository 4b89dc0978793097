"""Split-prefix attention: the engine's attention when a chunk extends a cached prefix.

Nearly every forward the engine runs is a chunk of queries on top of a long cached prefix
that every query may see whole (the ablated suffix of a memory, a window, a refined row).
Through transformers' ``sdpa`` the whole key range then needs a 4-D mask, and a mask makes
transformers repeat the key/value heads (``repeat_kv``) for grouped-query models: at 8k
cached keys on SmolLM2 (9 query heads over 3 key/value heads) attention is about 70 % of a
chunk's time. This module splits the keys in two:

* the fully visible prefix ``[0, visible)``: no mask, and the query heads that share a
  key/value head are packed into one head's query rows, so no key/value copy is made;
* the rest ``[visible, kv)``: the caller's mask, key/value heads repeated (a chunk's worth).

The two parts' outputs are merged exactly by their log-sum-exps (the flash-attention
merge), so the result equals the single masked softmax up to float rounding (~1e-7).
Measured at 7,168 cached keys x 256 queries on a 2-core Xeon: 36 ms against 47 ms a layer.

The caller promises the visible prefix by passing ``visible_prefix=P`` to the base model's
forward (transformers hands extra keywords down to the attention function). Without it, or
when it is 0, or for a layer whose mask is not the engine's own (sliding-window layers), the
call goes to transformers' ``sdpa`` unchanged. The log-sum-exp comes from
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (CPU only); elsewhere, or
where this torch lacks it, :func:`install` leaves the model on ``sdpa``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NAME", "available", "install", "split_prefix_attention"]

#: the name registered with transformers' ``AttentionInterface``
NAME = "scoring_kit_split_prefix"


def available(device: str) -> bool:
    """Whether split-prefix attention can run on ``device`` with this torch."""
    import torch

    return device == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


def split_prefix_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    visible_prefix: int = 0,
    causal_rest: bool = False,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention of ``query`` (b, h, q, d) over ``key``/``value`` (b, kvh, k, d).

    Keys ``[0, visible_prefix)`` must be visible to every query of every row (the caller's
    promise); ``attention_mask`` (b, 1, q, k), boolean or additive, applies to the rest, or,
    with ``causal_rest`` (the caller's promise that the rest is the queries' own keys, ``q``
    of them, under a plain causal mask), the flash kernel's causal path does.
    Returns ``(output (b, q, h, d), None)`` as transformers' attention functions do.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    p = int(visible_prefix)
    if (
        p <= 0
        or attention_mask is None
        or dropout
        or kwargs.get("sliding_window")
        or p >= key.shape[2]
        or attention_mask.shape[1] != 1
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, h, q, d = query.shape
    kvh = key.shape[1]
    rep = h // kvh
    # the visible prefix: the query heads of one key/value head become one head's rows
    packed = query.reshape(b, kvh, rep * q, d)
    out_a, lse_a = flash(packed, key[:, :, :p], value[:, :, :p], scale=scaling)
    out_a = out_a.reshape(b, h, q, d)
    lse_a = lse_a.reshape(b, h, q)
    key_b, value_b = repeat_kv(key[:, :, p:], rep), repeat_kv(value[:, :, p:], rep)
    if causal_rest and key_b.shape[2] == q:
        out_b, lse_b = flash(query, key_b, value_b, is_causal=True, scale=scaling)
    else:  # the rest under the caller's mask (the flash kernel wants an additive mask)
        mask = attention_mask[..., p:]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~mask, float("-inf")
            )
        out_b, lse_b = flash(query, key_b, value_b, attn_mask=mask.to(query.dtype), scale=scaling)
    top = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - top)[..., None]
    w_b = torch.exp(lse_b - top)[..., None]
    out = (out_a * w_a + out_b * w_b) / (w_a + w_b)
    return out.transpose(1, 2).contiguous(), None


def install(model: Any, device: str) -> bool:
    """Switch ``model`` to split-prefix attention where it applies; True when it did.

    Only models whose attention is transformers' ``sdpa`` and that have no sliding-window
    layers are switched (Gemma 3 keeps ``sdpa``: its sliding layers see no full prefix).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .gemma import sliding_window

    config = model.config
    if (
        not available(device)
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or sliding_window(config) is not None
    ):
        return False
    AttentionInterface.register(NAME, split_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
