"""Convert the embedded SmolLM2 GGUF to a Hugging Face folder that vLLM can serve (cached).

transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with gguf and
is not serializable"), so the dequantized float32 state dict is copied into a freshly built
model of the same config and that is saved, with the tokenizer. The copy is checked: its
logits on a fixed prompt must equal the GGUF-loaded model's within 1e-4.

The folder is ``$SCORING_KIT_CACHE/servers/model-<hash>`` (hash of the GGUF's size and
mtime, transformers' version and this recipe); a finished one carries ``.complete``.

    python scripts/convert_model.py        # prints the folder
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scoring_kit import _settings  # noqa: E402

RECIPE = "float32-state-dict-copy-v2"
#: The largest |logit difference| accepted between the GGUF model and its saved copy.
TOLERANCE = 1e-4


def _gguf() -> Path:
    from scoring_kit.engine.loader import resolve_model

    loc = resolve_model(None)  # the embedded default, as the kit finds it
    assert loc.gguf_file is not None
    return loc.directory / loc.gguf_file


def model_dir() -> Path:
    import transformers

    gguf = _gguf()
    st = gguf.stat()
    key = json.dumps([RECIPE, gguf.name, st.st_size, int(st.st_mtime), transformers.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return _settings.cache_dir() / "servers" / f"model-{digest}"


def convert() -> Path:
    """Build the HF folder unless it exists; return it."""
    target = model_dir()
    if (target / ".complete").is_file():
        return target
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.monotonic()
    gguf = _gguf()
    kw = {"gguf_file": gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    src = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kw
    ).eval()
    config = copy.deepcopy(src.config)
    config.torch_dtype = "float32"
    # the GGUF loader records quantization_config {quant_method: gguf}; vLLM refuses a
    # safetensors folder that claims it ("Unknown quantization method: gguf")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    # a tied head is not stored twice; anything else missing is a real failure
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        msg = f"state dict mismatch: missing {missing}, unexpected {unexpected}"
        raise SystemExit(msg)
    if config.tie_word_embeddings:
        fresh.tie_weights()
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        diff = (src(input_ids=ids).logits - fresh(input_ids=ids).logits).abs().max().item()
    if not diff <= TOLERANCE:
        msg = f"converted model's logits differ by {diff:.3g} (> {TOLERANCE})"
        raise SystemExit(msg)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    saved = json.loads((tmp / "config.json").read_text())
    if "quantization_config" in saved:
        msg = f"{tmp / 'config.json'} still has {saved['quantization_config']}"
        raise SystemExit(msg)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    info = {"gguf": str(gguf), "max_abs_logit_diff": diff, "seconds": time.monotonic() - t0}
    (target / ".complete").write_text(json.dumps(info) + "\n")
    print(f"[convert_model] {target}: max |logit diff| {diff:.2g}, "
          f"{info['seconds']:.0f} s", file=sys.stderr)
    return target


if __name__ == "__main__":
    print(convert())
