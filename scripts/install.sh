#!/usr/bin/env bash
# Set up .venv in the checkout: torch first (the CPU build unless TORCH_SPEC says otherwise, so pip
# never pulls a multi-GB CUDA build on a CPU machine), then the project and its test tools.
# Idempotent: it reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
[ -d .venv ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test,triton]"
rm -f .venv/.installed-*
touch "$stamp"
