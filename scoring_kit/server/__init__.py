"""The embedded scoring server (Starlette + uvicorn) and the ways to run it.

Names are imported lazily, so ``import scoring_kit.server`` loads neither Starlette nor
uvicorn nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServedEngine, create_app, prompt_token_logprobs
    from .process import ServerProcess, start_server_process
    from .runner import EmbeddedServer, serve
    from .trainqueue import JobInfo, TrainQueue
    from .worker import EngineWorker, QueueFull

__all__ = [
    "EmbeddedServer",
    "EngineWorker",
    "JobInfo",
    "QueueFull",
    "ServedEngine",
    "ServerProcess",
    "TrainQueue",
    "create_app",
    "prompt_token_logprobs",
    "serve",
    "start_server_process",
]

_WHERE = {
    "EngineWorker": "worker",
    "QueueFull": "worker",
    "ServedEngine": "app",
    "create_app": "app",
    "prompt_token_logprobs": "app",
    "EmbeddedServer": "runner",
    "ServerProcess": "process",
    "serve": "runner",
    "start_server_process": "process",
    "JobInfo": "trainqueue",
    "TrainQueue": "trainqueue",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
