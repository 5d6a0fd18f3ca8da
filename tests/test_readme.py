"""The README cannot drift: every Python block runs as written (nothing downloaded), and every
shell command it shows names files, configs and overrides that exist.

Python blocks run one by one, each in a fresh namespace, in a child process with the checkout as
its working directory. A block that talks to `http://127.0.0.1:8000` runs against the server the
README's own `python -m rollout.serve ...` command starts (on a free port, the URL rewritten to
match). Shell blocks are checked, not run (the training runs take minutes): each
`python -m trainers.train` line loads its config with its overrides, each script or benchmark it
names exists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import wait_healthy

from rollout.service.cli import free_port
from trainers.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
URL = "http://127.0.0.1:8000"


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README) if kind == lang]


def shell_lines() -> list[str]:
    """Commands of the shell blocks, continuation lines joined, comments dropped."""
    text = "\n".join(blocks("bash")).replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip()]


def serve_command() -> list[str]:
    """The single server's command (the Fleet section's `--replicas` commands start Ray)."""
    (line,) = [c for c in shell_lines() if "-m rollout.serve" in c and "--replicas" not in c]
    return shlex.split(line)


PYTHON = blocks("python")


def test_the_readme_has_python_and_shell_blocks():
    assert len(PYTHON) >= 4 and any("rollout.Client" in b for b in PYTHON)
    assert "--port 8000" in " ".join(serve_command())


@pytest.fixture(scope="module")
def readme_server():
    """The README's serve command on a free port; yields its URL."""
    port = free_port()
    cmd = [sys.executable if a.endswith("python") else a for a in serve_command()]
    cmd[cmd.index("--port") + 1] = str(port)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, 120, "the README's server")
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written(index, request, tmp_path):
    code = PYTHON[index]
    if URL in code:
        code = code.replace(URL, request.getfixturevalue("readme_server"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**_env(), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, f"README block {index} failed:\n{code}\n{out.stderr[-3000:]}"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}


def test_every_training_command_loads_its_config():
    runs = [c for c in shell_lines() if "trainers.train" in c]
    assert runs
    for line in runs:
        args = shlex.split(line)
        i = args.index("--config")
        overrides = [a for a in args[i + 2 :] if "=" in a and not a.startswith("-")]
        load_config(ROOT / args[i + 1], overrides)


def test_every_script_and_benchmark_named_exists():
    named = {w for c in shell_lines() for w in shlex.split(c)
             if w.endswith((".py", ".sh", ".yaml")) and "/" in w}
    assert named
    missing = sorted(w for w in named if not (ROOT / w).exists())
    assert not missing, f"the README names files that do not exist: {missing}"
