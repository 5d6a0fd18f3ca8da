#!/usr/bin/env bash
# Set up (first run only) and sample rollout trees on a built-in tiny model: prints a tree summary
# and the speed ratio against plain transformers. Extra arguments go to `python -m rollout.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m rollout.demo "$@"
