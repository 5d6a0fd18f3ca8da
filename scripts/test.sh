#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite. Triton kernels run in the interpreter on
# machines without a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec .venv/bin/pytest tests "$@"
