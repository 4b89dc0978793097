"""Every environment variable scoring_kit reads, in one place.

Each setting is read when asked for (never cached at import), so a notebook or test that
sets a variable sees it at the next call. An empty value counts as unset.

===============================  ============================================================
variable                         meaning
===============================  ============================================================
``SCORING_KIT_SERVER``           base URL of the scoring server (CLI ``--server``, notebooks)
``SCORING_KIT_BACKEND``          ``auto``, ``score``, ``vllm``, ``sglang`` (notebooks)
``SCORING_KIT_MODEL``            served model name sent as ``model`` (notebooks)
``SCORING_KIT_API_KEY``          bearer key sent to every endpoint / required by ``serve``
``SCORING_KIT_MODEL_PATH``       the embedded model (GGUF file or HF folder) instead of SmolLM2
``SCORING_KIT_DEVICE``           the embedded engine's torch device (``cpu``, ``cuda``, ``cuda:1``)
``SCORING_KIT_CACHE``            the kit's cache folder (memory store, trained set, converted
                                 GGUF tokenizers under ``tokenizers/``)
``SCORING_KIT_TOKENIZER_CACHE``  ``0`` / ``false`` / ``no`` / ``off``: convert a GGUF's tokenizer
                                 on every load instead of reading the cached copy (default: on)
``SCORING_KIT_TRAIN_DIR``        the embedded server's ``/train`` job folder
``SCORING_KIT_LOCOMO``           a full ``locomo10.json`` instead of the bundled memory fields
===============================  ============================================================
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "API_KEY_ENV",
    "BACKEND_ENV",
    "CACHE_ENV",
    "DEVICE_ENV",
    "LOCOMO_ENV",
    "MODEL_ENV",
    "MODEL_PATH_ENV",
    "SERVER_ENV",
    "TOKENIZER_CACHE_ENV",
    "TRAIN_DIR_ENV",
    "api_key",
    "backend",
    "cache_dir",
    "device",
    "env",
    "locomo_path",
    "model",
    "model_path",
    "server",
    "tokenizer_cache",
    "train_dir",
]

SERVER_ENV = "SCORING_KIT_SERVER"
BACKEND_ENV = "SCORING_KIT_BACKEND"
MODEL_ENV = "SCORING_KIT_MODEL"
API_KEY_ENV = "SCORING_KIT_API_KEY"
MODEL_PATH_ENV = "SCORING_KIT_MODEL_PATH"
DEVICE_ENV = "SCORING_KIT_DEVICE"
CACHE_ENV = "SCORING_KIT_CACHE"
TRAIN_DIR_ENV = "SCORING_KIT_TRAIN_DIR"
LOCOMO_ENV = "SCORING_KIT_LOCOMO"
TOKENIZER_CACHE_ENV = "SCORING_KIT_TOKENIZER_CACHE"


def env(name: str) -> str | None:
    """The variable's value, or ``None`` when it is unset or empty."""
    return os.environ.get(name) or None


def server() -> str | None:
    """``$SCORING_KIT_SERVER``."""
    return env(SERVER_ENV)


def backend() -> str:
    """``$SCORING_KIT_BACKEND``, default ``auto``."""
    return env(BACKEND_ENV) or "auto"


def model() -> str | None:
    """``$SCORING_KIT_MODEL``."""
    return env(MODEL_ENV)


def api_key() -> str | None:
    """``$SCORING_KIT_API_KEY``."""
    return env(API_KEY_ENV)


def model_path() -> str | None:
    """``$SCORING_KIT_MODEL_PATH``."""
    return env(MODEL_PATH_ENV)


def device() -> str | None:
    """``$SCORING_KIT_DEVICE``."""
    return env(DEVICE_ENV)


def locomo_path() -> str | None:
    """``$SCORING_KIT_LOCOMO``."""
    return env(LOCOMO_ENV)


def cache_dir() -> Path:
    """``$SCORING_KIT_CACHE`` or ``~/.cache/scoring_kit``."""
    value = env(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "scoring_kit"


def tokenizer_cache() -> bool:
    """``$SCORING_KIT_TOKENIZER_CACHE``: False for ``0``, ``false``, ``no``, ``off`` (any
    case), else True (the default: GGUF tokenizers are cached under ``cache_dir()``)."""
    value = env(TOKENIZER_CACHE_ENV)
    return value is None or value.strip().lower() not in {"0", "false", "no", "off"}


def train_dir() -> Path:
    """``$SCORING_KIT_TRAIN_DIR``, else ``$XDG_DATA_HOME/scoring_kit/train``.

    ``XDG_DATA_HOME`` defaults to ``~/.local/share``: a persistent place, because a client
    marks samples as trained once their job is recorded.
    """
    value = env(TRAIN_DIR_ENV)
    if value:
        return Path(value).expanduser()
    data = env("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "scoring_kit" / "train"
